"""Warm sites and sites that come and go, through the ServerApp's own code (flower_app.run) with a stand-in
for Flower's Grid: each site's messages go through the ClientApp's functions, and with a worker, over its
Unix socket to a Site that stays loaded (flower_app.serve, in a thread here; tests/test_flower.py runs the
real site command). The references are the serial simulation (federated.main) and the cold ClientApp."""

import itertools
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest
import torch

import config as C
import federated
from conftest import run_main

flwr = pytest.importorskip("flwr")
import flower_app  # noqa: E402 (needs flwr)
from test_bad_sites import (  # noqa: E402 (the same sites, files, stand-in Grid and comparisons)
    SITES,
    StandInGrid,
    assert_bit_equal,
    global_adapters,
    round_records,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")
RUN_IDS = itertools.count(2000)  # a run id each: a Site is rebuilt when the run changes


def overrides(cache_dir, out_dir, listed, *extra):
    """A 2-round job on a fast float32 base; `listed`: the sites data.clients names (an empty list: none)."""
    return [f"model.cache_dir={cache_dir}", f"federated.output_dir={out_dir}", "federated.rounds=2",
            "federated.global_steps=1", "federated.local_steps=1", "federated.max_new_tokens=2",
            "train.batch_size=2", f"data.clients=[{','.join(listed)}]", "model.quantization=none",
            "model.compute_dtype=float32", "model.gradient_checkpointing=false", "lora.r=4",
            "data.max_seq_len=64", "federated.round_timeout=3", *extra]  # fmt: skip


class Grid(StandInGrid):
    """test_bad_sites' stand-in Grid (node i is a site whose messages go to flower_app's ClientApp
    functions) with only the nodes `online` connected; `joins` {round: [nodes]} are nodes that come online
    when that round's first training message is sent (a site that starts late)."""

    def __init__(self, contexts, online, joins=None):
        super().__init__(contexts)
        self.online, self.joins = list(online), joins or {}

    def get_nodes(self):
        return [n for n in super().get_nodes() if n.node_id in self.online]

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == "train":
                self.online += self.joins.pop(int(msg.content["task"]["round"]), [])
        return super().send_and_receive([m for m in messages if m.metadata.dst_node_id in self.online])


@pytest.fixture
def workers():
    """Start a warm Site per (name, data file, state-dir) in a thread (flower_app.serve on its socket);
    returns {name: Site} and its node config; every thread stopped at the end."""
    stop, threads, sites = threading.Event(), [], {}

    def start(name, data_file, state_dir):
        os.makedirs(state_dir, exist_ok=True)
        path = os.path.join(state_dir, "site.sock")
        sites[name] = flower_app.Site(name, data_file, state_dir)
        listener = flower_app.listen(path)
        t = threading.Thread(target=flower_app.serve, args=(sites[name], listener, lambda: not stop.is_set()))
        t.start()
        threads.append((t, listener))
        return {"client": name, "data-file": data_file, "state-dir": state_dir, "worker": path}

    yield start, sites
    stop.set()
    for t, listener in threads:
        t.join(timeout=10)
        listener.close()


def serverapp(cache_dir, out_dir, client_files, monkeypatch, node_config, *extra, listed=SITES, late=None, joins=None):
    """flower_app.run over a Grid of the sites (node i+1: SITES[i]); `late` sites come online at the
    round `joins` says. Returns the run's output lines."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    run_id = next(RUN_IDS)
    for attr, value in (("_run_id", run_id), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    files = [client_files[s] for s in listed]
    run_config = {"config": CONFIG, "overrides": " ".join(overrides(cache_dir, out_dir, files, *extra))}
    contexts = {
        i + 1: Context(run_id, i + 1, node_config(s, client_files[s], str(out_dir.parent / f"state_{s}")),
                       RecordDict(), run_config)
        for i, s in enumerate(SITES)
    }  # fmt: skip
    late = late or []
    online = [i for i, s in enumerate(SITES, 1) if s not in late]
    grid = Grid(contexts, online, {rnd: [SITES.index(s) + 1 for s in late] for rnd in [joins]} if late else None)
    flower_app.run(grid, Context(run_id, 0, {}, RecordDict(), run_config))
    return online


def cold(name, data_file, state_dir):
    return {"client": name, "data-file": data_file, "state-dir": state_dir}


def test_warm_sites_load_the_base_once_and_equal_the_simulation(
    cache_dir, client_files, tmp_path, capsys, monkeypatch, workers
):
    """Every message of the run goes through each site's worker (1 query, 2 trainings, 2 evaluations), the
    base is loaded once per site, and every round's global adapter and evaluation equal the simulation's
    bit for bit, train.batch_size=auto resolved at the sites as in the simulation."""
    files = [client_files[s] for s in SITES]
    sim = tmp_path / "sim" / "out"
    argv = [CONFIG, *overrides(cache_dir, sim, files, "train.batch_size=auto")]
    assert run_main(federated.main, argv, capsys)[0] == 0
    start, sites = workers
    dep = tmp_path / "dep" / "out"
    serverapp(cache_dir, dep, client_files, monkeypatch, start, "train.batch_size=auto")
    assert_bit_equal(global_adapters(dep), global_adapters(sim))
    metrics = lambda out: {(r["round"], r["client"], r["adapters"]): (r["eval_loss"], r["exact_match"])  # noqa: E731
                           for r in C.read_jsonl(os.path.join(out, "metrics.jsonl")) if "client" in r}  # fmt: skip
    assert metrics(dep) == metrics(sim)
    assert {s: (site.loads, site.answered) for s, site in sites.items()} == {s: (1, 5) for s in SITES}
    assert all(site.client.cfg["train"]["batch_size"] == 16 for site in sites.values())  # auto, resolved
    out = capsys.readouterr()[0]
    assert ": base loaded once, 5 messages answered; peak memory" in out and "peak memory" in out
    assert "the coordinator's peak memory" in out


def test_a_site_no_list_names_joins_at_round_2(cache_dir, client_files, tmp_path, capsys, monkeypatch, workers):
    """With no list of sites (data.clients empty, no federated.sites) the run starts with the sites there;
    es, started during round 1, joins at round 2, is sampled from then on, and is kept in the run's
    sites (server.pt) so that a resumed run samples as the first part did."""
    start, sites = workers
    out = tmp_path / "dep" / "out"
    serverapp(cache_dir, out, client_files, monkeypatch, start, listed=(), late=["es"], joins=1)
    printed = capsys.readouterr()[0]
    assert "2 sites (de, fr)" in printed and "site es joined: sampled from round 2 on" in printed
    r = round_records(out)
    assert r[1]["clients"] == ["de", "fr"] and r[2]["clients"] == ["de", "fr", "es"] and r[2]["failed"] == []
    evaluated = {(x["round"], x["client"]) for x in C.read_jsonl(os.path.join(out, "metrics.jsonl")) if "client" in x}
    assert ("es", 1) not in {(c, n) for n, c in evaluated} and (2, "es") in evaluated
    state = torch.load(os.path.join(out, "round_002", "server.pt"), weights_only=True)
    assert state["clients"] == ["de", "fr", "es"] and sites["es"].loads == 1


def test_a_listed_site_absent_at_the_start_fails_its_rounds_until_it_connects(
    cache_dir, client_files, tmp_path, capsys, monkeypatch
):
    """data.clients names es, which is not there when the run starts: the run waits federated.round_timeout
    for it, starts without it, names it; es fails round 1 ("not connected") and trains in round 2."""
    out = tmp_path / "dep" / "out"
    serverapp(cache_dir, out, client_files, monkeypatch, cold, late=["es"], joins=1)
    printed = capsys.readouterr()[0]
    assert "not connected after 3s: es" in printed and "client es failed in round 1: not connected" in printed
    r = round_records(out)
    assert r[1]["failed"] == ["es"] and r[1]["succeeded"] == 2 and r[2]["failed"] == [] and r[2]["succeeded"] == 3


# ----------------------------------------------------------------------------------------------------
# The worker's channel


def test_a_failing_request_is_answered_with_its_error_and_the_worker_goes_on(tmp_path, workers, client_files):
    start, sites = workers
    node = start("fr", client_files["fr"], str(tmp_path / "fr"))
    with pytest.raises(RuntimeError, match=r"site worker: ValueError: unknown message type 'dance'"):
        flower_app.ask_worker(node["worker"], ("dance", 1, C.load_config(CONFIG, []), {}, {}))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # a ClientApp of another version
        sock.connect(node["worker"])
        flower_app.write_frame(sock, (99, "query", 1, {}, {}, {}))
        status, why = flower_app.read_frame(sock)
    assert status == "error" and "protocol 99" in why and "update the site" in why
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # not even a frame: the worker goes on
        sock.connect(node["worker"])
        sock.sendall(b"\x00\x00\x00\x00\x00\x00\x00\x05junk!")
        assert flower_app.read_frame(sock)[0] == "error"
    with pytest.raises(RuntimeError, match="unknown message type"):  # still answering
        flower_app.ask_worker(node["worker"], ("dance", 1, C.load_config(CONFIG, []), {}, {}))


def test_the_socket_is_the_owners_alone_and_one_site_per_state_dir(tmp_path, workers, client_files):
    start, _ = workers
    node = start("fr", client_files["fr"], str(tmp_path / "fr"))
    assert stat.S_IMODE(os.stat(node["worker"]).st_mode) == 0o600
    with pytest.raises(C.ConfigError, match="a site is already running there"):
        flower_app.listen(node["worker"])
    stale = tmp_path / "stale.sock"  # left by a killed worker: nothing answers, so it is replaced
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    flower_app.listen(str(stale)).close()
    with pytest.raises(C.ConfigError, match="too long a path for a Unix socket"):
        flower_app.listen(str(tmp_path / ("x" * 100) / "site.sock"))
    with pytest.raises(ConnectionError, match="does not answer"):
        flower_app.ask_worker(str(tmp_path / "none.sock"), ("query", 1, {}, {}, {}))


@pytest.mark.parametrize("args, message", [
    (["--client", "fr", "--data-file", "nope.json", "--state-dir", "{tmp}/s"], "--data-file: nope.json: no such file"),
    (["--client", "fr", "--data-file", "{data}", "--state-dir", "{tmp}/s", "--node-config", "x=1"],
     "--node-config: set by this command"),
])  # fmt: skip
def test_the_site_command_refuses_bad_input_in_one_line(args, message, tmp_path, client_files):
    argv = [a.format(tmp=tmp_path, data=client_files["fr"]) for a in args]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "flower_app.py"), *argv], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


def test_a_global_state_crosses_as_one_array_per_dtype_and_a_bad_layout_is_refused():
    """packed/unpacked: every tensor back as it was (dtype, shape, values), and a layout that disagrees with
    its arrays raises (the reply is then refused as malformed, never read wrongly)."""
    from flwr.app import ConfigRecord, RecordDict

    state = {"b.lora_A.weight": torch.randn(3, 4), "a.lora_B.weight": torch.randn(4, 3), "n": torch.arange(5)}
    content = RecordDict(flower_app.packed(state))
    assert sorted(content["global"]) == ["float32", "int64"]  # two arrays, not three
    got = flower_app.unpacked(content)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    assert flower_app.unpacked(RecordDict(flower_app.packed({}))) == {}  # stack's first round
    layout = dict(content["global-layout"])
    for change, message in [
        ({"shapes": ["3,4", "4,3", "6"]}, "too short"),
        ({"shapes": ["3,4", "4,3", "4"]}, "longer than the layout"),
        ({"keys": layout["keys"][:2]}, "a layout of 2 keys, 3 shapes"),
    ]:
        bad = RecordDict({"global": content["global"], "global-layout": ConfigRecord({**layout, **change})})
        with pytest.raises(ValueError, match=message):
            flower_app.unpacked(bad)
    float64 = ConfigRecord({**layout, "dtypes": ["float64"] * 3})  # no such array
    with pytest.raises(KeyError):
        flower_app.unpacked(RecordDict({"global": content["global"], "global-layout": float64}))
