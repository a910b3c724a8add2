"""Sequence packing (data.packing): a packed micro-batch computes what the padded one computes.

The references are the padded batch (the loss, its count of labelled tokens, every adapter gradient) and
each example run alone (its logits), on the tiny Llama, Qwen2 and Gemma 2 configurations of
test_architectures.py, under sdpa and eager (Gemma 2: eager, also with a short sliding window). A mutant
mask that lets attention cross examples has to fail the same comparisons. Then the places batches are
built: evaluation, the batch-size probe, resume, and a federated run.
"""

import functools
import json
import os

import pytest
import torch
import transformers.masking_utils

import config as C
import data as D
import evaluation
import federated
import lora
import loss as L
import model as M
import train
import trainer
from conftest import run_main, tiny_dir
from test_architectures import relative, save_tiny, with_random_adapter
from test_train import CONFIG, ROOT, small_run, tiny

FAMILIES = ["llama", "qwen2", "gemma2"]


@pytest.fixture(scope="module")
def arch(cache_dir, tmp_path_factory):
    """(family, extra config) -> a saved tiny model, as test_architectures builds them; Gemma 2 also with a
    sliding window of 6 tokens, shorter than the examples, so that its local layers mask by window too."""
    built = {}

    def get(family, **extra):
        key = (family, *sorted(extra.items()))
        if key not in built:
            built[key] = save_tiny(family, cache_dir, str(tmp_path_factory.mktemp(family)), **extra)
        return built[key]

    return get


def examples(tok, train_on="assistant"):
    """Ragged examples: Alpaca records (one turn) and multi-turn conversations, 12 to 60 tokens."""
    alpaca = D.load_records(os.path.join(ROOT, "data/demo.json"))[:5]
    chats = D.load_records(os.path.join(ROOT, "data/chat_demo.json"))[:5]
    return D.tokenize_records(tok, alpaca + chats, 64, train_on=train_on)


CASES = [(f, a, {}) for f in ("llama", "qwen2") for a in ("sdpa", "eager")] + [
    ("gemma2", "eager", {}),  # transformers runs Gemma 2 in eager only (its soft-capped attention scores)
    ("gemma2", "eager", {"sliding_window": 6}),
]


def case_id(case):
    family, attention, extra = case
    return "-".join([family, attention, *(f"{k}{v}" for k, v in extra.items())])


@pytest.fixture(params=CASES, ids=case_id)
def packed_model(request, arch):
    family, attention, extra = request.param
    model, tok = M.load_model(arch(family, **extra), "none", torch.float32, "cpu", attention, False)
    params = with_random_adapter(model)
    model.eval()  # no dropout: the two layouts must see the same function
    return model, tok, params


def loss_and_grads(model, params, batch):
    total, n = L.loss_sum(model, batch)
    return total / n, n, torch.autograd.grad(total / n, params)


def compare_with_padded(model, tok, params, exs):
    """The largest relative difference between the packed and the padded batch: loss and gradients."""
    padded = D.collate(exs, tok.pad_token_id)
    packed = D.collate_packed(exs, tok.pad_token_id, max_len=64)
    assert len(packed["input_ids"]) < len(exs)  # rows do hold several examples
    loss_a, n_a, grads_a = loss_and_grads(model, params, padded)
    loss_b, n_b, grads_b = loss_and_grads(model, params, packed)
    assert n_a == n_b  # the same labelled tokens, so the same normalisation
    return max([relative(loss_b, loss_a)] + [relative(b, a) for a, b in zip(grads_a, grads_b, strict=True)])


def logits_in_pack_vs_alone(model, tok, exs):
    """The largest relative difference between an example's logits inside the pack and alone."""
    packed = D.collate_packed(exs, tok.pad_token_id, max_len=64)
    with torch.no_grad():
        inside = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        worst = 0.0
        for row, ids in enumerate(packed["input_ids"].tolist()):
            starts = [t for t, p in enumerate(packed["position_ids"][row].tolist()) if p == 0]
            for start, end in zip(starts, starts[1:] + [len(ids)], strict=True):
                e = next((e for e in exs if e["input_ids"] == ids[start:end]), None)
                if e is None:  # the row's padding
                    continue
                alone = model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0]
                worst = max(worst, relative(inside[row, start:end], alone))
    return worst


# ---------------------------------------------------------------- the layout


def test_best_fit_decreasing_packs_every_index_once_within_capacity():
    lengths = [70, 10, 30, 60, 20, 40, 90, 5]
    bins = D.pack(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 4  # 325 tokens: the fewest bins of 100 that hold them
    assert D.pack([100, 100], 100) == [[0], [1]]
    with pytest.raises(ValueError, match="101 tokens cannot be packed into rows of 100"):
        D.pack([101], 100)


def test_packed_layout_positions_labels_and_row_width():
    exs = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [1, -100, 3, 4, 5]},
        {"input_ids": [6, 7, 8], "labels": [6, 7, 8]},  # its first label would cross the boundary
        {"input_ids": [9, 10, 11, 12, 13, 14], "labels": [-100, -100, -100, 12, 13, 14]},
    ]
    b = D.collate_packed(exs, pad_id=0, max_len=16, multiple_of=1)
    assert set(b) == {"input_ids", "labels", "position_ids"}  # no attention_mask: the positions tell
    assert b["input_ids"].tolist() == [[9, 10, 11, 12, 13, 14, 1, 2, 3, 4, 5, 6, 7, 8]]  # longest first
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 1, 2]]
    assert b["labels"].tolist() == [[-100, -100, -100, 12, 13, 14, -100, -100, 3, 4, 5, -100, 7, 8]]
    # rows of at most 8: two rows, as short as two rows can be (7 tokens), the padding a segment of its own
    b = D.collate_packed(exs, pad_id=0, max_len=8, multiple_of=1)
    assert b["input_ids"].tolist() == [[9, 10, 11, 12, 13, 14, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2]]
    # rows are balanced: 14 tokens of examples 5, 5, 4 in rows of at most 10 -> two rows of 9, not 10 + 4
    five = [{"input_ids": [1] * n, "labels": [1] * n} for n in (5, 5, 4)]
    assert D.collate_packed(five, pad_id=0, max_len=10, multiple_of=1)["input_ids"].shape == (2, 9)
    assert D.collate_packed(five, pad_id=0, max_len=None, multiple_of=8)["input_ids"].shape == (1, 16)  # one row
    with pytest.raises(ValueError, match="pad_id is None"):
        D.collate_packed(exs, pad_id=None, max_len=8)


def test_a_packed_batch_counts_the_padded_batchs_labels_with_train_on_all(cache_dir):
    tok = M.load_tokenizer(tiny_dir(cache_dir))
    exs = examples(tok, train_on="all")  # every first token has a label: packing must drop it, as padding does
    padded, packed = D.collate(exs, tok.pad_token_id), D.collate_packed(exs, tok.pad_token_id, 64)
    count = lambda b: int((b["labels"][:, 1:] != D.IGNORE_INDEX).sum())  # noqa: E731 (what train_step counts)
    assert count(packed) == count(padded) == sum(len(e["input_ids"]) - 1 for e in exs)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()


# ---------------------------------------------------------------- the model sees each example alone


def test_packed_loss_and_gradients_equal_the_padded_batch(packed_model):
    model, tok, params = packed_model
    assert compare_with_padded(model, tok, params, examples(tok)) <= 1e-5


def test_logits_inside_a_pack_equal_the_example_alone(packed_model):
    model, tok, _ = packed_model
    assert logits_in_pack_vs_alone(model, tok, examples(tok)) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_across_examples_fails_both_comparisons(family, arch, monkeypatch):
    """The mutant: transformers finds no packed sequences, so its mask is causal over the whole row."""
    model, tok = M.load_model(arch(family), "none", torch.float32, "cpu", "auto", False)  # sdpa, or Gemma's eager
    params = with_random_adapter(model)
    model.eval()
    exs = examples(tok)
    trainer.check_packing(model, exs[0], torch.device("cpu"), torch.float32)  # the real mask passes
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert compare_with_padded(model, tok, params, exs) > 1e-3
    assert logits_in_pack_vs_alone(model, tok, exs) > 1e-3
    with pytest.raises(M.ModelError, match="lets attention cross the examples of a packed row"):
        trainer.check_packing(model, exs[0], torch.device("cpu"), torch.float32)  # what train.py runs first


def test_a_model_whose_attention_crosses_examples_is_refused_in_one_line(cache_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    code, _, err = run_main(train.main, small_run(cache_dir, tmp_path / "run", "data.packing=true"), capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "set data.packing=false" in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # nothing written


# ---------------------------------------------------------------- where batches are built


def test_evaluation_gives_the_same_loss_packed_or_not(cache_dir):
    model, tok = tiny(cache_dir)
    exs = examples(tok)
    cpu, f32 = torch.device("cpu"), torch.float32
    padded = evaluation.evaluate(model, exs, 4, functools.partial(D.collate, pad_id=tok.pad_token_id), cpu, f32)
    packed_collate = functools.partial(D.collate_packed, pad_id=tok.pad_token_id, max_len=64)
    packed = evaluation.evaluate(model, exs, 4, packed_collate, cpu, f32)
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-5)


def test_collator_follows_the_config_and_the_attention(cache_dir):
    model, tok = tiny(cache_dir)
    cfg = C.load_config(CONFIG, ["data.packing=true", "data.max_seq_len=64"])
    exs = examples(tok)
    dc = cfg["data"]
    assert "position_ids" in trainer.collator(model, tok.pad_token_id, dc["packing"], dc["max_seq_len"])(exs)
    assert trainer.collator(model, tok.pad_token_id, True, 64)(exs)["input_ids"].shape[1] <= 64
    model.config._attn_implementation = "flash_attention_2"  # its varlen kernel takes one row of them all
    assert len(trainer.collator(model, tok.pad_token_id, True, 64)(exs)["input_ids"]) == 1
    dc = C.load_config(CONFIG, [])["data"]
    assert "attention_mask" in trainer.collator(model, tok.pad_token_id, dc["packing"], dc["max_seq_len"])(exs)


def test_batch_size_probe_measures_packed_micro_batches(cache_dir, monkeypatch):
    model, tok = tiny(cache_dir)
    lora.inject(model, ["q_proj"], r=2)
    lora.mark_trainable(model, ["default"])
    exs = examples(tok)
    real, seen = L.loss_sum, []

    def loss_sum(model, batch, **kw):  # a GPU with room for two rows
        seen.append("position_ids" in batch)
        if len(batch["input_ids"]) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(model, batch, **kw)

    monkeypatch.setattr(L, "loss_sum", loss_sum)
    longest = max(len(e["input_ids"]) for e in exs)
    rows_of_two = functools.partial(D.collate_packed, pad_id=tok.pad_token_id, max_len=2 * longest)
    cpu, f32 = torch.device("cpu"), torch.float32
    assert trainer.largest_batch_size(model, exs, rows_of_two, cpu, f32, limit=64) == 4  # two in each row
    assert all(seen)
    padded = functools.partial(D.collate, pad_id=tok.pad_token_id)
    assert trainer.largest_batch_size(model, exs, padded, cpu, f32, limit=64) == 2  # one in each row


@pytest.mark.parametrize("extra", [(), ("lora.use_dora=true", "train.grad_accum=2")])
def test_packed_resume_equals_an_uninterrupted_packed_run(extra, cache_dir, tmp_path, capsys, monkeypatch):
    extra = ("data.packing=true", "data.max_seq_len=64", "train.keep_checkpoints=5", *extra)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_main(train.main, small_run(cache_dir, full, *extra), capsys)[0] == 0
    real_step, calls = trainer.train_step, []

    def crash_on_fifth(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        assert "position_ids" in a[4][0]  # the micro-batches are packed
        return real_step(*a, **k)

    monkeypatch.setattr(trainer, "train_step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        train.main(small_run(cache_dir, cut, *extra))
    monkeypatch.setattr(trainer, "train_step", real_step)
    assert run_main(train.main, small_run(cache_dir, cut, *extra) + ["--resume"], capsys)[0] == 0
    a, b = lora.read_adapter(str(full / "adapter"))[1], lora.read_adapter(str(cut / "adapter"))[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_up_to_rounding(a_dir, b_dir):
    """Two adapter directories equal up to float summation order. Adam's first steps move each weight by
    about lr times the sign of its gradient, so a rounding difference in a near-zero gradient moves a
    weight the other way: single weights may differ by 1e-3 relative after a few steps, whole tensors
    (measured: up to 1.1e-4 in Frobenius norm) by much less than any real change of the training."""
    a, b = lora.read_adapter(str(a_dir))[1], lora.read_adapter(str(b_dir))[1]
    assert a.keys() == b.keys()
    for k in a:
        assert ((b[k] - a[k]).norm() / a[k].norm()).item() <= 1e-3, k


def logged(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_packed_run_trains_what_the_padded_run_trains(cache_dir, tmp_path, capsys):
    """fp32, dropout 0: the same examples in every step, so the same losses, gradient norms and eval
    losses up to summation order (measured: 2e-7 relative), and the same adapters."""
    same = ("model.compute_dtype=float32", "lora.dropout=0", "data.max_seq_len=64")
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    assert run_main(train.main, small_run(cache_dir, padded, *same), capsys)[0] == 0
    assert run_main(train.main, small_run(cache_dir, packed, *same, "data.packing=true"), capsys)[0] == 0
    for a, b in zip(logged(padded), logged(packed), strict=True):
        for k in ("loss", "grad_norm", "eval_loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5), (a["step"], k)
    same_up_to_rounding(padded / "adapter", packed / "adapter")


def test_federated_clients_train_packed_as_padded(cache_dir, tmp_path, capsys):
    """Each client's steps and evaluation (client.Client: the code a Flower site runs) packed: the same
    round as padded, up to summation order."""
    same = ("model.compute_dtype=float32", "lora.dropout=0", "data.max_seq_len=64")
    runs = {}
    for name, extra in (("padded", ()), ("packed", ("data.packing=true",))):
        out = tmp_path / name
        argv = [CONFIG, f"model.cache_dir={cache_dir}", f"federated.output_dir={out}", "federated.rounds=1",
                "federated.local_steps=2", "federated.global_steps=3", "train.batch_size=4",
                "federated.max_new_tokens=2", *same, *extra]  # fmt: skip
        assert run_main(federated.main, argv, capsys)[0] == 0
        runs[name] = out
    rows = [[e for e in logged(runs[name]) if "client" in e] for name in ("padded", "packed")]
    assert len(rows[0]) == 12  # 4 clients x 3 views
    for a, b in zip(*rows, strict=True):
        assert (a["client"], a["adapters"]) == (b["client"], b["adapters"])
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    same_up_to_rounding(runs["padded"] / "round_001/global", runs["packed"] / "round_001/global")
    for c in ("fr", "de", "es", "it"):
        same_up_to_rounding(
            runs["padded"] / f"round_001/clients/{c}/local", runs["packed"] / f"round_001/clients/{c}/local"
        )
