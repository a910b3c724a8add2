"""Every architecture the project claims, as a tiny random-init model built from transformers' own config
classes (no download), with transformers as the oracle: our chunked loss and its adapter gradients equal
`model(**batch).loss` and its autograd gradients; a few steps lower the loss; the adapter opens in PEFT
with the same logits; merge.py and infer.py run; `attention: auto` picks what the model supports."""

import os

import pytest
import torch
import transformers

import data as D
import infer
import lora
import loss as L
import merge
import model as M
import prepare
import train
import trainer
from conftest import run_main, tiny_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")

# family: (config class, model class, extra config). Gemma 2 soft-caps its logits at 30 and Cohere scales them
# by 0.0625 (their defaults); Granite's logits_scaling is set to 4 so that its division shows.
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
}
# what all-linear adapts in each family's decoder layers (the output layer never)
PROJECTIONS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "olmo2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_tiny(family, cache_dir, path, **extra):
    """A tiny random-init model of `family` (ARCHS, plus `extra` config) with the tiny model's tokenizer,
    saved in `path`; returns path."""
    config_cls, model_cls, arch_extra = ARCHS[family]
    tok = M.load_tokenizer(tiny_dir(cache_dir))
    config = getattr(transformers, config_cls)(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False, **arch_extra, **extra,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(config).float()
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # logits up to ~20: Gemma 2's soft-cap acts
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def arch_dir(cache_dir, tmp_path_factory):
    """family -> a saved tiny model of that family (save_tiny), built on first use."""
    built = {}

    def get(family):
        if family not in built:
            built[family] = save_tiny(family, cache_dir, str(tmp_path_factory.mktemp(family)))
        return built[family]

    return get


def load(path, quantization="none", dtype=torch.float32, attention="auto"):
    return M.load_model(path, quantization, dtype, "cpu", attention, gradient_checkpointing=False)


def demo_batch(tok, n=4):
    records = D.load_records(os.path.join(ROOT, "data/demo.json"))[:n]
    return D.collate(D.tokenize_records(tok, records, 64), tok.pad_token_id)


def with_random_adapter(model, seed=0):
    """An all-linear adapter whose B is not zero, so that it changes the logits and gets gradients; seeded,
    A included (drawn from the global generator), so a test does not depend on what ran before it."""
    torch.manual_seed(seed)
    lora.inject(model, lora.ALL_LINEAR, r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora.mark_trainable(model, ["default"])
    return list(lora.adapter_parameters(model, "default"))


def relative(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("family", ARCHS)
def test_loss_and_gradients_equal_transformers(family, arch_dir):
    model, tok = load(arch_dir(family))
    params = with_random_adapter(model)
    batch = demo_batch(tok)
    total, n = L.loss_sum(model, batch)
    ours = torch.autograd.grad(total / n, params)
    loss = model(**batch).loss  # transformers: full logits, its own transform, then cross-entropy
    theirs = torch.autograd.grad(loss, params)
    assert relative(total / n, loss) <= 1e-5, (family, (total / n).item(), loss.item())
    for a, b in zip(ours, theirs, strict=True):
        assert relative(a, b) <= 1e-5
    if family in ("gemma2", "cohere", "granite"):  # the transform matters here: without it the loss is another
        assert L.logit_transform(model.config) != (1.0, None)


@pytest.mark.parametrize("family", ARCHS)
def test_a_few_steps_lower_the_loss(family, arch_dir):
    model, tok = load(arch_dir(family))
    params = with_random_adapter(model)
    optimizer = trainer.make_optimizer(params, 1e-2, 0.0, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = demo_batch(tok)
    model.train()
    losses = [
        trainer.train_step(model, params, optimizer, scaler, [batch], torch.device("cpu"), torch.float32, 1.0)[0]
        for _ in range(6)
    ]
    # measured over seeds 0-4: Cohere 0.77-0.79 (its logit scale 0.0625 flattens the loss), the others <= 0.5
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("family", ARCHS)
def test_adapter_opens_in_peft_with_equal_logits_and_merge_infer_run(family, arch_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    path = arch_dir(family)
    model, tok = load(path)
    with_random_adapter(model)
    lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=path)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = demo_batch(tok)["input_ids"]
    with torch.no_grad():
        assert relative(model.eval()(ids).logits, theirs(ids).logits) <= 1e-5
    # the entry points, on the default NF4 base with bf16 compute where the CPU has it
    argv = [CONFIG, f"model.name_or_path={path}", "--adapter", str(tmp_path / "adapter")]
    code, _, err = run_main(merge.main, [*argv, "--out", str(tmp_path / "merged")], capsys)
    assert code == 0 and os.path.isfile(tmp_path / "merged/model.safetensors"), err
    code, out, err = run_main(infer.main, [*argv, "--prompt", "What is the opposite of hot?", "--max-new-tokens", "4"],
                              capsys)  # fmt: skip
    assert code == 0, err


def test_gemma2_trains_with_attention_auto(arch_dir, cache_dir, tmp_path, capsys):
    """transformers refuses sdpa for Gemma 2 (it soft-caps attention scores): auto must pick eager."""
    path = arch_dir("gemma2")
    assert M.resolve_attention("auto", "cpu", M.model_class_of(path)) == "eager"
    with pytest.raises(M.ModelError, match="Gemma2ForCausalLM does not support sdpa; use auto or eager"):
        M.resolve_attention("sdpa", "cpu", M.model_class_of(path))
    assert M.resolve_attention("auto", "cpu", M.model_class_of(arch_dir("llama"))) == "sdpa"
    argv = [CONFIG, f"model.name_or_path={path}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3",
            "train.batch_size=4", "train.eval_every=0", f"data.train_file={os.path.join(ROOT, 'data/clients/fr.json')}",
            "data.eval_fraction=0.05", "lora.target_modules=all-linear"]  # fmt: skip
    code, out, err = run_main(train.main, argv, capsys)
    assert code == 0, err
    assert "adapters default on 14 linear layers: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in out


def test_all_linear_on_phi3_adapts_its_fused_projections(arch_dir, capsys):
    model, _ = load(arch_dir("phi3"))
    paths = lora.inject(model, lora.ALL_LINEAR, r=2)
    assert {p.rpartition(".")[2] for p in paths} == set(PROJECTIONS["phi3"])
    assert len(paths) == 2 * len(PROJECTIONS["phi3"]) and not any("lm_head" in p for p in paths)


def test_default_targets_on_phi3_warn_about_the_names_it_lacks(arch_dir, capsys):
    model, _ = load(arch_dir("phi3"))
    lc = dict(target_modules=SEVEN, r=2, alpha=4, dropout=0.0, use_dora=False, use_rslora=False)
    prepare.add_adapters(model, lc, ["default"])
    out, err = capsys.readouterr()
    assert "adapters default on 4 linear layers: o_proj, down_proj (2 layers each)" in out
    assert err.strip() == (
        "warning: lora.target_modules: q_proj, k_proj, v_proj, gate_proj, up_proj match no linear layer of "
        "Phi3ForCausalLM, whose layers are named o_proj, qkv_proj, gate_up_proj, down_proj, lm_head "
        "(lora.target_modules=all-linear adapts all but the output layer)"
    )


def test_all_linear_equals_the_seven_projections_on_olmo2(arch_dir):
    model, _ = load(arch_dir("olmo2"))
    names = {p.rpartition(".")[2] for p in lora.inject(model, lora.ALL_LINEAR, r=2)}
    assert names == set(PROJECTIONS["olmo2"])


def test_a_head_the_loss_does_not_reproduce_is_refused(arch_dir, monkeypatch):
    """check_loss compares with transformers' own loss: Cohere with its logit_scale ignored must fail."""
    model, tok = load(arch_dir("cohere"))
    example = D.tokenize_records(tok, D.load_records(os.path.join(ROOT, "data/demo.json"))[:1], 64)[0]
    L.check_loss(model, example["input_ids"], example["labels"])  # the real transform
    monkeypatch.setattr(L, "logit_transform", lambda config: (1.0, None))
    with pytest.raises(ValueError, match="CohereForCausalLM: the chunked loss .* differs from the model's own"):
        L.check_loss(model, example["input_ids"], example["labels"])


def test_an_adapter_on_lm_head_is_refused(arch_dir):
    model, tok = load(arch_dir("llama"))
    lora.inject(model, ["lm_head"], r=2)
    example = D.tokenize_records(tok, D.load_records(os.path.join(ROOT, "data/demo.json"))[:1], 64)[0]
    with pytest.raises(ValueError, match="output layer is a LoRALinear, not a plain nn.Linear"):
        L.check_loss(model, example["input_ids"], example["labels"])
