"""model.py on the CPU: the tiny model build, loading with and without NF4, checkpointing, settings."""

import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402

SUBJECTS = [
    "the cat",
    "a dog",
    "my friend",
    "the teacher",
    "our team",
    "the river",
    "a small bird",
    "the old man",
    "every child",
    "the robot",
    "her sister",
    "the farmer",
]
VERBS = ["likes", "sees", "builds", "finds", "paints", "reads", "carries", "follows", "answers", "remembers"]
OBJECTS = [
    "a red apple",
    "the long road",
    "three books",
    "a quiet song",
    "the blue sky",
    "some warm bread",
    "the final answer",
    "an open door",
    "twelve stones",
    "a bright lamp",
]
PLACES = ["in the morning", "near the lake", "after school", "at night", "in the garden", "on Monday"]


def make_texts(n=400, seed=0):
    rng = random.Random(seed)
    return [
        f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
        for _ in range(n)
    ]


@pytest.fixture(scope="session")
def texts():
    return make_texts()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, texts):
    return M.build_tiny(str(tmp_path_factory.mktemp("models") / "tiny"), texts)


@pytest.fixture(scope="session")
def fp32(tiny):
    return M.load_model(tiny, quantization="none", compute_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def nf4(tiny):
    return M.load_model(tiny, quantization="nf4", compute_dtype=torch.bfloat16, device="cpu")


def batch(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True)


# -----------------------------------------------------------------------------
# build_tiny


def test_build_tiny_is_deterministic_and_built_once(tiny, texts, tmp_path):
    from safetensors.torch import load_file

    files = [os.path.join(tiny, f) for f in ("model.safetensors", "config.json", "tokenizer.json")]
    mtimes = [os.path.getmtime(f) for f in files]
    assert M.build_tiny(tiny, texts) == tiny  # second call: reuse, no rebuild
    assert [os.path.getmtime(f) for f in files] == mtimes

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    other = M.build_tiny(str(tmp_path / "again"), texts)
    assert torch.equal(torch.rand(3), expected)  # building leaves the caller's random state alone (dropout)
    a, b = load_file(os.path.join(tiny, "model.safetensors")), load_file(os.path.join(other, "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a)

    def read(d):
        with open(os.path.join(d, "tokenizer.json"), "rb") as f:
            return f.read()

    assert read(tiny) == read(other)
    assert os.listdir(tmp_path) == ["again"]  # the temp build directory was renamed, not left behind


def test_build_tiny_refuses_a_half_directory_and_no_texts(tmp_path, texts):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(M.ModelError, match="not a complete model build"):
        M.build_tiny(str(tmp_path / "half"), texts)
    with pytest.raises(M.ModelError, match="no texts"):
        M.build_tiny(str(tmp_path / "empty"), ["", "  "])


def test_tiny_loads_with_plain_transformers(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = model.config
    assert cfg.model_type == "qwen2" and not cfg.tie_word_embeddings
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (256, 4, 4, 2)
    assert cfg.vocab_size == len(tok)
    assert 2_000_000 < sum(p.numel() for p in model.parameters()) < 6_000_000
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert cfg.eos_token_id == model.generation_config.eos_token_id == im_end
    assert cfg.pad_token_id == model.generation_config.pad_token_id == endoftext

    text = "The cat reads three books."
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE round-trips, no BOS added

    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    assert (
        tok.apply_chat_template(chat, tokenize=False)
        == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, chat[0]], tokenize=False, add_generation_prompt=True
    )
    assert (
        prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids  # special tokens are single ids, not split


# -----------------------------------------------------------------------------
# load_model


def test_load_none_float32(fp32, texts):
    model, tok = fp32
    assert not model.training and model.config.use_cache is False
    assert tok.padding_side == "right" and tok.pad_token is not None
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    b = batch(tok, texts[:3])
    with torch.no_grad():
        logits = model(**b).logits
    assert logits.shape == (*b["input_ids"].shape, len(tok)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_load_4bit(quant_type, nf4, tiny, fp32, texts):
    import bitsandbytes as bnb

    model, tok = nf4 if quant_type == "nf4" else M.load_model(tiny, quant_type, torch.bfloat16, "cpu")
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(linears) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    for layer in linears:
        assert isinstance(layer, bnb.nn.Linear4bit)
        w = layer.weight
        assert w.dtype == torch.uint8 and w.quant_state.quant_type == quant_type
        assert w.quant_state.nested  # double quantization of the absmax constants
    # the codes themselves: each weight dequantizes to exactly what bitsandbytes' round trip of the checkpoint's
    # weight through this quant type gives, and not to what the other 4-bit type gives
    import bitsandbytes.functional as bnbF

    names = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)][:4]
    dense = dict(fp32[0].named_modules())
    for name in names:
        layer, w = model.get_submodule(name), dense[name].weight.detach().to(torch.bfloat16)
        loaded = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        for qt in ("nf4", "fp4"):
            trip = bnbF.dequantize_4bit(*bnbF.quantize_4bit(w, compress_statistics=True, quant_type=qt))
            assert torch.equal(loaded, trip) == (qt == quant_type), (name, qt)
    # lm_head and embeddings stay in the compute dtype, not 4-bit and not fp32
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype != torch.float32 for p in model.parameters())
    assert all(not p.requires_grad for p in model.parameters())
    total = M.count_parameters(fp32[0])[1]
    assert M.count_parameters(model) == (0, total)

    b = batch(tok, texts[:3])
    with torch.no_grad():
        logits = model(**b).logits.float()
        ref = fp32[0](**b).logits
    assert logits.shape == ref.shape and torch.isfinite(logits).all()
    # a random model has no outliers to protect, so 4-bit error is large-ish; still it must track fp32
    rel = (logits - ref).norm() / ref.norm()
    assert rel < 0.5, rel
    assert torch.nn.functional.cosine_similarity(logits.flatten(), ref.flatten(), dim=0) > 0.9


def test_nf4_trains_after_an_eval_forward(nf4, texts):
    """train -> evaluate -> train must keep working (bitsandbytes' CPU inference repacking is off)."""
    model, tok = nf4
    b = batch(tok, texts[:2])
    with torch.no_grad():
        model(**b)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.quant_state.nested
    norm = model.model.layers[0].input_layernorm.weight
    try:
        model.train()
        norm.requires_grad_(True)
        model(**b, labels=b["input_ids"]).loss.backward()
        assert norm.grad is not None and torch.isfinite(norm.grad).all() and norm.grad.abs().sum() > 0
    finally:
        norm.requires_grad_(False)
        norm.grad = None
        model.eval()


def norm_grad(model, tok, texts):
    """Gradient of the LM loss w.r.t. one layer norm weight, the only parameter we let train."""
    b = batch(tok, texts)
    weight = model.model.layers[1].post_attention_layernorm.weight
    weight.requires_grad_(True)
    model.train()
    model(**b, labels=b["input_ids"]).loss.backward()
    return weight.grad.clone()


def test_gradient_checkpointing_gives_the_same_gradients(tiny, texts):
    plain, tok = M.load_model(tiny, "none", torch.float32, "cpu", gradient_checkpointing=False)
    ckpt, _ = M.load_model(tiny, "none", torch.float32, "cpu", gradient_checkpointing=True)
    assert plain.config.attention_dropout == 0.0

    assert ckpt.is_activation_checkpointing and not plain.is_activation_checkpointing
    # with checkpointing, a layer's forward runs again during backward (a pre-hook: torch stops the
    # recomputation as soon as the last saved tensor is back, so the layer may never return)
    calls = []
    ckpt.model.layers[2].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    g_ckpt = norm_grad(ckpt, tok, texts[:4])
    assert len(calls) == 2
    g_plain = norm_grad(plain, tok, texts[:4])
    assert g_plain.abs().sum() > 0
    torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-7)


# -----------------------------------------------------------------------------
# settings and errors


def test_resolve_device():
    assert M.resolve_device("cpu") == torch.device("cpu")
    assert M.resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(M.ModelError, match="device: 'gpu0'"):
        M.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(M.ModelError, match="no CUDA GPU"):
            M.resolve_device("cuda")


def test_resolve_dtype():
    for name, dtype in [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)]:
        assert M.resolve_dtype(name, "cpu") == dtype
    expected = torch.bfloat16 if M.cpu_has_bf16() else torch.float32
    assert M.resolve_dtype("auto", torch.device("cpu")) == expected
    with pytest.raises(M.ModelError, match="dtype: 'fp8'"):
        M.resolve_dtype("fp8", "cpu")


def test_resolve_attention():
    assert M.resolve_attention("auto", "cpu") == "sdpa"
    assert M.resolve_attention("eager", "cpu") == "eager"
    with pytest.raises(M.ModelError, match="flash_attention_2 needs"):
        M.resolve_attention("flash_attention_2", "cpu")
    with pytest.raises(M.ModelError, match="attention: 'fast'"):
        M.resolve_attention("fast", "cpu")


def test_load_model_errors(tiny, tmp_path, monkeypatch):
    with pytest.raises(M.ModelError, match="^model.name_or_path: '/no/such/model' does not exist"):
        M.load_model("/no/such/model", "none")
    M.check_name_or_path("Qwen/Qwen2.5-7B-Instruct")  # a hub id is not mistaken for a missing path
    with pytest.raises(M.ModelError, match="has no config.json"):
        M.load_model(str(tmp_path), "none")
    with pytest.raises(M.ModelError, match="model.quantization: 'int8' is not one of nf4, fp4, none"):
        M.load_model(tiny, "int8")
    # a hub id that is not cached and cannot be downloaded: one line, no traceback (offline: no waiting on retries)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(M.ModelError, match="cannot load 'no-such-org/no-such-model'") as e:
        M.load_model("no-such-org/no-such-model", "none")
    assert "\n" not in str(e.value)
