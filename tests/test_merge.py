"""merge.py: merged logits against base + adapters (fp32 exact, NF4 close), a plain HF directory, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data as D
import lora
import merge
import model as M
from conftest import run_main, seconds, tiny_dir
from test_infer import ROOT, fp32

QUESTIONS = ["Give the opposite of the word happy.", "Classify: lion", "Translate into our language: cat"]


def merge_argv(overrides, dirs, out, *extra):
    return [*overrides, *[a for d in dirs for a in ("--adapter", d)], "--out", str(out), *extra]


def nf4(cache_dir, dtype="float32"):
    return [*fp32(cache_dir)[:2], "model.quantization=nf4", f"model.compute_dtype={dtype}", "model.device=cpu"]


def relative_errors(cache_dir, quantization, dtype, dirs, weights, merged_dir):
    """max |merged - (base + adapters)| / max |base + adapters| of the logits, per prompt. The merged
    directory is opened with plain transformers; the reference is the project's unmerged model."""
    from transformers import AutoModelForCausalLM

    tiny = tiny_dir(cache_dir)
    ref, tok = M.load_model(tiny, quantization, dtype, "cpu", gradient_checkpointing=False)
    lora.load_adapters(ref, dirs, weights)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).eval()
    errors = []
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for q in QUESTIONS:
            ids = torch.tensor([D.encode(tok, D.render_prompt(tok, q))])
            a, b = merged(ids).logits.float(), ref(ids).logits.float()
            errors.append(((a - b).abs().max() / b.abs().max()).item())
    return errors


# ---------------------------------------------------------------- merged == base + adapters


@pytest.mark.parametrize("case", ["lora", "dora", "two_weighted"])
def test_merged_fp32_logits_equal_base_plus_adapters(case, cache_dir, adapters, tmp_path, capsys):
    dirs, weights = {
        "lora": ([adapters["lora"]], None),
        "dora": ([adapters["dora"]], None),
        "two_weighted": ([adapters["lora"], adapters["lora2"]], [0.5, 1.5]),
    }[case]
    extra = ["--weights", *map(str, weights)] if weights else []
    out = tmp_path / "merged"
    code, stdout, err = run_main(
        merge.main, merge_argv(fp32(cache_dir), dirs, out, "--dtype", "float32", *extra), capsys
    )
    assert code == 0, err
    assert "largest |logit difference|" in stdout
    errors = relative_errors(cache_dir, "none", torch.float32, dirs, weights, out)
    assert max(errors) <= 1e-4, errors  # measured: ~1e-6 (fp32 rounding: W + s B A is summed once, not per call)


@pytest.mark.parametrize("kind", ["lora_qv", "dora"])
def test_merged_nf4_logits_close_to_base_plus_adapters(kind, cache_dir, adapters, tmp_path, capsys):
    """Default path: onto the dequantized NF4 weights. lora_qv leaves most layers without an adapter, so
    those 4-bit layers must be dequantized too. fp32 compute: the merge itself is the only difference."""
    out = tmp_path / "merged"
    code, _, err = run_main(merge.main, merge_argv(nf4(cache_dir), [adapters[kind]], out, "--dtype", "float32"), capsys)
    assert code == 0, err
    errors = relative_errors(cache_dir, "nf4", torch.float32, [adapters[kind]], None, out)
    assert max(errors) <= 1e-4, errors  # measured: ~1e-6, as close as the fp32 case
    base = load_file(os.path.join(tiny_dir(cache_dir), "model.safetensors"))
    merged = load_file(out / "model.safetensors")
    assert merged.keys() == base.keys()  # no 4-bit leftovers (absmax, quant_map, ...), no adapter tensors
    assert all(t.dtype == torch.float32 for t in merged.values())


def test_merged_nf4_bf16_is_close(cache_dir, adapters, tmp_path, capsys):
    """The usual GPU setting: NF4 base, bf16 compute, saved in bf16. Both sides round to bf16 (the
    reference its activations, the merged model its weights too), so they agree to bf16 precision only:
    measured 1.2e-2 to 1.5e-2, where the same unmerged model in bf16 and in fp32 differ by ~6e-2."""
    out = tmp_path / "merged"
    code, _, err = run_main(merge.main, merge_argv(nf4(cache_dir, "bfloat16"), [adapters["lora"]], out), capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # --dtype defaults to compute
    errors = relative_errors(cache_dir, "nf4", torch.bfloat16, [adapters["lora"]], None, out)
    assert max(errors) <= 3e-2, errors


def test_from_original_merges_onto_the_unquantized_weights(cache_dir, adapters, tmp_path, capsys):
    """--from-original on an NF4 config gives the very merge of the fp32 config; the default NF4 merge
    differs from it by the quantization error of W, and only in the linear layers."""
    runs = {
        "original": (nf4(cache_dir), ["--from-original"]),
        "fp32": (fp32(cache_dir), []),
        "nf4": (nf4(cache_dir), []),
    }
    said = {}
    for name, (overrides, extra) in runs.items():
        argv = merge_argv(overrides, [adapters["lora"]], tmp_path / name, "--dtype", "float32", *extra)
        code, said[name], err = run_main(merge.main, argv, capsys)
        assert code == 0, err
    assert "onto the original weights" in said["original"] and "onto the dequantized nf4 weights" in said["nf4"]
    original, exact, dequantized = (load_file(tmp_path / n / "model.safetensors") for n in runs)
    assert all(torch.equal(original[k], exact[k]) for k in exact)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dequantized[q], exact[q])
    assert (dequantized[q] - exact[q]).abs().max() < 0.1 * exact[q].abs().max()  # NF4 error: small, not zero
    assert torch.equal(dequantized["model.embed_tokens.weight"], exact["model.embed_tokens.weight"])


def test_merged_directory_is_a_plain_transformers_model(cache_dir, adapters, tmp_path):
    """The real entry point in a subprocess, then the directory opened by transformers alone: another
    process whose import path holds none of this project's modules."""
    out = tmp_path / "merged"
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "merge.py"),
            *nf4(cache_dir, "float32"),
            "--adapter",
            adapters["lora_qv"],
            "--out",
            str(out),
            "--dtype",
            "bfloat16",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=seconds(300),
    )
    assert p.returncode == 0, p.stderr
    assert "largest |logit difference|" in p.stdout
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # the staging directory was renamed, not left behind
    files = set(os.listdir(out))
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= files and not any("adapter" in f for f in files)
    assert all(os.stat(out / f).st_mode & 0o444 == 0o444 for f in files)  # readable by everyone
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert "quantization_config" not in config and "auto_map" not in config
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "assert not any(m in sys.modules for m in ('lora', 'model', 'infer', 'merge', 'train'))\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "assert m.dtype == torch.bfloat16, m.dtype\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'Classify: lion'}], add_generation_prompt=True,"
        " return_tensors='pt', return_dict=True)\n"
        "out = m.generate(**ids, max_new_tokens=4, do_sample=False)\n"
        "print('generated', out.shape[1] - ids['input_ids'].shape[1])\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=seconds(300),
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert p.returncode == 0 and "generated" in p.stdout, p.stderr


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_adapter", "adapter /no/such/adapter: no such directory"),
        ("other_base", "the model expects (4, 688) (an adapter for another base?)"),
        ("out_holds_a_model", "already exists and is not empty"),
        ("out_unwritable", "cannot write there"),
        ("weight_count", "2 adapter weights for 1 adapters"),
        ("dora_weight", "a DoRA adapter cannot be weighted"),
    ],
)
def test_bad_input_gives_one_clear_line(case, message, cache_dir, adapters, tmp_path, capsys):
    out = tmp_path / "merged"
    dirs, extra = [adapters["lora"]], []
    if case == "missing_adapter":
        dirs = ["/no/such/adapter"]
    elif case == "other_base":
        dirs = [adapters["other_base"]]
    elif case == "out_holds_a_model":
        out.mkdir()
        (out / "config.json").write_text('{"model_type": "qwen2"}')
    elif case == "out_unwritable":
        (tmp_path / "a_file").write_text("")
        out = tmp_path / "a_file" / "merged"  # its parent is a file: nothing can be created there
    elif case == "weight_count":
        extra = ["--weights", "1", "2"]
    elif case == "dora_weight":
        dirs, extra = [adapters["dora"]], ["--weights", "0.5"]
    before = {f: (tmp_path / f).read_bytes() if (tmp_path / f).is_file() else None for f in os.listdir(tmp_path)}
    code, _, err = run_main(merge.main, merge_argv(fp32(cache_dir), dirs, out, "--dtype", "float32", *extra), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    after = {f: (tmp_path / f).read_bytes() if (tmp_path / f).is_file() else None for f in os.listdir(tmp_path)}
    assert after == before  # nothing written next to --out, no staging directory left behind
    if case == "out_holds_a_model":
        assert os.listdir(out) == ["config.json"] and (out / "config.json").read_text() == '{"model_type": "qwen2"}'


def test_out_holding_a_model_from_the_command_line(cache_dir, adapters, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "merge.py"),
            *fp32(cache_dir),
            "--adapter",
            adapters["lora"],
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=seconds(300),
    )
    assert p.returncode == 2 and p.stdout == ""
    assert (
        p.stderr.strip() == f"error: --out {out} already exists and is not empty (a model?); choose another "
        "directory or delete it"
    )
    assert os.listdir(out) == ["model.safetensors"] and (out / "model.safetensors").read_bytes() == b"weights"


def test_a_failed_save_leaves_nothing_under_out(tmp_path):
    class FullDisk:
        def save_pretrained(self, path):
            with open(os.path.join(path, "model.safetensors"), "wb") as f:
                f.write(b"half a model")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        merge.save(FullDisk(), None, str(tmp_path / "merged"))
    assert os.listdir(tmp_path) == []  # no --out, no staging directory
