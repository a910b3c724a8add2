"""One bad site cannot crash, poison or impersonate: every reply is checked before it is averaged.

Each misbehaviour is a real site's reply, altered (NaN, Inf, a 1e6-times update, a missing key, a wrong
shape, an integer dtype, an inflated example count, an evaluation reply without its metrics, a second
node claiming a site's name). The federation completes every round, names the site with its reason, and
its global adapter equals, bit for bit, the run in which that site simply did not answer. Run through the
simulation (federated.main) and through the ServerApp's own code (flower_app.run) with a stand-in for
Flower's Grid that delivers the ClientApp's real replies.
"""

import itertools
import os
import shlex

import pytest
import torch

import client as fl_client
import config as C
import federated
import lora
import server as fl_server
from conftest import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")
SITES = ("fr", "de", "es")
BAD = "es"
KINDS = ("nan", "inf", "huge", "missing_key", "wrong_shape", "int_dtype", "inflated_count")
REASONS = {  # what the round's line and metrics.jsonl say of each
    "nan": "has NaN or Inf values",
    "inf": "has NaN or Inf values",
    "huge": "> federated.max_update_norm=1000",
    "missing_key": "upload lacks 1 of the",
    "wrong_shape": "has shape",
    "int_dtype": "is int64, not float32",
    "inflated_count": "claims 1000000000000 training examples, but declared",
}


def overrides(cache_dir, out_dir, client_files):
    files = ",".join(client_files[s] for s in SITES)
    return [
        f"model.cache_dir={cache_dir}",
        f"federated.output_dir={out_dir}",
        "federated.rounds=2",
        "federated.mode=global_only",
        "federated.global_steps=1",
        "federated.max_new_tokens=2",
        "federated.max_update_norm=1000",
        "federated.round_timeout=3",  # the stand-in answers at once; a dropped reply is waited for this long
        "train.batch_size=2",
        f"data.clients=[{files}]",
        "model.quantization=none",
        "model.compute_dtype=float32",
        "model.gradient_checkpointing=false",
        "lora.r=4",
        "data.max_seq_len=64",
    ]  # fmt: skip (the checks are the same on any base: a fast one)


def alter(kind, upload, received, n):
    """A real training reply (upload, sample count), made bad in the way `kind` names."""
    upload = dict(upload)
    key = sorted(upload)[0]
    if kind in ("nan", "inf"):
        t = upload[key].clone()
        t.view(-1)[0] = float(kind)
        upload[key] = t
    elif kind == "huge":  # the same direction, a million times as far
        upload = {k: received[k] + (v - received[k]) * 1e6 for k, v in upload.items()}
    elif kind == "missing_key":
        del upload[key]
    elif kind == "wrong_shape":
        upload[key] = upload[key][:-1]
    elif kind == "int_dtype":
        upload[key] = upload[key].round().long()
    elif kind == "inflated_count":
        n = 10**12
    return upload, n


def global_adapters(out_dir):
    """Every round's global adapter tensors, by round directory."""
    return {d: lora.read_adapter(os.path.join(out_dir, d, "global"))[1] for d in ("round_001", "round_002")}


def assert_bit_equal(a, b):
    assert a.keys() == b.keys()
    for rnd in a:
        assert a[rnd].keys() == b[rnd].keys()
        assert all(torch.equal(a[rnd][k], b[rnd][k]) for k in a[rnd]), rnd


def round_records(out_dir):
    return {r["round"]: r for r in C.read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if "status" in r}


# ----------------------------------------------------------------------------------------------------
# The checks themselves, on tiny tensors


def tiny_server(*extra):
    cfg = C.load_config(CONFIG, ["federated.max_update_norm=10", *extra])
    initial = {"l.lora_A.weight": torch.randn(2, 3), "l.lora_B.weight": torch.zeros(4, 2)}
    return fl_server.Server(cfg, ["a", "b"], initial, {"a": 5, "b": 7}), initial


@pytest.mark.parametrize("kind", KINDS)
def test_each_bad_upload_is_refused_with_its_reason(kind):
    server, initial = tiny_server()
    good = {k: v + 0.01 for k, v in initial.items()}
    assert server.check("b", good, 7, 0.5) == (None, pytest.approx(0.01 * 14**0.5))
    upload, n = alter(kind, good, initial, 7)
    why, _ = server.check("b", upload, n, 0.5)
    assert why and REASONS[kind].replace("max_update_norm=1000", "max_update_norm=10") in why


def test_dp_refuses_a_nan_upload_before_its_bound_and_an_unclipped_one():
    """Under DP, NaN > S is False: a NaN upload would pass a bound check; it is refused before it. An
    upload farther than dp_clip (not clipped) is refused, where fedavg.dp_mean would raise."""
    server, initial = tiny_server("federated.dp_clip=0.5", "federated.dp_noise=1.0")
    nan = {k: v.clone() for k, v in initial.items()}
    nan["l.lora_B.weight"][0, 0] = float("nan")
    assert "NaN or Inf" in server.check("a", nan, 5, 0.1)[0]
    far = {k: v + 1.0 for k, v in initial.items()}
    assert "> federated.dp_clip=0.5: not clipped" in server.check("a", far, 5, 0.1)[0]
    near = {k: v + 0.01 for k, v in initial.items()}
    assert server.aggregate(1, ["a", "b"], {"a": (nan, 5, 0.1), "b": (near, 7, 0.1), "c": (far, 1, 0.1)}, [])
    assert server.report["rejected"].keys() == {"a", "c"} and server.report["succeeded"] == 1
    assert all(torch.isfinite(t).all() for t in server.global_state.values())


def test_weighting_uniform_gives_every_site_one_vote():
    for weighting, want in (("examples", (5 * 1.0 + 7 * 3.0) / 12), ("uniform", 2.0)):
        server, initial = tiny_server(f"federated.weighting={weighting}", "federated.max_update_norm=0")
        ups = {c: ({k: v + d for k, v in initial.items()}, n, 0.0) for c, d, n in (("a", 1.0, 5), ("b", 3.0, 7))}
        server.aggregate(1, ["a", "b"], ups, [])
        got = server.global_state["l.lora_B.weight"]
        assert torch.allclose(got, torch.full_like(got, want))


def test_an_evaluation_reply_without_its_metrics_is_refused():
    good = {"eval_loss": 1.0, "exact_match": 0.5, "n": 4}
    assert fl_server.check_metrics({"global": good}, ["global"]) is None
    assert "no metrics for view local" in fl_server.check_metrics({"global": good}, ["global", "local"])
    bad = {"eval_loss": 1.0, "n": 4}
    assert "exact_match is None" in fl_server.check_metrics({"global": bad}, ["global"])
    assert "not a finite number" in fl_server.check_metrics({"global": {**good, "eval_loss": float("nan")}}, ["global"])


# ----------------------------------------------------------------------------------------------------
# The simulation: Client.fit's real reply, altered for one site


def simulate(cache_dir, out_dir, client_files, capsys, monkeypatch, kind=None):
    """federated.main with site es behaving as `kind` says: None honest, "absent" raising (no reply)."""
    real_fit, real_evaluate = fl_client.Client.fit, fl_client.Client.evaluate

    def fit(self, global_state, task):
        if self.name == BAD and kind == "absent":
            raise ConnectionError("site unreachable (simulated)")
        upload, n, loss = real_fit(self, global_state, task)
        if self.name == BAD and kind in KINDS:
            upload, n = alter(kind, upload, global_state, n)
        return upload, n, loss

    def evaluate(self, global_state, conflicts=frozenset()):
        rows = real_evaluate(self, global_state, conflicts)
        if self.name == BAD and kind == "no_eval_metrics":
            rows = {view: {k: v for k, v in m.items() if k != "exact_match"} for view, m in rows.items()}
        return rows

    monkeypatch.setattr(fl_client.Client, "fit", fit)
    monkeypatch.setattr(fl_client.Client, "evaluate", evaluate)
    code, stdout, err = run_main(federated.main, [CONFIG, *overrides(cache_dir, out_dir, client_files)], capsys)
    monkeypatch.undo()
    assert code == 0, err
    return stdout


def references(run, out, cache_dir, client_files):
    """The global adapters of the honest run and of the run where es never answers, through `run`
    (simulate or deploy), each run in a folder of `out`."""
    refs, mp = {}, pytest.MonkeyPatch()
    for kind in ("honest", "absent"):
        run(cache_dir, out / kind, client_files, _NoCapture(), mp, kind)
        refs[kind] = global_adapters(out / kind)
    return refs


@pytest.fixture(scope="module")
def simulated_references(cache_dir, client_files, tmp_path_factory):
    return references(simulate, tmp_path_factory.mktemp("sim_refs"), cache_dir, client_files)


class _NoCapture:
    """capsys for a module fixture: run_main reads and resets it; nothing to check here."""

    def readouterr(self):
        return "", ""


# ----------------------------------------------------------------------------------------------------
# The ServerApp's own code (flower_app.run) with a stand-in Grid that delivers the ClientApp's replies

flwr = pytest.importorskip("flwr")
MESSAGE_IDS = itertools.count()
RUN_IDS = itertools.count(1000)  # a run id each: flower_app caches each run's sites


class StandInGrid:
    """Flower's Grid, in process: each node is a site (a Context with its node config) whose messages go
    straight to flower_app's ClientApp functions; `bad` alters one node's replies, `silent` drops them."""

    def __init__(self, contexts, bad=None, kind=None, keys=None):
        self.contexts, self.bad, self.kind, self.keys = contexts, bad, kind, keys or {}

    def get_node_ids(self):
        return list(self.contexts)

    def get_nodes(self):  # as the SuperLink lists them: each node's key (PEM) as registered
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=i, public_key=self.keys.get(i, b"")) for i in self.contexts]

    def push_messages(self, messages):  # answered at once, in process; pull_messages hands the replies over
        messages = list(messages)
        self.pending = getattr(self, "pending", []) + list(self.send_and_receive(messages))
        return [f"m{next(MESSAGE_IDS)}" for _ in messages]

    def pull_messages(self, message_ids):
        replies, self.pending = self.pending, []
        return replies

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Message, RecordDict

        import flower_app

        handlers = {"query": flower_app.query, "train": flower_app.fit, "evaluate": flower_app.evaluate}
        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            reply = handlers[kind](msg, self.contexts[node])
            if node == self.bad and kind == "train":
                if self.kind == "absent":
                    continue
                if self.kind in KINDS:
                    content = reply.content
                    received = flower_app.unpacked(msg.content)
                    upload, n = alter(
                        self.kind, flower_app.unpacked(content), received, content["metrics"]["num-examples"]
                    )
                    content["metrics"]["num-examples"] = n
                    reply = Message(
                        RecordDict({**flower_app.packed(upload), "metrics": content["metrics"]}), reply_to=msg
                    )
            if node == self.bad and kind == "evaluate" and self.kind == "no_eval_metrics":
                for m in reply.content.metric_records.values():
                    del m["exact_match"]
            replies.append(reply)
        return replies


def deploy(cache_dir, out_dir, client_files, capsys, monkeypatch, kind=None, extra=()):
    """flower_app.run over a StandInGrid of the three sites (nodes 1, 2, 3 = fr, de, es), es behaving as
    `kind` says; "second_fr": a fourth node (4) claims to be fr; "roster": so does node 0, listed first,
    and federated.sites names the keys of nodes 1, 2, 3. Returns what it printed."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import flower_app

    run_id = next(RUN_IDS)
    for attr, value in (("_run_id", run_id), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    keys, extra = {}, list(extra)
    if kind == "roster":  # an OpenSSH key pair per node; the roster holds the public halves of 1, 2, 3
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        roster = {}
        for node in range(5):
            public = ec.generate_private_key(ec.SECP384R1()).public_key()
            pem = serialization.PublicFormat.SubjectPublicKeyInfo
            keys[node] = public.public_bytes(serialization.Encoding.PEM, pem)
            (out_dir / f"node{node}.pub").parent.mkdir(parents=True, exist_ok=True)
            openssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            (out_dir / f"node{node}.pub").write_bytes(openssh)
            if 1 <= node <= 3:
                roster[SITES[node - 1]] = str(out_dir / f"node{node}.pub")
        extra.append(shlex.quote("federated.sites={" + ", ".join(f"{k}: {v}" for k, v in roster.items()) + "}"))
    run_config = {"config": CONFIG, "overrides": " ".join([*overrides(cache_dir, out_dir, client_files), *extra])}
    sites = [*SITES, "fr"] if kind == "second_fr" else SITES
    node_config = lambda i, s: {"client": s, "data-file": client_files[s], "state-dir": str(out_dir / f"s{i}")}  # noqa: E731
    contexts = {i + 1: Context(run_id, i + 1, node_config(i, s), RecordDict(), run_config) for i, s in enumerate(sites)}
    if kind == "roster":  # node 0 first: without the roster, it would be fr
        contexts = {0: Context(run_id, 0, node_config(0, "fr"), RecordDict(), run_config), **contexts}
    grid = StandInGrid(contexts, bad=SITES.index(BAD) + 1, kind=kind, keys=keys)
    flower_app.run(grid, Context(run_id, 0, {}, RecordDict(), run_config))
    monkeypatch.undo()
    return capsys.readouterr()[0]


@pytest.fixture(scope="module")
def deployed_references(cache_dir, client_files, tmp_path_factory):
    return references(deploy, tmp_path_factory.mktemp("flower_refs"), cache_dir, client_files)


def test_the_deployment_starts_where_the_simulation_does(simulated_references, deployed_references):
    """The coordinator builds the initial global adapter from the config; the rounds then equal the
    simulation's, honest or with es absent."""
    for kind in ("honest", "absent"):
        assert_bit_equal(deployed_references[kind], simulated_references[kind])


DRIVERS = {"simulation": (simulate, "simulated_references"), "serverapp": (deploy, "deployed_references")}


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_site_is_left_out(driver, kind, cache_dir, client_files, tmp_path, capsys, monkeypatch, request):
    """Through the simulation and through the ServerApp alike (one check serves both)."""
    run, references = DRIVERS[driver][0], request.getfixturevalue(DRIVERS[driver][1])
    stdout = run(cache_dir, tmp_path / "run", client_files, capsys, monkeypatch, kind)
    for rnd, record in round_records(tmp_path / "run").items():
        assert REASONS[kind] in record["rejected"][BAD] and record["succeeded"] == 2
        assert f"round {rnd}/2: 2/3 clients" in stdout and f"left out {BAD}: " in stdout
    assert_bit_equal(global_adapters(tmp_path / "run"), references["absent"])


@pytest.mark.parametrize("driver", DRIVERS)
def test_an_evaluation_reply_without_metrics_is_left_out(
    driver, cache_dir, client_files, tmp_path, capsys, monkeypatch, request
):
    run, references = DRIVERS[driver][0], request.getfixturevalue(DRIVERS[driver][1])
    run(cache_dir, tmp_path / "run", client_files, capsys, monkeypatch, "no_eval_metrics")
    for record in round_records(tmp_path / "run").values():
        assert record["rejected"] == {BAD: "evaluation: global exact_match is None, not a finite number"}
    rows = [r for r in C.read_jsonl(tmp_path / "run" / "metrics.jsonl") if "client" in r]
    assert {r["client"] for r in rows} == {"fr", "de"}
    assert_bit_equal(global_adapters(tmp_path / "run"), references["honest"])


def test_serverapp_refuses_a_second_node_claiming_a_site(
    deployed_references, cache_dir, client_files, tmp_path, capsys, monkeypatch
):
    stdout = deploy(cache_dir, tmp_path / "run", client_files, capsys, monkeypatch, "second_fr")
    assert "node 4 refused as site fr: site fr is held by node 1, which is still connected" in stdout
    assert "3 sites (fr, de, es)" in stdout
    assert_bit_equal(global_adapters(tmp_path / "run"), deployed_references["honest"])


def test_with_a_roster_a_node_is_the_site_its_key_says(
    deployed_references, cache_dir, client_files, tmp_path, capsys, monkeypatch
):
    """federated.sites binds each name to a registered key: node 0, whose key is in no roster line, claims
    fr before fr's own node answers, and is refused; the run is the honest one."""
    stdout = deploy(cache_dir, tmp_path / "run", client_files, capsys, monkeypatch, "roster")
    assert "node 0 refused as site fr: its key is not in federated.sites" in stdout
    assert "3 sites (fr, de, es)" in stdout
    assert_bit_equal(global_adapters(tmp_path / "run"), deployed_references["honest"])


def test_a_bad_roster_key_file_is_one_line(tmp_path):
    import flower_app

    (tmp_path / "bad.pub").write_text("not a key")
    with pytest.raises(C.ConfigError, match=r"federated.sites: .*bad.pub: not a readable OpenSSH public key"):
        flower_app.pem_key(str(tmp_path / "bad.pub"))
