"""flower_app.py on Flower's deployment engine, over loopback with TLS: a SuperLink and one SuperNode per
site, each a process of its own, `flwr run` submitting the app; compared with the serial simulation."""

import datetime
import ipaddress
import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
import torch

import client as fl_client
import fedavg
import federated
import lora
import server as fl_server
from conftest import run_main, seconds

flwr = pytest.importorskip("flwr")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")
BIN = os.path.dirname(sys.executable)  # flower-superlink, flower-supernode, flwr live beside this python


def job(cache_dir, out_dir, sites, round_timeout=None):
    """The overrides of a small 2-round job, the same for the simulation and the deployment; each round
    waits round_timeout seconds for the sites (default 120, times pytest --time-scale)."""
    round_timeout = seconds(120) if round_timeout is None else round_timeout
    files = ",".join(os.path.join(ROOT, "data/clients", f"{s}.json") for s in sites)
    return [f"model.cache_dir={cache_dir}", f"federated.output_dir={out_dir}", "federated.rounds=2",
            "federated.local_steps=2", "federated.global_steps=2", "federated.max_new_tokens=4",
            "train.batch_size=4", f"data.clients=[{files}]", f"federated.round_timeout={round_timeout}"]  # fmt: skip


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(d):
    """A CA and a server certificate for 127.0.0.1 / localhost, signed by it (PEM files in d)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, signer, ca):
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if not ca:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = cert(ca_name, ca_name, ca_key, ca_key, True)
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name, key, ca_key, False)
    pem = serialization.Encoding.PEM
    (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    (d / "server.crt").write_bytes(server.public_bytes(pem))
    (d / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return {name: str(d / name) for name in ("ca.crt", "server.crt", "server.key")}


def stat(pid):
    """(parent pid, start time) of a process from /proc/<pid>/stat, or None if it is gone (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid):
    """(pid, start time) of every process below `pid`; the start time tells a reused pid apart."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := stat(int(entry))) is not None:
            children.setdefault(st[0], []).append((int(entry), st[1]))
    found, todo = [], [pid]
    while todo:
        for child, start in children.get(todo.pop(), []):
            found.append((child, start))
            todo.append(child)
    return found


def signal_if_same(processes, sig):
    """Send `sig` to each (pid, start time) that is still that very process."""
    for pid, start in processes:
        st = stat(pid)
        if st is not None and st[1] == start:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


class Deployment:
    """A SuperLink and SuperNodes on free loopback ports, each in its own process group, stopped by it.
    Nothing waits a fixed time: superlink() returns once the SuperLink completes a TLS handshake,
    supernodes() once the SuperLink lists each of them online; `flwr run` retries neither."""

    def __init__(self, tmp, certs, superlink_delay=0.0):
        self.tmp, self.certs, self.procs = tmp, certs, {}
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_TELEMETRY_ENABLED": "0"}
        self.port = free_port()
        self.superlink_delay = superlink_delay  # pytest --superlink-delay: a slow machine's start, simulated

    def start(self, name, argv, env=None):
        home = self.tmp / f"home_{name}"
        home.mkdir(exist_ok=True)
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        env = {**self.env, **(env or {}), "FLWR_HOME": str(home)}
        self.procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def logs(self):
        """The end of every process's log, for a failure message."""
        return "\n".join(
            f"--- {p.name} (end)\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.tmp.glob("*.log"))
        )

    def wait_for(self, what, ready, timeout=180):
        """Poll ready() until it is true; fail with every log if a process exits or the deadline passes."""
        timeout = seconds(timeout)
        deadline = time.time() + timeout
        while not ready():
            dead = [f"{n} (exit {p.returncode})" for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not within {timeout} s"
                pytest.fail(f"waiting for {what}: {why}\n{self.logs()}")
            time.sleep(0.5)

    def superlink(self):
        """Start the SuperLink; return once it accepts a TLS connection on its port (certificate verified)."""
        argv = [os.path.join(BIN, "flower-superlink"), "--ssl-ca-certfile", self.certs["ca.crt"],
                "--ssl-certfile", self.certs["server.crt"], "--ssl-keyfile", self.certs["server.key"],
                "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]  # fmt: skip
        if self.superlink_delay:
            argv = ["sh", "-c", f'sleep {self.superlink_delay}; exec "$@"', "sh", *argv]
        self.start("superlink", argv)
        self.wait_for(f"the SuperLink on 127.0.0.1:{self.port}", self.accepts_tls)

    def accepts_tls(self):
        context = ssl.create_default_context(cafile=self.certs["ca.crt"])
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                context.wrap_socket(s, server_hostname="127.0.0.1").close()  # the handshake, then nothing
            return True
        except OSError:  # refused (not listening yet), reset, timed out; ssl.SSLError is an OSError
            return False

    def supernode(self, site, state_dir, process=None, env=None):
        """A SuperNode for `site` (its process named supernode_<process or site>), its extra `env`."""
        data = os.path.join(ROOT, "data/clients", f"{site}.json")
        argv = [os.path.join(BIN, "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", self.certs["ca.crt"], "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"client='{site}' data-file='{data}' state-dir='{state_dir}'"]  # fmt: skip
        self.start(f"supernode_{process or site}", argv, env)

    def site(self, site, state_dir, process=None, env=None, data=None):
        """A warm site, as the README starts one (`python flower_app.py --client ...`: the worker holding the
        model, which starts the site's SuperNode), its processes named supernode_<process or site>."""
        data = data or os.path.join(ROOT, "data/clients", f"{site}.json")
        argv = [sys.executable, os.path.join(ROOT, "flower_app.py"), "--client", site, "--data-file", data,
                "--state-dir", str(state_dir), "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", self.certs["ca.crt"], "--host", "127.0.0.1",
                "--port", str(free_port())]  # fmt: skip
        self.start(f"supernode_{process or site}", argv, env)

    def supernodes(self, sites, state, warm=False):
        """Start one SuperNode per site (state-dir state/<site>), each a warm site's or a plain one; return
        once the SuperLink lists that many nodes online."""
        for site in sites:
            (self.site if warm else self.supernode)(site, state / site)
        self.wait_for(f"{len(sites)} SuperNodes online", lambda: self.nodes_online() >= len(sites))

    def nodes_online(self):
        """How many nodes the SuperLink lists online (`flwr supernode list`, its JSON output)."""
        argv = [os.path.join(BIN, "flwr"), "supernode", "list", "test", "--format", "json"]
        env = {**self.env, "FLWR_HOME": str(self.cli_home())}
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
            nodes = json.loads(done.stdout)["nodes"]
        except (subprocess.TimeoutExpired, ValueError, KeyError):  # no answer or no JSON yet: not ready
            return 0
        return sum(node["status"] == "online" for node in nodes)

    def cli_home(self):
        """The FLWR_HOME of `flwr` (run, supernode list): its config.toml names this SuperLink as "test"."""
        home = self.tmp / "home_cli"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs["ca.crt"]}"\ninsecure = false\n'
        )
        return home

    def kill(self, name, sig=signal.SIGKILL):
        """Stop a process, its process group and every process below it: Flower starts its ServerApp and
        ClientApp processes in sessions of their own, so the group alone would leave them running."""
        proc = self.procs.pop(name)
        below = descendants(proc.pid)  # before the kill: orphans are re-parented and lost from the tree
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        signal_if_same(below, sig)
        try:
            proc.wait(timeout=30)
        finally:
            time.sleep(1)
            signal_if_same(below, signal.SIGKILL)  # whatever ignored SIGTERM

    def start_run(self, overrides, resume=False):
        """Start `flwr run` of this repository's app against the SuperLink (its output in run.log)."""
        home = self.cli_home()
        run_config = f"overrides={json.dumps(' '.join(shlex.quote(o) for o in overrides))} resume={str(resume).lower()}"
        argv = [os.path.join(BIN, "flwr"), "run", ROOT, "test", "--stream", "--run-config", run_config]
        log = open(self.tmp / "run.log", "ab")  # noqa: SIM115 (closed with the process)
        self.procs["run"] = subprocess.Popen(argv, env={**self.env, "FLWR_HOME": str(home)}, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def wait_run(self, timeout=600):
        """(exit code, output) of the run started by start_run."""
        code = self.procs.pop("run").wait(timeout=seconds(timeout))
        return code, (self.tmp / "run.log").read_text()

    def stop(self):
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)


@pytest.fixture
def deployment(tmp_path, request):
    d = Deployment(tmp_path, make_certificates(tmp_path), request.config.getoption("superlink_delay"))
    try:
        yield d
    finally:
        d.stop()


def tensors(path):
    return lora.read_adapter(str(path))[1]


def per_client(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {(r["round"], r["client"], r["adapters"]): (r["eval_loss"], r["exact_match"])
                for r in map(json.loads, f) if "client" in r}  # fmt: skip


def round_records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        keys = ("round", "clients", "status", "epsilon", "bytes_per_upload", "bytes_per_download", "fedavg_error_mean")
        return [{k: v for k, v in r.items() if k in keys}
                for r in map(json.loads, f) if "status" in r]  # fmt: skip


def test_a_site_killed_mid_round_is_left_out_and_rejoins(deployment, cache_dir, tmp_path):
    """Two warm sites; es's worker dies (SIGKILL, the worker alone) as round 1 starts: its SuperNode goes
    with it (it is told when its parent dies), and es is restarted. Round 1 waits at most
    federated.round_timeout, keeps fr's upload alone, and reports es failed; in round 2 the restarted es (a
    new node id) is found again and trains from its state-dir, which holds nothing of round 1."""
    out, state = tmp_path / "dep", tmp_path / "state"
    deployment.superlink()
    deployment.supernodes(["fr", "es"], state, warm=True)
    timeout = seconds(60)
    deployment.start_run(job(cache_dir, out, ["fr", "es"], round_timeout=timeout))
    deadline = time.time() + seconds(300)
    while not (out / "config.yaml").exists():  # written once every site answered: round 1 starts now
        assert time.time() < deadline and "run" in deployment.procs, (tmp_path / "run.log").read_text()
        time.sleep(0.5)
    time.sleep(3)
    worker = deployment.procs.pop("supernode_es")
    below = descendants(worker.pid)  # its SuperNode and any ClientApp
    supernode = [(pid, start) for pid, start in below if (stat(pid) or (0,))[0] == worker.pid]
    assert len(supernode) == 1, below
    worker.kill()
    worker.wait(timeout=30)
    deadline = time.time() + seconds(60)
    while any(stat(pid) is not None and stat(pid)[1] == start for pid, start in supernode):
        assert time.time() < deadline, "the SuperNode outlived its site's worker"
        time.sleep(0.5)
    signal_if_same(below, signal.SIGKILL)  # a ClientApp caught mid-message (its own monitor would stop it)
    deployment.site("es", state / "es")
    code, output = deployment.wait_run()
    assert code == 0, output
    rounds = {r["round"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "status" in r}
    assert rounds[1]["failed"] == ["es"] and rounds[1]["succeeded"] == 1 and rounds[1]["status"] == "ok"
    # within the timeout (plus polling): sooner when the SuperLink already reports es's node unavailable
    assert rounds[1]["seconds_train"] < timeout + seconds(40)
    assert {r["client"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r.get("round") == 2 and "client" in r} == {"fr", "es"}  # fmt: skip
    assert rounds[2]["failed"] == [] and rounds[2]["succeeded"] == 2
    assert not (state / "es/round_001").exists() and (state / "es/round_002/local").is_dir()
    assert "site es reconnected" in output


def test_a_poisoning_site_and_a_second_node_with_a_sites_name_are_left_out(
    deployment, cache_dir, tmp_path, capsys, monkeypatch
):
    """Three sites over TLS; es uploads NaN every round (tests/bad_site/sitecustomize.py, on its PYTHONPATH
    alone), and a fourth SuperNode claims to be fr (a copy of it: whichever of the two answers first is
    fr). Both rounds complete; es is left out of each, its reason on the round's line and in metrics.jsonl;
    the second fr is refused, naming both nodes; and every round's global adapter equals, bit for bit,
    the simulation's in which es never answered."""
    sim, dep, state = tmp_path / "sim", tmp_path / "dep", tmp_path / "state"
    real_fit = fl_client.Client.fit

    def absent(self, global_state, task):
        if self.name == "es":
            raise ConnectionError("no answer (simulated)")
        return real_fit(self, global_state, task)

    monkeypatch.setattr(fl_client.Client, "fit", absent)
    assert run_main(federated.main, [CONFIG, *job(cache_dir, sim, ["fr", "de", "es"])], capsys)[0] == 0
    monkeypatch.undo()
    deployment.superlink()
    deployment.supernode("es", state / "es", env={"PYTHONPATH": os.path.join(ROOT, "tests", "bad_site")})
    deployment.supernode("fr", state / "fr_copy", process="fr_copy")
    deployment.supernodes(["fr", "de"], state)
    deployment.wait_for("4 SuperNodes online", lambda: deployment.nodes_online() >= 4)
    deployment.start_run(job(cache_dir, dep, ["fr", "de", "es"]))
    code, output = deployment.wait_run()
    assert code == 0, output
    refused = [line for line in output.splitlines() if "refused as site fr: site fr is held by node" in line]
    assert refused and all("which is still connected" in line for line in refused), output
    for rnd in (1, 2):
        line = next(line for line in output.splitlines() if line.startswith(f"round {rnd}/2:"))
        assert "2/3 clients" in line and "left out es: " in line and "has NaN or Inf values" in line, line
    records = [r for r in map(json.loads, (dep / "metrics.jsonl").read_text().splitlines()) if "status" in r]
    assert [list(r["rejected"]) for r in records] == [["es"], ["es"]]
    for rnd in ("round_001", "round_002"):
        a, b = tensors(sim / rnd / "global"), tensors(dep / rnd / "global")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rnd


def peak_memory(line_prefix, text):
    """The last "peak memory N MiB" figure on the lines of `text` that start with line_prefix."""
    found = [line.rsplit("peak memory ", 1)[1].split()[0] for line in text.splitlines()
             if line.startswith(line_prefix) and "peak memory " in line]  # fmt: skip
    return float(found[-1]) if found else None


def vm_hwm(pid):
    """A live process's peak resident memory (VmHWM, /proc), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


@pytest.mark.slow
def test_eight_warm_sites_with_sampling_a_silent_site_and_a_late_one(deployment, cache_dir, tmp_path):
    """Eight warm sites over TLS, half sampled each round (federated.fraction=0.5), no list of sites
    (data.clients empty: the run's sites are those that answer). One is there but never answers (its
    training waits an hour: tests/bad_site, BAD_SITE=hang); one starts during round 1. Round 1 leaves the
    silent site out after federated.round_timeout and averages the other three; the late site joins at
    round 2 and trains; every site loads its base once. Prints each round's wall time and each process's
    peak memory (docs/flower.md)."""
    import fedavg

    out, state, data = tmp_path / "dep", tmp_path / "state", tmp_path / "data"
    data.mkdir()
    names = [f"s{i}" for i in range(1, 9)]
    demo = [json.loads(open(os.path.join(ROOT, "data/clients", f"{c}.json")).read()) for c in ("fr", "de", "es", "it")]
    for i, name in enumerate(names):  # half of one demo client's records each
        (data / f"{name}.json").write_text(json.dumps(demo[i // 2][(i % 2) * 30 : (i % 2) * 30 + 30]))
    first, late = names[:-1], names[-1]  # s8 joins last: the run's sites are then s1..s7, s8
    seed = next(s for s in range(100) if late in fedavg.sample_clients(names, 2, s, fraction=0.5))  # it trains
    silent = fedavg.sample_clients(first, 1, seed, fraction=0.5)[0]  # sampled in round 1
    timeout = seconds(90)  # the honest sites' answers, on two cores shared with the rest of the suite
    deployment.superlink()
    hang = {"PYTHONPATH": os.path.join(ROOT, "tests", "bad_site"), "BAD_SITE": "hang"}
    for name in first:
        deployment.site(name, state / name, env=hang if name == silent else None, data=str(data / f"{name}.json"))
    deployment.wait_for("7 SuperNodes online", lambda: deployment.nodes_online() >= 7)
    deployment.start_run(
        [*job(cache_dir, out, [], round_timeout=timeout), "federated.fraction=0.5", f"train.seed={seed}"]
    )
    deadline = time.time() + seconds(300)
    while not (out / "config.yaml").exists():  # round 1 starts now
        assert time.time() < deadline and deployment.procs["run"].poll() is None, (tmp_path / "run.log").read_text()
        time.sleep(0.5)
    deployment.site(late, state / late, data=str(data / f"{late}.json"))
    code, output = deployment.wait_run(timeout=900)
    assert code == 0, output
    records = C_read(out)
    rounds = {r["round"]: r for r in records if "status" in r}
    assert silent in rounds[1]["clients"] and rounds[1]["failed"] == [silent] and rounds[1]["succeeded"] == 3
    assert f"site {late} joined: sampled from round 2 on" in output
    assert late in rounds[2]["clients"] and late not in rounds[2]["failed"]
    assert {(r["round"], r["client"]) for r in records if "client" in r} >= {(2, late)}
    logs = {name: (tmp_path / f"supernode_{name}.log").read_text() for name in names}
    for name, log in logs.items():  # one base load per site, for every message it answered
        assert sum(" loaded in " in line for line in log.splitlines()) == 1, (name, log[-2000:])
    workers = {name: deployment.procs[f"supernode_{name}"].pid for name in names}
    supernodes = {name: [p for p, _ in descendants(w) if (stat(p) or (0,))[0] == w] for name, w in workers.items()}
    print(f"\n8 warm sites, tiny model, fraction 0.5, round_timeout {timeout}s; silent {silent}, late {late}")
    for rnd, r in rounds.items():
        sampled = ", ".join(r["clients"])
        print(f"round {rnd}: {r['seconds']:.1f}s (training {r['seconds_train']:.1f}s), sampled {sampled}")
    print(f"coordinator (ServerApp): peak {peak_memory('done;', output):.0f} MiB")
    for name in names:
        sn = f"{vm_hwm(supernodes[name][0]):.0f}" if supernodes[name] else "?"
        print(f"site {name}: worker peak {peak_memory(f'site {name}:', logs[name]):.0f} MiB, SuperNode peak {sn} MiB")


def C_read(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


EXTRA = {
    "fedavg": [],
    "dp": ["federated.dp_clip=0.05", "federated.dp_noise=0.8"],
    "fedsa": ["federated.aggregation=fedsa"],
}


@pytest.mark.parametrize("kind", list(EXTRA))
def test_deployment_over_tls_crashed_and_resumed_equals_the_simulation(kind, deployment, cache_dir, tmp_path, capsys):
    """Two sites over TLS. Round 1 runs as deployed; then the whole federation dies (SuperLink, ServerApp,
    SuperNodes: SIGKILL) during round 2. Restarted, with `resume=true` it continues after round 1. Every
    round's global adapter, the sites' local adapters and every evaluation equal the serial simulation's
    (bit for bit), and the coordinator never holds a local adapter. With client-level DP too: the sites
    clip, the ServerApp adds the round's noise and reports the same epsilon. With aggregation fedsa: the
    sites keep their own B in their state-dir, the coordinator only ever sees A."""
    sim, dep, state = tmp_path / "sim", tmp_path / "dep", tmp_path / "state"
    extra, dp = EXTRA[kind], kind == "dp"
    job_ = lambda out, sites: [*job(cache_dir, out, sites), *extra]  # noqa: E731
    assert run_main(federated.main, [CONFIG, *job_(sim, ["fr", "de"])], capsys)[0] == 0

    def start():
        deployment.superlink()
        deployment.supernodes(["fr", "de"], state, warm=True)

    start()
    deployment.start_run(job_(dep, ["fr", "de"]))
    deadline = time.time() + seconds(400)
    while not (dep / "round_001").exists():
        assert time.time() < deadline and deployment.procs["run"].poll() is None, (tmp_path / "run.log").read_text()
        time.sleep(0.5)
    for name in ("superlink", "supernode_fr", "supernode_de", "run"):
        deployment.kill(name)
    assert fl_server.completed_rounds(dep) == ["round_001"]
    deployment.port = free_port()
    start()
    deployment.start_run(job_(dep, ["fr", "de"]), resume=True)
    code, output = deployment.wait_run()
    assert code == 0 and "resumed after round_001" in output, output
    for rnd in ("round_001", "round_002"):
        a, b = tensors(sim / rnd / "global"), tensors(dep / rnd / "global")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rnd  # bit-identical
        for site in ("fr", "de"):  # the local adapters, kept at the sites, equal the simulation's
            a, b = tensors(sim / rnd / "clients" / site / "local"), tensors(state / site / rnd / "local")
            assert all(torch.equal(a[k], b[k]) for k in a), (rnd, site)
            if kind == "fedsa":  # the site's own B (beside the A it trained from; the simulation's: the new A)
                a = fedavg.AGGREGATIONS["fedsa"].split(tensors(sim / rnd / "clients" / site / "global"))[1]
                b = fedavg.AGGREGATIONS["fedsa"].split(tensors(state / site / rnd / "global"))[1]
                assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (rnd, site)
    assert per_client(sim) == per_client(dep)  # eval loss and exact match, every round, site and view
    assert not (dep / "round_002/clients").exists()  # the coordinator never holds a local adapter
    assert round_records(sim) == round_records(dep)  # the same clients, statuses and epsilon
    assert all(("epsilon" in r) == dp for r in round_records(dep))
    if kind == "fedsa":
        assert all(k.endswith("lora_A.weight") for k in tensors(dep / "round_002/global"))


@pytest.mark.parametrize("run_config, message", [
    ({"config": "nope.yaml"}, "nope.yaml: config file not found"),
    ({"overrides": "train.lrr=1"}, "unknown key train.lrr; did you mean train.lr?"),
    ({"overrides": "federated.round_timeout=0"}, "federated.round_timeout: must be > 0, got 0"),
    ({"overrides": "'unclosed"}, "run config overrides: No closing quotation"),
])  # fmt: skip
def test_bad_run_config_gives_one_clear_line(run_config, message, capsys):
    """Checked before the ServerApp touches the grid: one line, exit code 2, nothing written."""
    import types

    import flower_app

    with pytest.raises(SystemExit) as exit_info:
        flower_app.main(None, types.SimpleNamespace(run_config=run_config))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_the_app_ships_every_project_module_it_imports():
    """`flwr run .` packs only pyproject's fab-include: a module flower_app reaches that is not listed fails
    at every site with Flower's exit code 607, which only the slow deployments would show."""
    import ast

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        shipped = set(tomllib.load(f)["tool"]["flwr"]["app"]["fab-include"])
    ours = {n[:-3] for n in os.listdir(ROOT) if n.endswith(".py")}
    reached, todo = set(), ["flower_app"]
    while todo:
        name = todo.pop()
        reached.add(name)
        with open(os.path.join(ROOT, name + ".py")) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):  # top-level and function-level imports alike
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            todo += [n for n in names if n in ours and n not in reached and n not in todo]
    assert {f"/{n}.py" for n in reached} <= shipped, sorted({f"/{n}.py" for n in reached} - shipped)
