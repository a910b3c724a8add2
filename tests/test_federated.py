"""federated.py: the round loop, its metrics, failing clients, checkpoints and exact resume."""

import json
import os

import pytest
import torch

import fedavg
import federated
import lora
from conftest import run_main

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


def test_demo_run_metrics_and_checkpoints(cache_dir, tmp_path, capsys):
    out = tmp_path / "fed"
    code, stdout, err = run_main(federated.main, small_run(cache_dir, out), capsys)
    assert code == 0, err
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
    one_upload = fedavg.state_bytes(adapter_tensors(out / "round_002/global"))
    assert rounds[0]["uploaded_bytes"] == 3 * one_upload and rounds[0]["clients"] == ["fr", "de", "es"]
    assert rounds[0]["train_loss"] > 0 and "conflict_exact_match_global+local" in rounds[0]
    assert "global+local EM/loss" in stdout and "conflicting prompts, exact match" in stdout
    assert sorted(os.listdir(out / "round_002")) == ["clients", "config.yaml", "global", "server.pt"]
    assert sorted(os.listdir(out / "round_002/clients")) == ["de", "es", "fr"]
    cfg = json.loads((out / "round_002/clients/fr/local/adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"  # PEFT format, like every adapter we write


def test_resume_equals_an_uninterrupted_run(cache_dir, tmp_path, capsys, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_main(federated.main, small_run(cache_dir, full), capsys)[0] == 0
    real = federated.client_update
    calls = []

    def die_in_round_two(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # the first client of round 2
            raise KeyboardInterrupt  # not an Exception: the process dies, as on a power cut
        return real(*a, **k)

    monkeypatch.setattr(federated, "client_update", die_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        federated.main(small_run(cache_dir, cut))
    monkeypatch.setattr(federated, "client_update", real)
    assert federated.completed_rounds(cut) == ["round_001"]
    code, stdout, err = run_main(federated.main, small_run(cache_dir, cut) + ["--resume"], capsys)
    assert code == 0, err
    assert "resumed after round_001" in stdout
    assert_same_adapter(full / "round_002/global", cut / "round_002/global")
    for c in ("fr", "de", "es"):
        assert_same_adapter(full / f"round_002/clients/{c}/local", cut / f"round_002/clients/{c}/local")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rs]  # noqa: E731
    assert strip(events(full)) == strip(events(cut))


def test_a_failing_client_is_left_out(cache_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "fed"
    real = federated.client_update
    state = {}

    def fail_on_de(model, mode, examples, *a, **k):
        if examples is state["de"]:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(model, mode, examples, *a, **k)

    real_tokenize = federated.D.tokenize_records

    def remember(tok, recs, *a):
        result = real_tokenize(tok, recs, *a)
        if a[-1] == "de train":
            state["de"] = result
        return result

    monkeypatch.setattr(federated.D, "tokenize_records", remember)
    monkeypatch.setattr(federated, "client_update", fail_on_de)
    code, stdout, err = run_main(federated.main, small_run(cache_dir, out, "federated.rounds=1"), capsys)
    assert code == 0, err
    assert "client de failed in round 1: RuntimeError: CUDA out of memory (simulated); left out" in stdout
    summary = [r for r in events(out) if "uploaded_bytes" in r][0]
    assert summary["failed"] == ["de"] and summary["succeeded"] == 2 and summary["status"] == "ok"
    # de trained nothing: its local adapter is still the initial one, which it shares with nobody else
    de = adapter_tensors(out / "round_001/clients/de/local")
    fr = adapter_tensors(out / "round_001/clients/fr/local")
    assert all(not v.any() for k, v in de.items() if "lora_B" in k)
    assert any(v.any() for k, v in fr.items() if "lora_B" in k)


def test_too_few_clients_leave_the_global_adapter_unchanged(cache_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "fed"

    def nan_update(model, *a, **k):
        for p in lora.adapter_parameters(model, "global"):
            p.data.fill_(float("nan"))
        return 0.0, None

    monkeypatch.setattr(federated, "client_update", nan_update)
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
