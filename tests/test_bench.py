"""bench.py: the model benchmark runs end to end on a tiny shape and reports what it promises."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import seconds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"impl", "variant", "dtype", "device", "tokens_per_s", "step_s", "peak_mib"}


def bench(tmp_path, *args, text=False):
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench.py"),
            "--hidden",
            "64",
            "--layers",
            "1",
            "--vocab",
            "300",
            "--seq",
            "32",
            "--batch",
            "2",
            "--steps",
            "1",
            "--json",
            "--cache-dir",
            str(tmp_path),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=seconds(300),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout if text else [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_bench_ours_alone(tmp_path):
    rows = bench(tmp_path, "--dora")
    assert len(rows) == 1 and set(rows[0]) == KEYS
    assert rows[0]["impl"] == "ours" and rows[0]["variant"] == "dora" and rows[0]["device"] == "cpu"
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["peak_mib"] > 0


def test_bench_against_peft_both_variants(tmp_path):
    pytest.importorskip("peft")
    *rows, ratios = bench(tmp_path, "--compare-peft", "--dora-vs-lora")
    assert [(r["impl"], r["variant"]) for r in rows] == [
        ("ours", "lora"),
        ("peft", "lora"),
        ("ours", "dora"),
        ("peft", "dora"),
    ]
    assert all(set(r) == KEYS and r["tokens_per_s"] > 0 for r in rows)
    assert len({r["dtype"] for r in rows}) == 1  # the same compute dtype for both
    assert set(ratios) == {
        "lora_speedup_vs_peft",
        "lora_peak_vs_peft",
        "dora_speedup_vs_peft",
        "dora_peak_vs_peft",
        "ours_dora_step_vs_lora",
        "peft_dora_step_vs_lora",
    }
    assert os.listdir(tmp_path) and all(n.startswith("bench-") for n in os.listdir(tmp_path))  # cached, no temp dir


def test_bench_a_real_model_by_name(tmp_path):
    """--model tiny: the embedded default's own weights and shape (vocabulary 2,048), not a random model."""
    out = bench(tmp_path, "--model", "tiny", text=True)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["impl"] == "ours" and rows[0]["tokens_per_s"] > 0
    assert [n for n in os.listdir(tmp_path) if n.startswith("tiny-")] and not any(
        n.startswith("bench-") for n in os.listdir(tmp_path)
    )


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--model", "--model: {!r} does not exist (expected a local model directory, a .gguf file or a Hugging Face "
         "hub id such as Qwen/Qwen2.5-7B-Instruct)"),
        ("--baseline", "--baseline: {!r} is not a checkout of this project (no bench.py)"),
    ],
)  # fmt: skip
def test_bench_a_model_or_baseline_that_is_not_there_is_one_line(flag, message, tmp_path):
    missing = str(tmp_path / "nope")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench.py"), flag, missing, "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=seconds(120),
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == "bench.py: error: " + message.format(missing)


def test_bench_baseline_runs_the_other_checkouts_code(tmp_path):
    """--baseline DIR: our path from another checkout, alternating with this one, and its ratio. The copy's
    lora.py says where it was imported from, so a worker that ran this checkout's code would not print it."""
    other = tmp_path / "before"
    other.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            (other / name).write_text(open(os.path.join(ROOT, name)).read())
    with open(other / "lora.py", "a") as f:
        f.write("\nprint('lora.py imported from', __file__, flush=True)\n")
    out = bench(tmp_path, "--baseline", str(other), text=True)
    assert out.count("lora.py imported from") == 1 and str(other / "lora.py") in out
    *rows, ratios = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["impl"] for r in rows] == ["ours", "baseline"] and all(r["tokens_per_s"] > 0 for r in rows)
    assert set(ratios) == {"lora_speedup_vs_baseline"} and ratios["lora_speedup_vs_baseline"] > 0


def test_bench_packing_layouts(tmp_path):
    *rows, ratios = bench(tmp_path, "--packing", "--examples", "6")
    assert [r["variant"] for r in rows] == ["padded", "grouped", "packed"]
    assert all(set(r) == KEYS | {"fill"} and r["tokens_per_s"] > 0 and 0 < r["fill"] <= 1 for r in rows)
    assert set(ratios) == {"packed_vs_padded", "packed_vs_grouped"}


def test_ragged_batches_hold_the_same_examples_in_every_layout():
    import argparse

    import bench

    args = argparse.Namespace(lengths=bench.LENGTHS, seq=256, examples=20, batch=4)
    layouts = {layout: bench.ragged_batches({"vocab": 1000}, args, layout) for layout in bench.LAYOUTS}
    with open(bench.LENGTHS) as f:
        assert len(json.load(f)["lengths"]) > 10000  # real conversations' token counts
    tokens = {k: [n for _, n in v] for k, v in layouts.items()}
    assert tokens["padded"] == tokens["packed"] and sum(tokens["grouped"]) == sum(tokens["padded"])
    assert max(tokens["padded"]) <= 4 * 256
    for (padded, n), (packed, m) in zip(layouts["padded"], layouts["packed"], strict=True):
        assert int(padded["attention_mask"].sum()) == n == m  # tokens: the examples' own, padding left out
        assert sorted(padded["input_ids"][padded["attention_mask"] == 1].tolist()) == sorted(
            packed["input_ids"][packed["input_ids"] != 0].tolist()
        )
        assert packed["input_ids"].numel() <= padded["input_ids"].numel()


def test_bench_profile_lists_the_ops_of_a_step(tmp_path):
    out = bench(tmp_path, "--profile", text=True)
    table = out[out.index("self CPU time per step") :].splitlines()
    assert "ours lora" in table[1]
    end = next(i for i, line in enumerate(table) if line.startswith("(all ops)"))
    ops = {line[:56].strip(): float(line[56:].split()[0]) for line in table[2 : end + 1]}
    assert 0 < ops["aten::mm"] <= ops["(all ops)"]


def test_bench_loss_rows_and_ratios(tmp_path):
    rows = bench(tmp_path, "--loss", "--tokens", "100", "--repeats", "2", "--device", "cpu")
    assert [(r["dtype"], r["impl"]) for r in rows] == [
        (d, i)
        for d in ("float32", "bfloat16")
        for i in ("full logits", "chunks, loss.py's rule", "chunks of 2^22 logits")
    ]
    assert all(r["model"] == "hidden 64, vocab 300" and r["device"] == "cpu" and r["seconds"] > 0 for r in rows)
    assert [r["rows"] for r in rows[:3]] == [None, 2**22 // 300, 2**22 // 300]  # 13,981 rows: one chunk here
    full = [r for r in rows if r["rows"] is None]
    for r in rows:
        f = next(x for x in full if x["dtype"] == r["dtype"])
        assert r["time_vs_full"] == pytest.approx(r["seconds"] / f["seconds"], rel=0.05, abs=0.01)


def test_bench_loss_shapes_get_the_rule_and_the_old_chunk():
    import bench
    import loss

    cpu = torch.device("cpu")
    rules = {name: bench.loss_rows("chunks, loss.py's rule", *shape, cpu) for name, shape in bench.LOSS_SHAPES.items()}
    olds = {name: bench.loss_rows("chunks of 2^22 logits", *shape, cpu) for name, shape in bench.LOSS_SHAPES.items()}
    assert rules == {"Qwen2.5-7B": 441, "Llama-2-7B": 1024, "SmolLM2-135M": 144}
    assert olds == {"Qwen2.5-7B": 27, "Llama-2-7B": 131, "SmolLM2-135M": 85}
    assert all(rules[n] == loss.default_chunk_rows(cpu, v, h) for n, (h, v) in bench.LOSS_SHAPES.items())
    assert bench.loss_rows("full logits", 64, 300, cpu) is None
