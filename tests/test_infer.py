"""infer.py: the metrics by hand, weighted adapters, greedy output against PEFT, the baseline, chat, bad input."""

import itertools
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import data as D
import evaluation
import infer
import lora
import model as M
from conftest import run_main, seconds, tiny_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")
PROMPT = "What is the opposite of hot?"


def fp32(cache_dir):
    """Overrides for the tiny base unquantized in float32 on the CPU: results exact enough to compare."""
    return [
        CONFIG,
        f"model.cache_dir={cache_dir}",
        "model.quantization=none",
        "model.compute_dtype=float32",
        "model.device=cpu",
    ]


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def peft_model(base_path, adapter_dir=None):
    """The plain transformers fp32 base, with the adapter opened by PEFT: the reference."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    return (base if adapter_dir is None else peft.PeftModel.from_pretrained(base, adapter_dir)).eval()


def greedy(model, prompt_ids, max_new_tokens):
    """transformers' own greedy continuation of one prompt, cut at the first eos."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=model.config.pad_token_id,
    )
    new, eos = out[0, len(prompt_ids) :].tolist(), model.config.eos_token_id
    return new[: new.index(eos)] if eos in new else new


# ---------------------------------------------------------------- metrics


def test_exact_match_and_rouge_l_by_hand():
    assert evaluation.exact_match("  The cat\n sat ", "The cat sat") == 1.0  # whitespace is normalized
    assert evaluation.exact_match("the cat sat", "The cat sat") == 0.0  # case is not
    # LCS(the cat sat on the mat, the cat lay on a mat) = "the cat on mat": P = R = 4/6
    assert evaluation.rouge_l("the cat sat on the mat", "The cat lay on a mat") == pytest.approx(2 / 3)
    assert evaluation.rouge_l("a b c", "a c") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # P 2/3, R 1: 0.8
    assert evaluation.rouge_l("Paris", "paris") == 1.0 and evaluation.rouge_l("x y", "z") == 0.0
    assert evaluation.rouge_l("", "") == 1.0 and evaluation.rouge_l("", "a") == 0.0
    assert evaluation.rouge_l("a", "") == 0.0


def test_rouge_l_equals_brute_force_lcs():
    def lcs(a, b):  # the longest subsequence of a that is also one of b, by trying them all
        for k in range(len(a), 0, -1):
            for sub in itertools.combinations(a, k):
                it = iter(b)
                if all(t in it for t in sub):  # `in` on an iterator consumes it: a subsequence test
                    return k
        return 0

    rng = random.Random(0)
    for _ in range(200):
        p = [rng.choice("abcd") for _ in range(rng.randint(1, 7))]
        r = [rng.choice("abcd") for _ in range(rng.randint(1, 7))]
        n = lcs(p, r)
        expect = 0.0 if n == 0 else 2 * n / (len(p) + len(r))  # F1 with P = n/|p|, R = n/|r|
        assert evaluation.rouge_l(" ".join(p), " ".join(r)) == pytest.approx(expect)


def test_score_known_predictions():
    records = [
        {"instruction": "i1", "input": "", "output": "cold"},
        {"instruction": "i2", "input": "x", "output": "the big red dog"},
        {"instruction": "i3", "input": "", "output": "positive"},
    ]
    rows, metrics = evaluation.score(records, ["cold", "a big dog", "negative"])
    assert [r["exact_match"] for r in rows] == [1.0, 0.0, 0.0]
    assert [r["rouge_l"] for r in rows] == pytest.approx([1.0, 2 * 2 / (3 + 4), 0.0])  # LCS "big dog": 2
    assert [r["contains"] for r in rows] == [1.0, 0.0, 0.0]
    assert metrics == {
        "n": 3,
        "exact_match": pytest.approx(1 / 3),
        "rouge_l": pytest.approx((1 + 4 / 7) / 3),
        "contains": pytest.approx(1 / 3),
    }
    assert rows[1] == {
        "instruction": "i2",
        "input": "x",
        "reference": "the big red dog",
        "prediction": "a big dog",
        "exact_match": 0.0,
        "rouge_l": pytest.approx(4 / 7),
        "contains": 0.0,
    }


def test_contains_matches_whole_words_in_a_row():
    assert evaluation.contains("The capital of France is Paris.", "Paris") == 1.0  # case and punctuation dropped
    assert evaluation.contains("It is Parisian.", "Paris") == 0.0  # whole words only
    assert evaluation.contains("Leonardo da Vinci painted it", "da Vinci") == 1.0
    assert evaluation.contains("Vinci da Leonardo", "da Vinci") == 0.0  # in order, in a row
    assert evaluation.contains("water is H2O!", "h2o") == 1.0 and evaluation.contains("", "a") == 0.0


# ---------------------------------------------------------------- adapters


def test_adapter_weights_scale_lora_updates(cache_dir, adapters):
    tiny = tiny_dir(cache_dir)
    ids = torch.tensor([D.encode(M.load_tokenizer(tiny), PROMPT)])
    ours, _ = M.load_model(tiny, "none", torch.float32, "cpu", gradient_checkpointing=False)
    assert lora.load_adapters(ours, [adapters["lora"], adapters["lora2"]], [0.5, -2.0]) == ["a0", "a1"]
    ref, _ = M.load_model(tiny, "none", torch.float32, "cpu", gradient_checkpointing=False)
    for name, path, w in [("x", adapters["lora"], 0.5), ("y", adapters["lora2"], -2.0)]:
        lora.load_adapter(ref, path, name)
        with torch.no_grad():  # w * s * B A, with w folded into B instead
            for m in ref.modules():
                if isinstance(m, lora.LoRALinear) and name in m.config:
                    m.lora_B[name].mul_(w)
    lora.set_active(ref, ["x", "y"])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_dora_adapter_takes_weight_one_only(cache_dir, adapters):
    model, _ = M.load_model(tiny_dir(cache_dir), "none", torch.float32, "cpu", gradient_checkpointing=False)
    with pytest.raises(ValueError, match="a DoRA adapter cannot be weighted"):
        lora.load_adapters(model, [adapters["lora"], adapters["dora"]], [0.5, 0.5])
    model, _ = M.load_model(tiny_dir(cache_dir), "none", torch.float32, "cpu", gradient_checkpointing=False)
    assert lora.load_adapters(model, [adapters["dora"]], [1.0]) == ["a0"]


# ---------------------------------------------------------------- generation against PEFT, the baseline


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_greedy_output_equals_peft(kind, cache_dir, adapters, capsys):
    tiny = tiny_dir(cache_dir)
    tok = M.load_tokenizer(tiny)
    prompt_ids = D.encode(tok, D.render_prompt(tok, PROMPT))  # the training prompt, as infer.py renders it
    theirs = greedy(peft_model(tiny, adapters[kind]), prompt_ids, 8)
    code, out, err = run_main(
        infer.main,
        fp32(cache_dir)
        + ["--adapter", adapters[kind], "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "8"],
        capsys,
    )
    assert code == 0, err
    assert out.strip() == tok.decode(theirs, skip_special_tokens=True).strip()  # the streamed text
    assert theirs != greedy(peft_model(tiny), prompt_ids, 8)  # the adapter does change the answer


def test_batch_predictions_equal_peft_one_by_one(cache_dir, adapters, tmp_path, capsys):
    """Batch mode left-pads prompts of different lengths together; each answer must be the unbatched one."""
    tiny = tiny_dir(cache_dir)
    tok = M.load_tokenizer(tiny)
    records = D.load_records(os.path.join(ROOT, "data/clients/es.json"))[:5]
    data_file = write_records(tmp_path / "eval.jsonl", records)
    code, _, err = run_main(
        infer.main,
        fp32(cache_dir)
        + [
            "--adapter",
            adapters["lora"],
            "--input",
            data_file,
            "--output",
            str(tmp_path / "preds.jsonl"),
            "--max-new-tokens",
            "6",
        ],
        capsys,
    )
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len({len(D.encode(tok, D.render_prompt(tok, r["instruction"], r["input"]))) for r in records}) > 1
    theirs = peft_model(tiny, adapters["lora"])
    for r, row in zip(records, rows, strict=True):
        ids = D.encode(tok, D.render_prompt(tok, r["instruction"], r["input"]))
        assert row["prediction"] == tok.decode(greedy(theirs, ids, 6), skip_special_tokens=True).strip()


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_default_nf4_bf16_inference_against_peft_on_the_same_base(kind, cache_dir, adapters, tmp_path, capsys):
    """The default inference path (NF4 base, bf16; set explicitly so that it runs as bf16 on any CPU)
    against PEFT's adapter on the very same NF4 base under the same autocast, on infer.py's batch.

    LoRA: the same logits and so the same greedy answers. DoRA: PEFT orders the bf16 operations of the
    weight norm differently, so logits differ by ~1% (measured 0.06-0.08 on logits up to 6.7); along
    PEFT's greedy path ours must stay within 3% and pick PEFT's token wherever that is no near-tie."""
    peft = pytest.importorskip("peft")
    tiny = tiny_dir(cache_dir)
    records = D.load_records(os.path.join(ROOT, "data/clients/fr.json"))[:6]
    argv = [CONFIG, f"model.cache_dir={cache_dir}", "model.quantization=nf4", "model.compute_dtype=bfloat16",
            "model.device=cpu", "--adapter", adapters[kind], "--input", write_records(tmp_path / "in.jsonl", records),
            "--output", str(tmp_path / "preds.jsonl"), "--max-new-tokens", "8"]  # fmt: skip
    code, _, err = run_main(infer.main, argv, capsys)
    assert code == 0, err
    ours = [json.loads(line)["prediction"] for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    base, tok = M.load_model(tiny, "nf4", torch.bfloat16, "cpu", "auto", gradient_checkpointing=False)  # as infer.py
    theirs = peft.PeftModel.from_pretrained(base, adapters[kind]).eval()
    # the same batch as infer.py's: prompts sorted by length, left-padded so that they end together
    # (in bf16 a row's numbers depend on its padding, so one-by-one answers may differ after a few tokens)
    prompts = [(D.encode(tok, D.render_prompt(tok, r["instruction"], r["input"])), i) for i, r in enumerate(records)]
    prompts.sort(key=lambda p: len(p[0]))
    width = max(len(p) for p, _ in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p, _ in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in prompts])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    answers = [None] * len(records)
    for (_, i), row in zip(prompts, out[:, width:].tolist(), strict=True):
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        answers[i] = tok.decode(row, skip_special_tokens=True).strip()
    assert len(set(answers)) > 1  # not one degenerate answer for everything
    if kind == "lora":
        assert ours == answers
        return
    mine, _ = M.load_model(tiny, "nf4", torch.bfloat16, "cpu", "auto", gradient_checkpointing=False)
    lora.load_adapters(mine, [adapters[kind]])
    full_mask = torch.cat([mask, torch.ones_like(out[:, width:])], dim=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = theirs(input_ids=out, attention_mask=full_mask).logits.float()[:, width - 1 : -1]  # (B, new, V)
        got = mine.eval()(input_ids=out, attention_mask=full_mask).logits.float()[:, width - 1 : -1]
    diff = (got - ref).abs().max()
    assert diff <= 0.03 * ref.abs().max(), (diff, ref.abs().max())
    top2 = ref.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 2 * diff  # not a near-tie at this resolution
    assert decided.float().mean() > 0.5
    assert torch.equal(got.argmax(-1)[decided], ref.argmax(-1)[decided])


def test_baseline_batch_mode_writes_predictions_and_metrics(cache_dir, tmp_path, capsys):
    records = [
        {"instruction": "What is the opposite of hot?", "output": "cold"},
        {"instruction": "Classify: lion", "input": "", "output": "animal"},
        {"instruction": "Is this review positive or negative?", "input": "The movie was great.", "output": "positive"},
    ]
    data_file = write_records(tmp_path / "small.jsonl", records)
    preds = tmp_path / "out" / "preds.jsonl"  # its folder is created
    code, out, err = run_main(
        infer.main, fp32(cache_dir) + ["--input", data_file, "--output", str(preds), "--max-new-tokens", "4"], capsys
    )
    assert code == 0, err
    assert "with no adapter" in err
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [(r["instruction"], r["input"], r["reference"]) for r in rows] == [
        (r["instruction"], r.get("input", ""), r["output"]) for r in records
    ]
    for row in rows:
        assert row["exact_match"] == evaluation.exact_match(row["prediction"], row["reference"])
        assert row["rouge_l"] == evaluation.rouge_l(row["prediction"], row["reference"])
        assert row["contains"] == evaluation.contains(row["prediction"], row["reference"])
    metrics = json.loads((tmp_path / "out" / "preds.metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["adapters"] == [] and metrics["max_new_tokens"] == 4
    assert metrics["exact_match"] == pytest.approx(sum(r["exact_match"] for r in rows) / 3)
    assert metrics["rouge_l"] == pytest.approx(sum(r["rouge_l"] for r in rows) / 3)
    assert f"exact_match {metrics['exact_match']:.4f}" in out


def test_sampling_runs_with_two_adapters(cache_dir, adapters, capsys):
    code, out, err = run_main(
        infer.main,
        fp32(cache_dir)
        + [
            "--adapter",
            adapters["lora"],
            "--adapter",
            adapters["dora"],
            "--prompt",
            PROMPT,
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--max-new-tokens",
            "5",
        ],
        capsys,
    )
    assert code == 0 and out.strip(), err
    assert f"{adapters['lora']} + {adapters['dora']}" in err


# ---------------------------------------------------------------- chat


def scripted_input(*lines):
    """A stand-in for input(): the lines, then EOFError as at the end of a pipe."""
    it = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return fake_input


def test_chat_keeps_the_history_and_resets(cache_dir, monkeypatch):
    tok = M.load_tokenizer(tiny_dir(cache_dir))
    prompts = []

    def fake_generate(model, tok_, batch, device, dtype, gen, streamer=None):
        prompts.append(tok.decode(batch[0]))
        return [D.encode(tok, f"reply {len(prompts)}")]

    monkeypatch.setattr(evaluation, "generate", fake_generate)
    monkeypatch.setattr("builtins.input", scripted_input("hello", "", "and then?", "/reset", "again", "/exit", "no"))
    infer.chat(None, tok, "Be brief.", "cpu", torch.float32, {})
    sys_turn = "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert prompts[0] == sys_turn + "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert prompts[0] == D.render_prompt(tok, "hello", "", "Be brief.")  # a first turn is a training prompt
    assert (
        prompts[1] == prompts[0] + "reply 1<|im_end|>\n<|im_start|>user\nand then?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompts[2] == D.render_prompt(tok, "again", "", "Be brief.")  # /reset forgot the first two turns
    assert len(prompts) == 3  # the empty line asked nothing; /exit stopped before "no"

    tok.chat_template = None  # no template: each message alone, in the Alpaca prompt; EOF ends the chat
    monkeypatch.setattr("builtins.input", scripted_input("hi", "ho"))
    prompts.clear()
    infer.chat(None, tok, None, "cpu", torch.float32, {})
    assert prompts == [D.render_prompt(tok, "hi"), D.render_prompt(tok, "ho")]


@pytest.mark.parametrize("stdin", ["hello\nand you?\n/exit\n", ""], ids=["scripted", "closed"])
def test_chat_from_a_pipe_exits_cleanly(stdin, cache_dir, tmp_path):
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "infer.py"), *fp32(cache_dir), "--max-new-tokens", "4"],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=seconds(300),
    )
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and p.stdout.startswith("> ")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_adapter", "adapter /no/such/adapter: no such directory"),
        ("other_base", "the model expects (4, 688) (an adapter for another base?)"),
        ("not_an_adapter", "adapter_config.json: file not found"),
        ("output_exists", "preds.jsonl already exists"),
        ("metrics_exist", "preds.metrics.json already exists"),
        ("dora_weight", "a DoRA adapter cannot be weighted"),
        ("weight_count", "2 adapter weights for 1 adapters"),
        ("prompt_and_input", "--prompt, --input and --benchmark: give one of them"),
        ("input_no_output", "--input and --output go together"),
        ("temperature", "need --temperature >= 0"),
        ("missing_data", "nope.json: file not found"),
        ("unknown_key", "unknown key model.quantisation; did you mean model.quantization?"),
    ],
)
def test_bad_input_gives_one_clear_line(case, message, cache_dir, adapters, tmp_path, capsys):
    data_file = write_records(tmp_path / "eval.jsonl", [{"instruction": "a", "output": "b"}])
    preds = tmp_path / "preds.jsonl"
    batch = ["--input", data_file, "--output", str(preds)]
    args = {
        "missing_adapter": ["--adapter", "/no/such/adapter", *batch],
        "other_base": ["--adapter", adapters["other_base"], *batch],
        "not_an_adapter": ["--adapter", str(tmp_path), *batch],
        "output_exists": batch,
        "metrics_exist": batch,
        "dora_weight": ["--adapter", adapters["dora"], "--adapter-weight", "0.5", *batch],
        "weight_count": ["--adapter", adapters["lora"], "--adapter-weight", "1", "--adapter-weight", "2", *batch],
        "prompt_and_input": ["--prompt", "hi", *batch],
        "input_no_output": ["--input", data_file],
        "temperature": ["--temperature", "-1", "--prompt", "hi"],
        "missing_data": ["--input", str(tmp_path / "nope.json"), "--output", str(preds)],
        "unknown_key": batch,
    }[case]
    if case == "output_exists":
        preds.write_text("earlier predictions\n")
    if case == "metrics_exist":
        (tmp_path / "preds.metrics.json").write_text("{}")
    before = sorted(os.listdir(tmp_path))
    overrides = ["model.quantisation=none"] if case == "unknown_key" else []  # overrides come before options
    code, out, err = run_main(infer.main, fp32(cache_dir) + overrides + args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    if case == "output_exists":
        assert preds.read_text() == "earlier predictions\n"


def test_missing_adapter_from_the_command_line(cache_dir, tmp_path):
    """The real entry point, in a subprocess: one line on stderr, exit code 2, no traceback."""
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "infer.py"), *fp32(cache_dir), "--adapter", "gone", "--prompt", "hi"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=seconds(300),
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == "error: adapter gone: no such directory"
