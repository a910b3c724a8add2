"""federated.py: the round loop, its metrics, failing clients, checkpoints and exact resume."""

import json
import math
import os

import pytest
import torch

import client as fl_client
import config as C
import data as D
import fedavg
import federated
import lora
import prepare
import server as fl_server
import trainer
from conftest import run_main, tiny_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")
CLIENTS = [os.path.join(ROOT, "data/clients", f"{c}.json") for c in ("fr", "de", "es")]


def small_run(cache_dir, out_dir, *extra):
    """Three demo clients, two rounds of a few steps each."""
    return [
        CONFIG,
        f"model.cache_dir={cache_dir}",
        f"federated.output_dir={out_dir}",
        "federated.rounds=2",
        "federated.local_steps=2",
        "federated.global_steps=2",
        "federated.max_new_tokens=4",
        "train.batch_size=4",
        f"data.clients=[{', '.join(CLIENTS)}]",
        *extra,
    ]


def events(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def adapter_tensors(path):
    return lora.read_adapter(str(path))[1]


def assert_same_adapter(a, b):
    a, b = adapter_tensors(a), adapter_tensors(b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def uneven_clients(tmp_path, sizes=(("fr", 192), ("de", 100), ("es", 60))):
    """Demo client files cut to different sizes, so that sample-count weights differ from uniform ones."""
    d = tmp_path / "clients"
    d.mkdir()
    for name, n in sizes:
        records = json.loads(open(os.path.join(ROOT, "data/clients", f"{name}.json")).read())[:n]
        (d / f"{name}.json").write_text(json.dumps(records))
    return f"data.clients=[{', '.join(str(d / f'{name}.json') for name, _ in sizes)}]"


def server_step(kind, lr, x, avg, saved):
    """Reddi et al.'s server update (Algorithm 2, no bias correction) in float64, from last round's saved
    buffers: the reference for fedavg.ServerOptimizer (momentum 0.9; betas 0.9, 0.99; eps 1e-3)."""
    assert (saved["momentum"], saved["beta1"], saved["beta2"], saved["eps"]) == (0.9, 0.9, 0.99, 1e-3)
    new = {}
    for k in x:
        delta, m = x[k] - avg[k], saved["m"][k].double()
        if kind == "fedavgm":
            new[k] = x[k] - lr * (0.9 * m + delta)
        else:
            m, v = 0.9 * m + 0.1 * delta, 0.99 * saved["v"][k].double() + 0.01 * delta**2
            new[k] = x[k] - lr * m / (v.sqrt() + 1e-3)
    return new


def test_demo_run_metrics_and_checkpoints(cache_dir, tmp_path, capsys):
    out = tmp_path / "fed"
    code, stdout, err = run_main(federated.main, small_run(cache_dir, out, "train.keep_checkpoints=1"), capsys)
    assert code == 0, err
    assert fl_server.completed_rounds(out) == ["round_002"]  # round_001 pruned
    records = events(out)
    per_client = [r for r in records if "client" in r]
    assert {(r["round"], r["client"], r["adapters"]) for r in per_client} == {
        (rnd, c, v) for rnd in (1, 2) for c in ("fr", "de", "es") for v in ("global", "local", "global+local")
    }
    for r in per_client:
        assert {"eval_loss", "exact_match", "n", "conflict_exact_match", "n_conflict"} <= r.keys()
        assert 0 <= r["exact_match"] <= 1 and r["n"] == 19 and r["n_conflict"] > 0
    rounds = [r for r in records if "uploaded_bytes" in r]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["status"] == "ok" for r in rounds)
    # one upload: r (in + out) fp32 numbers per adapted layer: q, k, v, o, gate, up, down in each block
    c = json.loads(open(os.path.join(tiny_dir(cache_dir), "config.json")).read())
    h, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, c["intermediate_size"]), (h, c["intermediate_size"]),
              (c["intermediate_size"], h)]  # fmt: skip
    one_upload = c["num_hidden_layers"] * sum(16 * (i + o) * 4 for i, o in shapes)  # lora.r = 16
    assert rounds[0]["uploaded_bytes"] == 3 * one_upload and rounds[0]["clients"] == ["fr", "de", "es"]
    assert rounds[0]["train_loss"] > 0 and "conflict_exact_match_global+local" in rounds[0]
    assert "global+local EM/loss" in stdout and "conflicting prompts, exact match" in stdout
    assert sorted(os.listdir(out / "round_002")) == ["clients", "config.yaml", "global", "server.pt"]
    assert sorted(os.listdir(out / "round_002/clients")) == ["de", "es", "fr"]
    cfg = json.loads((out / "round_002/clients/fr/local/adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"  # PEFT format, like every adapter we write


@pytest.mark.parametrize("mode, server", [("alternating", "fedavgm"), ("joint", "fedadam")])
def test_a_round_equals_an_independent_replay(mode, server, cache_dir, tmp_path, capsys):
    """Round 2 replayed outside federated.main from what round 1 saved: each sampled client trained on its
    own (same seeds, its local adapter and optimizer state from round_001), the uploads averaged by sample
    count in float64 and passed through the server optimizer by hand. The run's round_002 must equal it;
    the client left out of round 2 (fraction 0.67 of 3) keeps its local adapter and optimizer untouched."""
    out = tmp_path / "fed"
    argv = small_run(cache_dir, out, uneven_clients(tmp_path), "federated.fraction=0.67", f"federated.mode={mode}",
                     f"federated.server_optimizer={server}", "federated.server_lr=0.5")  # fmt: skip
    code, _, err = run_main(federated.main, argv, capsys)
    assert code == 0, err
    cfg = C.load_config(argv[0], argv[1:])
    seed, dc = cfg["train"]["seed"], cfg["data"]
    summaries = {r["round"]: r for r in events(out) if "uploaded_bytes" in r}
    sampled = summaries[2]["clients"]
    assert len(sampled) == 2 and sampled == fedavg.sample_clients(["fr", "de", "es"], 2, seed, fraction=0.67)

    prepare.seed_everything(seed)
    model, tok, base, device, dtype = C.load_base(cfg)
    prepare.add_adapters(model, cfg["lora"], ["global", "local"])
    collate = trainer.collator(model, tok.pad_token_id, dc["packing"], dc["max_seq_len"])
    run = prepare.Run(model, tok, base, device, dtype, {}, collate, cfg["train"]["batch_size"])
    clients = prepare.client_records(cfg)
    r1, r2 = out / "round_001", out / "round_002"
    x1 = adapter_tensors(r1 / "global")
    lr = trainer.lr_at(1, 2, 0, cfg["train"]["lr"], cfg["train"]["min_lr_ratio"])  # round 2 of 2, no warmup
    uploads, counts = [], []
    for i, c in enumerate(sampled):
        examples = D.tokenize_records(tok, clients[c][0], dc["max_seq_len"], dc["system_prompt"], dc["train_on"])
        lora.load_adapter_state_dict(model, x1, "global")
        lora.load_adapter_state_dict(model, adapter_tensors(r1 / "clients" / c / "local"), "local")
        opt = r1 / "clients" / c / "local_optimizer.pt"
        local_opt = torch.load(opt, weights_only=True) if opt.exists() else None
        torch.manual_seed(seed * 1_000_003 + 2 * 1009 + i)  # the task's seeds (Server.tasks)
        fl_client.client_update(run, cfg, examples, lr, seed * 1009 + 2 * 31 + i, local_opt)
        uploads.append({k: v.double() for k, v in lora.adapter_state_dict(model, "global").items()})
        counts.append(len(examples))
        local = adapter_tensors(r2 / "clients" / c / "local")  # the client's own adapter moved on, as replayed
        assert all(torch.equal(local[k], v) for k, v in lora.adapter_state_dict(model, "local").items()), c
    assert len(set(counts)) == 2  # uneven: a uniform average would differ
    avg = {k: sum(n * u[k] for n, u in zip(counts, uploads, strict=True)) / sum(counts) for k in x1}
    saved = torch.load(r1 / "server.pt", weights_only=True)["server_optimizer"]
    expected = server_step(server, 0.5, {k: v.double() for k, v in x1.items()}, avg, saved)
    x2 = adapter_tensors(r2 / "global")
    assert x2.keys() == expected.keys()
    for k in x2:
        torch.testing.assert_close(x2[k].double(), expected[k], rtol=1e-5, atol=1e-6, msg=k)
    (left_out,) = {"fr", "de", "es"} - set(sampled)
    assert_same_adapter(r1 / "clients" / left_out / "local", r2 / "clients" / left_out / "local")
    opts = [r / "clients" / left_out / "local_optimizer.pt" for r in (r1, r2)]
    assert opts[0].exists() == opts[1].exists() == (mode == "alternating" and left_out in summaries[1]["clients"])
    if opts[0].exists():
        a, b = (torch.load(p, weights_only=True)["state"] for p in opts)
        assert all(torch.equal(a[i][m], b[i][m]) for i in a for m in ("exp_avg", "exp_avg_sq")), left_out


DP = ("federated.dp_clip=0.05", "federated.dp_noise=0.8", "federated.fraction=0.67")  # poisson (auto)


RESUMED = {
    "fedavgm": ("federated.server_optimizer=fedavgm", "federated.server_lr=0.5"),
    "fedadam": ("federated.server_optimizer=fedadam", "federated.server_lr=0.5"),
    "dp": DP,
    "ffa+dp": ("federated.aggregation=ffa", *DP),
    "fedsa+fedadam": ("federated.aggregation=fedsa", "federated.server_optimizer=fedadam", "federated.server_lr=0.5"),
    "stack": ("federated.aggregation=stack",),
}


@pytest.mark.parametrize("server", list(RESUMED))
def test_resume_equals_an_uninterrupted_run(server, cache_dir, tmp_path, capsys, monkeypatch):
    """Killed in round 2 and resumed: the same adapters and metrics as without the cut. The server
    optimizer's buffers (momentum, Adam's moments) come back from round_001 too; with DP, the same clients
    (Poisson-sampled) and the same noise; each federated.aggregation too (fedsa: each client's own B)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    run = lambda out: small_run(cache_dir, out, *RESUMED[server])  # noqa: E731
    assert run_main(federated.main, run(full), capsys)[0] == 0
    if "fedad" in server or "fedavgm" in server:
        buffers = torch.load(full / "round_001/server.pt", weights_only=True)["server_optimizer"]["m"]
        assert buffers and all(v.any() for v in buffers.values())  # round 2 depends on them
    real = fl_client.client_update
    calls = []

    def die_in_round_two(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # the first client of round 2
            raise KeyboardInterrupt  # not an Exception: the process dies, as on a power cut
        return real(*a, **k)

    monkeypatch.setattr(fl_client, "client_update", die_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        federated.main(run(cut))
    monkeypatch.setattr(fl_client, "client_update", real)
    assert fl_server.completed_rounds(cut) == ["round_001"]
    code, stdout, err = run_main(federated.main, run(cut) + ["--resume"], capsys)
    assert code == 0, err
    assert "resumed after round_001" in stdout
    assert_same_adapter(full / "round_002/global", cut / "round_002/global")
    for c in ("fr", "de", "es"):
        assert_same_adapter(full / f"round_002/clients/{c}/local", cut / f"round_002/clients/{c}/local")
        if server.startswith("fedsa"):
            assert_same_adapter(full / f"round_002/clients/{c}/global", cut / f"round_002/clients/{c}/global")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rs]  # noqa: E731
    assert strip(events(full)) == strip(events(cut))


@pytest.mark.parametrize("min_clients", [2, 3])
def test_a_failing_client_is_left_out(min_clients, cache_dir, tmp_path, capsys, monkeypatch):
    """de fails in round 1 of 2: with min_clients=2 the round averages fr and es; with min_clients=3 two
    uploads are too few, so round 1 leaves the global adapter as it was (round 2 then goes on from it)."""
    out = tmp_path / "fed"
    real = fl_client.client_update
    state = {}

    def fail_on_de(run, cfg, examples, *a, **k):
        if examples is state["de"] and not state.get("failed"):  # de's first turn: round 1
            state["failed"] = True
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(run, cfg, examples, *a, **k)

    real_tokenize = D.tokenize_records

    def remember(tok, recs, *a):
        result = real_tokenize(tok, recs, *a)
        if a[-1] == "de train":
            state["de"] = result
        return result

    monkeypatch.setattr(D, "tokenize_records", remember)
    monkeypatch.setattr(fl_client, "client_update", fail_on_de)
    argv = small_run(cache_dir, out, f"federated.min_clients={min_clients}")
    code, stdout, err = run_main(federated.main, argv, capsys)
    assert code == 0, err
    assert "client de failed in round 1: RuntimeError: CUDA out of memory (simulated); left out" in stdout
    rounds = {r["round"]: r for r in events(out) if "uploaded_bytes" in r}
    assert rounds[1]["failed"] == ["de"] and rounds[1]["succeeded"] == 2
    assert rounds[1]["status"] == ("ok" if min_clients == 2 else "failed")
    assert rounds[2]["failed"] == [] and rounds[2]["status"] == "ok"
    glob = adapter_tensors(out / "round_001/global")
    initial_b = all(not v.any() for k, v in glob.items() if "lora_B" in k)  # B = 0: the fresh adapter
    assert initial_b == (min_clients == 3)
    assert ("FAILED: 2 < federated.min_clients; global adapter unchanged" in stdout) == (min_clients == 3)
    # de trained nothing in round 1: its local adapter is still the initial one; fr's moved on
    de = adapter_tensors(out / "round_001/clients/de/local")
    fr = adapter_tensors(out / "round_001/clients/fr/local")
    assert all(not v.any() for k, v in de.items() if "lora_B" in k)
    assert any(v.any() for k, v in fr.items() if "lora_B" in k)


def test_too_few_clients_leave_the_global_adapter_unchanged(cache_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "fed"

    def nan_update(run, *a, **k):
        for p in lora.adapter_parameters(run.model, "global"):
            p.data.fill_(float("nan"))
        return 0.0, None

    monkeypatch.setattr(fl_client, "client_update", nan_update)
    code, stdout, err = run_main(
        federated.main, small_run(cache_dir, out, "federated.rounds=1", "federated.min_clients=2"), capsys
    )
    assert code == 0, err
    assert stdout.count("has NaN/inf values; left out") == 3
    assert "FAILED: 0 < federated.min_clients; global adapter unchanged" in stdout
    summary = [r for r in events(out) if "uploaded_bytes" in r][0]
    assert summary["status"] == "failed" and summary["uploaded_bytes"] == 0
    glob = adapter_tensors(out / "round_001/global")
    assert all(torch.isfinite(v).all() for v in glob.values())
    assert all(not v.any() for k, v in glob.items() if "lora_B" in k)  # still the initial adapter


def test_global_only_mode_has_no_local_adapter(cache_dir, tmp_path, capsys):
    out = tmp_path / "fed"
    code, stdout, err = run_main(
        federated.main, small_run(cache_dir, out, "federated.rounds=1", "federated.mode=global_only"), capsys
    )
    assert code == 0, err
    assert {r["adapters"] for r in events(out) if "client" in r} == {"global"}
    assert not os.path.exists(out / "round_001/clients")


def test_dirichlet_clients_from_one_file(cache_dir, tmp_path, capsys):
    out = tmp_path / "fed"
    code, stdout, err = run_main(
        federated.main,
        small_run(
            cache_dir,
            out,
            "federated.rounds=1",
            "data.clients=null",
            "data.partition=dirichlet",
            "data.num_clients=3",
            f"data.train_file={os.path.join(ROOT, 'data/demo.json')}",
        ),
        capsys,
    )
    assert code == 0, err
    assert "3 clients (client_0, client_1, client_2)" in stdout


def test_dp_clips_at_the_client_and_adds_seeded_noise_at_the_server(cache_dir, tmp_path, capsys, monkeypatch):
    """DP-FedAvg through federated.main: Poisson-sampled clients (rate 0.67), each upload within dp_clip of
    the global adapter it received (some had to be clipped), the new global adapter equal to the
    fixed-denominator mean of the uploads plus noise drawn from the round's seed, and the epsilon reported
    each round equal to the accountant's for (q, z, rounds, delta)."""
    norms, rounds = [], []
    real_clip, real_mean = fedavg.clip_update, fedavg.dp_mean

    def clip(state, reference, max_norm):
        out, norm = real_clip(state, reference, max_norm)
        norms.append(norm)
        return out, norm

    def mean(reference, uploads, *a):
        rounds.append(([{k: v.clone() for k, v in u.items()} for u in uploads], dict(reference), a))
        return real_mean(reference, uploads, *a)

    monkeypatch.setattr(fedavg, "clip_update", clip)
    monkeypatch.setattr(fedavg, "dp_mean", mean)
    out = tmp_path / "fed"
    code, stdout, err = run_main(federated.main, small_run(cache_dir, out, *DP), capsys)
    assert code == 0, err
    summaries = {r["round"]: r for r in events(out) if "uploaded_bytes" in r}
    for rnd in (1, 2):
        assert summaries[rnd]["clients"] == fedavg.poisson_sample(["fr", "de", "es"], rnd, 0, 0.67)
        assert summaries[rnd]["epsilon"] == fedavg.dp_epsilon(0.67, 0.8, rnd, 1e-5)
        assert f"epsilon {summaries[rnd]['epsilon']:.3g}" in stdout
    assert max(norms) > 0.05  # clipping had work to do
    for rnd, (uploads, reference, (s, z, m, _)) in zip((1, 2), rounds, strict=True):
        assert (s, z, m) == (0.05, 0.8, 0.67 * 3)
        assert len(uploads) == len(summaries[rnd]["clients"])
        for u in uploads:  # no upload ever left a client unclipped
            assert math.sqrt(sum((u[k].double() - reference[k].double()).square().sum() for k in u)) <= 0.05 * (
                1 + 1e-6
            )
        noise = torch.Generator().manual_seed(0 * 1_000_033 + rnd)  # the round's seed: train.seed, round
        expected = real_mean(reference, uploads, s, z, m, noise)  # fedavg server at lr 1: the new global adapter
        got = adapter_tensors(out / f"round_{rnd:03d}/global")
        assert all(torch.equal(got[k], expected[k]) for k in got)


def test_dp_max_epsilon_stops_before_the_round_that_would_exceed_it(cache_dir, tmp_path, capsys):
    eps1, eps2 = fedavg.dp_epsilon(0.67, 0.8, 1, 1e-5), fedavg.dp_epsilon(0.67, 0.8, 2, 1e-5)
    limit = (eps1 + eps2) / 2
    out = tmp_path / "fed"
    code, stdout, err = run_main(
        federated.main, small_run(cache_dir, out, *DP, f"federated.dp_max_epsilon={limit}"), capsys
    )
    assert code == 0, err
    assert f"stopped before round 2: epsilon would reach {eps2:.3g} > federated.dp_max_epsilon={limit:g}" in stdout
    assert [r["round"] for r in events(out) if "uploaded_bytes" in r] == [1]
    assert fl_server.completed_rounds(out) == ["round_001"]


def test_a_poisson_round_may_sample_no_client(cache_dir, tmp_path, capsys):
    """train.seed=1, rate 0.2: round 1 samples no client (an empty, legal round), round 2 one."""
    assert fedavg.poisson_sample(["fr", "de", "es"], 1, 1, 0.2) == []
    out = tmp_path / "fed"
    argv = small_run(cache_dir, out, "train.seed=1", "federated.sampling=poisson", "federated.fraction=0.2")
    code, stdout, err = run_main(federated.main, argv, capsys)
    assert code == 0, err
    summaries = {r["round"]: r for r in events(out) if "uploaded_bytes" in r}
    assert summaries[1]["clients"] == [] and summaries[1]["status"] == "empty"
    assert "round 1/2: 0/0 clients" in stdout and "no client sampled; global adapter unchanged" in stdout
    assert summaries[2]["status"] == "ok" and len(summaries[2]["clients"]) == 1
    glob = adapter_tensors(out / "round_001/global")
    assert all(not v.any() for k, v in glob.items() if "lora_B" in k)  # still the fresh adapter


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["federated.dp_clip=-1"], "federated.dp_clip: must be >= 0, got -1"),
        (["federated.dp_noise=-0.5"], "federated.dp_noise: must be >= 0, got -0.5"),
        (["federated.dp_noise=1"], "federated.dp_noise: noise needs federated.dp_clip > 0"),
        (["federated.dp_delta=1"], r"federated.dp_delta: must be in \(0, 1\), got 1"),
        (["federated.dp_delta=0"], r"federated.dp_delta: must be in \(0, 1\), got 0"),
        ([*DP, "federated.sampling=fixed"], "federated.sampling: DP needs poisson"),
        (["federated.sampling=poisson", "federated.min_clients=4"],
         "federated.min_clients: 4 is more than the 3 clients poisson sampling can pick"),
        (["federated.dp_max_epsilon=0"], "federated.dp_max_epsilon: must be > 0 or null, got 0"),
        (["federated.dp_clip=0.1", "federated.dp_max_epsilon=8"],
         "federated.dp_max_epsilon: needs federated.dp_noise > 0"),
    ],
)  # fmt: skip
def test_bad_dp_input_gives_one_clear_line(overrides, message, cache_dir, tmp_path, capsys):
    code, _, err = run_main(federated.main, small_run(cache_dir, tmp_path / "fed", *overrides), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not (tmp_path / "fed").exists()


def test_dp_without_dp_accounting_gives_one_clear_line(cache_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "dp_accounting", None)  # import fails, as when not installed
    code, _, err = run_main(federated.main, small_run(cache_dir, tmp_path / "fed", *DP), capsys)
    assert code == 2
    assert (
        err.strip()
        == "error: federated.dp_noise: client-level DP accounting needs dp-accounting: pip install dp-accounting"
    )


def test_resume_with_nothing_to_resume_gives_one_clear_line(cache_dir, tmp_path, capsys):
    out = tmp_path / "fed"
    code, _, err = run_main(federated.main, [*small_run(cache_dir, out), "--resume"], capsys)
    assert code == 2 and err.strip() == f"error: --resume: {out} holds no complete checkpoint to resume from", err
    assert not out.exists()


def test_resume_refuses_a_changed_lr_in_one_line_and_allows_more_rounds(cache_dir, tmp_path, capsys):
    """A resumed federation must run the math it started with: a new train.lr (or aggregation, DP setting,
    client set...) is refused in one line naming the key, before anything is written; more rounds are not."""
    out = tmp_path / "fed"
    fast = ["model.quantization=none", "model.compute_dtype=float32", "federated.mode=global_only", "lora.r=4"]
    assert run_main(federated.main, [*small_run(cache_dir, out, *fast), "federated.rounds=1"], capsys)[0] == 0
    before = (out / "metrics.jsonl").read_text()
    code, _, err = run_main(federated.main, [*small_run(cache_dir, out, *fast, "train.lr=5e-4"), "--resume"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "train.lr 0.001 -> 0.0005" in lines[0], err
    assert (out / "metrics.jsonl").read_text() == before and fl_server.completed_rounds(out) == ["round_001"]
    code, stdout, err = run_main(federated.main, [*small_run(cache_dir, out, *fast), "--resume"], capsys)
    assert code == 0 and "resumed after round_001" in stdout, err
    assert fl_server.completed_rounds(out) == ["round_001", "round_002"]


def test_under_torchrun_it_refuses_in_one_line(cache_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it in each of its processes
    code, _, err = run_main(federated.main, small_run(cache_dir, tmp_path / "fed"), capsys)
    assert code == 2 and err.strip() == (
        "error: federated.py runs its clients one after another in one process; run it with python, not torchrun"
    )
    assert not (tmp_path / "fed").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("federated.rounds=0", "federated.rounds: must be >= 1, got 0"),
        ("federated.fraction=0", r"federated.fraction: must be in \(0, 1\], got 0"),
        ("federated.local_weight_decay=-1", "federated.local_weight_decay: must be >= 0, got -1"),
        ("federated.mode=solo", "federated.mode: 'solo' is not one of alternating, joint, global_only"),
        ("data.dirichlet_alpha=0", "data.dirichlet_alpha: must be > 0, got 0"),
        ("data.clients=[data/clients/fr.json, /nope/xx.json]", "/nope/xx.json: file not found"),
        ("federated.min_clients=4", "federated.min_clients: 4 is more than the 3 clients sampled per round"),
    ],
)
def test_bad_federated_input_gives_one_clear_line(override, message, cache_dir, tmp_path, capsys):
    code, _, err = run_main(federated.main, small_run(cache_dir, tmp_path / "fed", override), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert __import__("re").search(message, lines[0]), lines[0]
