"""train.py: the config parser, the chunked loss, checkpointing, resume and every bad input."""

import functools
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import config as C
import data as D
import evaluation
import lora
import loss as L
import model as M
import train
import trainer
from conftest import run_main, tiny_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")


def small_run(cache_dir, out_dir, *extra):
    """Overrides for a run of a few steps on a slice of the demo data."""
    return [
        CONFIG,
        f"model.cache_dir={cache_dir}",
        f"train.output_dir={out_dir}",
        "train.max_steps=6",
        "train.batch_size=4",
        "train.eval_every=3",
        "train.save_every=3",
        "train.log_every=1",
        "train.warmup_steps=2",
        f"data.train_file={os.path.join(ROOT, 'data/clients/fr.json')}",
        "data.eval_fraction=0.05",
        *extra,
    ]


# ---------------------------------------------------------------- loss and schedule


def assert_close(a, b, rtol):
    """Equal up to rtol times the largest magnitude: fp32 sums taken in another order differ slightly."""
    err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"
    return err


def tiny(cache_dir, quantization="none", dtype=torch.float32, checkpointing=False):
    model, tok = M.load_model(tiny_dir(cache_dir), quantization, dtype, "cpu", "eager", checkpointing)
    return model, tok


def demo_batch(tok, n=6):
    records = D.load_records(os.path.join(ROOT, "data/clients/de.json"))[:n]
    return D.collate(D.tokenize_records(tok, records, 64), tok.pad_token_id)


def test_chunked_loss_equals_full_cross_entropy(cache_dir):
    model, tok = tiny(cache_dir)
    batch = demo_batch(tok)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
        n_ref = int((batch["labels"][:, 1:] != -100).sum())
        for chunk in (1, 7, 1024):  # chunk boundaries must not matter
            total, n = L.loss_sum(model, batch, chunk_rows=chunk)
            assert n == n_ref
            torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)


def test_chunked_loss_gradients_equal_full_cross_entropy(cache_dir):
    model, tok = tiny(cache_dir)
    lora.inject(model, ["q_proj", "down_proj"], r=4)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, "default"):
            p.add_(torch.randn_like(p) * 0.05)
    batch = demo_batch(tok)
    total, _ = L.loss_sum(model, batch, chunk_rows=5)
    ours = torch.autograd.grad(total, list(lora.adapter_parameters(model, "default")))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    ref = torch.autograd.grad(ref_loss, list(lora.adapter_parameters(model, "default")))
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, 1e-5)


def test_loss_under_bf16_autocast_against_float64(cache_dir):
    """The model's chunked loss and its adapter gradients under bf16 autocast (what a bf16 run computes,
    whatever this CPU supports natively) against plain cross-entropy on a float64 copy of the model."""
    model, tok = tiny(cache_dir)
    lora.inject(model, ["q_proj", "down_proj"], r=4)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, "default"):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    batch = demo_batch(tok)
    params = list(lora.adapter_parameters(model, "default"))
    with M.autocast(torch.device("cpu"), torch.bfloat16):
        total, n = L.loss_sum(model, batch)
    ours = torch.autograd.grad(total, params)
    model.double()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    ref_grads = torch.autograd.grad(ref, params)
    assert total.dtype == torch.float32 and n == int((batch["labels"][:, 1:] != -100).sum())
    assert_close(total, ref, 5e-3)  # measured 1.3e-3
    errors = [assert_close(a, b, 5e-2) for a, b in zip(ours, ref_grads, strict=True)]  # measured 5e-3 to 1.8e-2
    assert max(errors) > 1e-3  # it did run in bf16: fp32 would be within 1e-5


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_gradient_checkpointing_gives_the_same_gradients(cache_dir, quantization):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, tok = tiny(cache_dir, quantization, checkpointing=checkpointing)
        lora.inject(model, C.DEFAULT_TARGETS, r=4, use_dora=True)
        with torch.no_grad():
            for p in lora.adapter_parameters(model, "default"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        model.train()
        total, _ = L.loss_sum(model, demo_batch(tok))
        grads.append(torch.autograd.grad(total, list(lora.adapter_parameters(model, "default"))))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


class CaptureGrads:
    """Stands in for the optimizer: records the gradients train_step would step with."""

    def __init__(self, params):
        self.params, self.grads = params, None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def test_gradient_accumulation_equals_one_big_batch(cache_dir):
    """Normalising by the step's labelled tokens: 3 micro-batches of 2 == 1 batch of 6."""
    model, tok = tiny(cache_dir)
    lora.inject(model, ["v_proj"], r=4)
    params = list(lora.adapter_parameters(model, "default"))
    records = D.load_records(os.path.join(ROOT, "data/clients/it.json"))[:6]
    examples = D.tokenize_records(tok, records, 64)
    grads = []
    for groups in ([examples], [examples[0:2], examples[2:4], examples[4:6]]):
        opt = CaptureGrads(params)
        trainer.train_step(
            model,
            params,
            opt,
            torch.amp.GradScaler("cpu", enabled=False),
            [D.collate(g, tok.pad_token_id) for g in groups],
            torch.device("cpu"),
            torch.float32,
            0,
        )
        grads.append(opt.grads)
    for a, b in zip(*grads, strict=True):
        assert_close(a, b, 1e-5)


def test_batch_size_auto_finds_the_largest_micro_batch_that_fits(cache_dir, monkeypatch):
    model, tok = tiny(cache_dir)
    lora.inject(model, ["q_proj"], r=2)
    lora.mark_trainable(model, ["default"])
    examples = D.tokenize_records(tok, D.load_records(os.path.join(ROOT, "data/clients/de.json"))[:8], 64)
    longest = max(len(e["input_ids"]) for e in examples)
    real, seen = L.loss_sum, []

    def loss_sum(model, batch, **kw):  # a GPU with room for 5 rows of the longest example
        seen.append(tuple(batch["input_ids"].shape))
        if len(batch["input_ids"]) > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(model, batch, **kw)

    monkeypatch.setattr(L, "loss_sum", loss_sum)
    args = (model, examples, functools.partial(D.collate, pad_id=tok.pad_token_id), torch.device("cpu"), torch.float32)
    assert trainer.largest_batch_size(*args, limit=64) == 5
    assert all(t == longest for _, t in seen)  # probed with the longest example
    assert trainer.largest_batch_size(*args, limit=3) == 3
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind
    monkeypatch.setattr(L, "loss_sum", lambda *a, **k: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError()))
    assert trainer.largest_batch_size(*args, limit=64) == 0


def test_batch_size_auto_off_cuda_and_on_resume(tmp_path):
    tc = C.load_config(CONFIG, ["train.batch_size=auto"])["train"]
    assert tc["batch_size"] == "auto"
    assert trainer.resolve_batch_size(tc["batch_size"], None, [], D.collate, torch.device("cpu"), torch.float32) == 16
    saved = tmp_path / "config.yaml"
    checkpoints.save_yaml({"train": {"batch_size": 12}}, str(saved))
    cpu, f32 = torch.device("cpu"), torch.float32
    assert trainer.resolve_batch_size(tc["batch_size"], None, [], D.collate, cpu, f32, str(saved)) == 12
    assert trainer.resolve_batch_size(4, None, [], D.collate, cpu, f32) == 4


def test_lr_schedule():
    lrs = [trainer.lr_at(s, 100, 10, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # decays monotonically after warmup
    assert trainer.lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


# ---------------------------------------------------------------- whole runs


def test_run_writes_metrics_checkpoints_and_adapter(cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(train.main, small_run(cache_dir, out), capsys)
    assert code == 0, err
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if "eval_loss" in e]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 6  # before training and at the end
    assert [e["step"] for e in events if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert all(k in events[1] for k in ("loss", "lr", "tokens_per_s"))
    assert all(0 <= e["exact_match"] <= 1 for e in evals)  # greedy answers scored at every eval
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000003", "step_000006"]
    assert sorted(os.listdir(out / "checkpoints/step_000006")) == ["adapter", "config.yaml", "state.pt"]
    cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == tiny_dir(cache_dir)
    assert C.load_config(str(out / "config.yaml"))["train"]["max_steps"] == 6  # the resolved config


def test_adapter_opens_in_peft_on_the_recorded_base(cache_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    assert run_main(train.main, small_run(cache_dir, out, "train.max_steps=3", "lora.use_dora=true"), capsys)[0] == 0
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter"), dtype=torch.float32).eval()
    ours, tok = tiny(cache_dir)
    lora.load_adapter(ours, str(out / "adapter"))
    ids = demo_batch(tok)["input_ids"]
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert (a - b).abs().max() / b.abs().max() < 1e-4


def test_resume_equals_an_uninterrupted_run(cache_dir, tmp_path, capsys, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = ("lora.use_dora=true", "train.grad_accum=2", "train.keep_checkpoints=5")  # dropout 0.05 is on
    assert run_main(train.main, small_run(cache_dir, full, *extra), capsys)[0] == 0
    real_step, calls = trainer.train_step, []

    def crash_on_fifth(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the machine dies during step 5; step 3 was the last checkpoint
        return real_step(*a, **k)

    monkeypatch.setattr(trainer, "train_step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        train.main(small_run(cache_dir, cut, *extra))
    monkeypatch.setattr(trainer, "train_step", real_step)
    assert sorted(os.listdir(cut / "checkpoints")) == ["step_000003"]
    assert run_main(train.main, small_run(cache_dir, cut, *extra) + ["--resume"], capsys)[0] == 0
    for sub in ("adapter", "checkpoints/step_000006/adapter"):
        a = lora.read_adapter(str(full / sub))[1]
        b = lora.read_adapter(str(cut / sub))[1]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_fp16_run_skips_an_overflowing_step_lowers_the_scale_and_clips(cache_dir, tmp_path, capsys, monkeypatch):
    """fp16 autocast with loss scaling, on the CPU: a scale too large for fp16 overflows the gradients, so
    GradScaler skips that step (weights unchanged) and halves the scale; the steps that run see gradients
    unscaled and then clipped to train.max_grad_norm."""
    log = []

    class Scaler(torch.amp.GradScaler):
        def __init__(self, *a, **k):
            super().__init__(*a, init_scale=2.0**24, **k)  # fp16 tops out at 65504: the first steps overflow

        def step(self, optimizer):
            params = optimizer.param_groups[0]["params"]
            before, scale = [p.detach().clone() for p in params], self.get_scale()
            super().step(optimizer)  # AdamW's state holds the steps it took
            took = int(optimizer.state[params[0]]["step"]) if params[0] in optimizer.state else 0
            changed = any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
            log.append({"scale": scale, "changed": changed, "steps": took})

    real_clip, norms = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm, **k):
        params = list(params)
        total = real_clip(params, max_norm, **k)  # the norm before clipping
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        norms.append((total.item(), after.item()))
        return total

    monkeypatch.setattr(torch.amp, "GradScaler", Scaler)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    out = tmp_path / "run"
    argv = small_run(cache_dir, out, "model.compute_dtype=float16", "train.max_grad_norm=0.05", "train.eval_every=0",
                     "train.eval_max_new_tokens=0", "train.max_steps=16")  # fmt: skip
    code, stdout, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    assert "on cpu in float16" in stdout
    skipped = [not e["changed"] for e in log]
    assert [e["steps"] for e in log] == list(itertools.accumulate(int(not k) for k in skipped))  # AdamW agrees
    assert len(log) == 16 and skipped[0] and not any(skipped[-3:])  # overflowed first, then trained
    for i in range(15):  # halved after each overflow, kept otherwise (growth only after 2000 good steps)
        assert log[i + 1]["scale"] == log[i]["scale"] / (2 if skipped[i] else 1)
    saved = checkpoints.load_state(str(out / "checkpoints/step_000016/state.pt"))["scaler"]
    assert saved["scale"] == log[-1]["scale"] and log[-1]["scale"] < 2.0**24
    finite = [(b, a) for b, a in norms if math.isfinite(b)]
    assert len(finite) == len(log) - sum(skipped)
    assert all(b > 0.05 for b, _ in finite)  # clipping had work to do
    assert all(a == pytest.approx(0.05, rel=1e-4) for _, a in finite)  # unscaled first, then clipped to the norm
    losses = [e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)


def test_keep_checkpoints_and_extending_a_finished_run(cache_dir, tmp_path, capsys):
    """keep_checkpoints prunes older step_* directories; --resume with a larger max_steps continues a
    finished run and replaces its adapter directory in place (write_atomically's replace branch)."""
    out = tmp_path / "run"
    argv = small_run(cache_dir, out, "train.save_every=1", "train.keep_checkpoints=2", "train.eval_every=0",
                     "train.eval_max_new_tokens=0")  # fmt: skip
    assert run_main(train.main, [*argv, "train.max_steps=4"], capsys)[0] == 0
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000003", "step_000004"]
    first = lora.read_adapter(str(out / "adapter"))[1]
    at_4 = lora.read_adapter(str(out / "checkpoints/step_000004/adapter"))[1]
    assert all(torch.equal(first[k], at_4[k]) for k in first)
    code, stdout, err = run_main(train.main, [*argv, "train.max_steps=6", "--resume"], capsys)
    assert code == 0, err
    assert "resumed from" in stdout and "step_000004" in stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000005", "step_000006"]
    assert sorted(os.listdir(out)) == ["adapter", "checkpoints", "config.yaml", "metrics.jsonl"]  # no .tmp/.old
    second = lora.read_adapter(str(out / "adapter"))[1]
    at_6 = lora.read_adapter(str(out / "checkpoints/step_000006/adapter"))[1]
    assert all(torch.equal(second[k], at_6[k]) for k in second)
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_write_atomically_keeps_the_old_directory_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "adapter"

    def put(name, text):
        return lambda d: open(os.path.join(d, name), "w").write(text)

    checkpoints.write_atomically(str(final), put("a", "old"))

    def fail(d):
        put("a", "half")(d)
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoints.write_atomically(str(final), fail)
    assert (final / "a").read_text() == "old"
    checkpoints.write_atomically(str(final), put("b", "new"))
    assert os.listdir(final) == ["b"] and sorted(os.listdir(tmp_path)) == ["adapter"]


def test_resume_refuses_a_changed_config_or_a_damaged_checkpoint_in_one_line(cache_dir, tmp_path, capsys):
    """--resume with new values of keys that change the math is refused before anything is written, in one
    line naming each change and the saved config; more train.max_steps continues the run; a truncated
    state.pt is one line naming the file and what to do."""
    out = tmp_path / "run"
    argv = small_run(cache_dir, out, "train.max_steps=3", "train.eval_every=0", "train.eval_max_new_tokens=0")
    assert run_main(train.main, argv, capsys)[0] == 0
    saved = (out / "config.yaml").read_text()
    code, _, err = run_main(train.main, [*argv, "train.lr=5e-4", "lora.r=8", "--resume"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: --resume: the config changed in keys that change the math: train.lr 0.001 -> 0.0005, lora.r 16 -> 8; "
        f"resume with the saved values ({out / 'checkpoints/step_000003/config.yaml'}) or start over with "
        "train.overwrite=true"
    ], err
    assert (out / "config.yaml").read_text() == saved and (out / "adapter").is_dir()
    code, stdout, err = run_main(train.main, [*argv, "train.max_steps=4", "--resume"], capsys)
    assert code == 0 and "resumed from" in stdout and "step_000003" in stdout, err
    state = out / "checkpoints/step_000004/state.pt"
    state.write_bytes(state.read_bytes()[:100])  # a disk that filled up, say
    code, _, err = run_main(train.main, [*argv, "train.max_steps=5", "--resume"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"error: {state}: unreadable (truncated or corrupt); delete the checkpoint directory that holds it to "
        "resume from the one before, or start over with train.overwrite=true"
    ], err


def test_resume_with_nothing_to_resume_gives_one_clear_line(cache_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "missing", tmp_path / "empty"):
        code, _, err = run_main(train.main, [*small_run(cache_dir, out), "--resume"], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and lines == [f"error: --resume: {out} holds no complete checkpoint to resume from"], err
    assert os.listdir(tmp_path / "empty") == [] and not (tmp_path / "missing").exists()


def test_second_run_into_the_same_directory_refuses(cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(train.main, small_run(cache_dir, out, "train.max_steps=1"), capsys)[0] == 0
    before = (out / "adapter/adapter_model.safetensors").read_bytes()
    code, _, err = run_main(train.main, small_run(cache_dir, out, "train.max_steps=1"), capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err and "train.overwrite=true" in err
    # a bad input with overwrite=true must not delete the earlier run either
    code, _, err = run_main(
        train.main, small_run(cache_dir, out, "train.overwrite=true", "data.train_file=/nope.json"), capsys
    )
    assert code == 2 and (out / "adapter/adapter_model.safetensors").read_bytes() == before
    assert run_main(train.main, small_run(cache_dir, out, "train.max_steps=1", "train.overwrite=true"), capsys)[0] == 0


def test_nonfinite_loss_skips_then_stops(cache_dir, tmp_path, capsys, monkeypatch):
    real = L.loss_sum
    monkeypatch.setattr(
        L, "loss_sum", lambda m, b, **k: (real(m, b)[0] * float("nan"), 1) if m.training else real(m, b, **k)
    )
    code, _, err = run_main(train.main, small_run(cache_dir, tmp_path / "run", "train.max_bad_steps=3"), capsys)
    assert code == 2
    assert err.count("loss is NaN/inf, step skipped") >= 2
    assert "the loss was NaN/inf for 3 steps in a row" in err


# ---------------------------------------------------------------- bad input: one line, exit 2, no traceback


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_data", "nope.json: file not found"),
        ("malformed", "bad.json, line 3: invalid JSON"),
        ("not_list", "bad.json: expected a JSON list of records, got dict"),
        ("empty", "bad.json: file is empty"),
        ("missing_field", 'bad.json, record 2: field "output" is missing'),
        ("non_string", 'bad.json, record 1: field "input" must be a string, got int'),
        ("model_path", "model.name_or_path: '/no/such/model' does not exist"),
        ("unknown_key", "unknown key train.epochs"),
        ("bad_value", "lora.dropout: must be in"),
    ],
)
def test_bad_input_gives_one_clear_line(case, message, cache_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    files = {
        "malformed": '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]',
        "not_list": '{"instruction": "a", "output": "b"}',
        "empty": "",
        "missing_field": '[{"instruction": "a", "output": "b"}, {"instruction": "a"}]',
        "non_string": '[{"instruction": "a", "input": 3, "output": "b"}]',
    }
    extra = {
        "missing_data": [f"data.train_file={tmp_path / 'nope.json'}"],
        "model_path": ["model.name_or_path=/no/such/model"],
        "unknown_key": ["train.epochs=3"],
        "bad_value": ["lora.dropout=-0.1"],
    }.get(case, [])
    if case in files:
        extra = [f"data.train_file={write(bad, files[case])}"]
    code, _, err = run_main(train.main, small_run(cache_dir, tmp_path / "run", *extra), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_missing_config_from_the_command_line(tmp_path):
    """The real entry point, in a subprocess: one line on stderr, exit code 2, no traceback."""
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert p.returncode == 2
    assert p.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: config file not found"


def test_shortened_demo_learns_to_answer_held_out_records(cache_dir, tmp_path, capsys):
    """The default demo (data/demo.json, the default settings) cut to 200 steps: greedy answers to the
    held-out eval records go from none right to (nearly) all of them, scored by exact match."""
    out = tmp_path / "run"
    argv = [CONFIG, f"model.cache_dir={cache_dir}", f"train.output_dir={out}", "train.max_steps=200"]
    code, stdout, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    evals = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "exact_match" in e]
    assert [e["step"] for e in evals] == [0, 100, 200]
    before, after = evals[0]["exact_match"], evals[-1]["exact_match"]
    assert before == 0.0 and after >= 0.8, (before, after)
    assert evals[-1]["eval_loss"] < 0.5 and evals[0]["eval_loss"] > 5
    assert f"step 200: eval_loss {evals[-1]['eval_loss']:.4f}, exact_match {after:.3f} (end of training)" in stdout


def test_eval_max_new_tokens_0_turns_generation_off(cache_dir, tmp_path, capsys, monkeypatch):
    def no_generation(*a, **k):
        raise AssertionError("evaluation.predict called with train.eval_max_new_tokens=0")

    monkeypatch.setattr(evaluation, "predict", no_generation)
    out = tmp_path / "run"
    argv = small_run(cache_dir, out, "train.max_steps=2", "train.eval_max_new_tokens=0")
    code, stdout, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    evals = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in e]
    assert evals and not any("exact_match" in e for e in evals) and "exact_match" not in stdout
