"""lora.py against trusted references: dense float64 formulas, and PEFT where it is installed."""

import json

import pytest
import torch
import torch.nn as nn

import lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def nf4(linear: nn.Linear, compute_dtype=torch.float32):
    """A bitsandbytes NF4 (double-quantized) copy of a linear layer, on CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        quant_type="nf4",
        compress_statistics=True,
    )
    q.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")  # the move is what quantizes
    lora.keep_standard_layout(q)  # the same weight layout for PEFT and for us (see keep_standard_layout)
    return q


def quantize_(model):
    """Replace every linear layer but lm_head by its NF4 copy (quantization is deterministic)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and name != "lm_head":
            setattr(model, name, nf4(child))
        else:
            quantize_(child)
    return model


def tiny_lm(quant=False, seed=0):
    """A tiny random Qwen2; with quant=True its linear layers (lm_head aside) in NF4, fp32 compute."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    if quant:
        quantize_(model)
        model.is_loaded_in_4bit = True  # what transformers sets; PEFT's cue to use its bitsandbytes layers
    return model


@torch.no_grad()
def randomize(params, seed=1):
    """Give adapter tensors non-trivial values (B = 0 would hide every bug)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in params:
        if "lora_" not in name:
            continue  # the base stays frozen, as lora.py assumes (it caches |W|^2)
        noise = torch.randn(p.shape, generator=g) * 0.05
        p.copy_(p * (1 + noise) if "magnitude" in name else p + noise)


def layer(bias=True, seed=0, quant=False, in_f=24, out_f=16):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias).requires_grad_(False)
    return lora.LoRALinear(nf4(base) if quant else base)


def assert_close(a, b, rtol):
    err = (a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


# ---------------------------------------------------------------- the math of one layer


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("use_dora", [False, True])
def test_fresh_adapter_changes_nothing(quant, use_dora):
    m = layer(quant=quant)
    x = torch.randn(3, 5, 24)
    before = m(x)
    m.add_adapter("default", r=4, alpha=8, use_dora=use_dora)
    assert torch.equal(m(x), before)


def dense_reference(m, x, name="default", x_drop=None, A=None, B=None, mag=None):
    """y = g * (W + s B A) x + b with g = m / ||W + s B A||_row (detached), all float64 and dense.
    A, B, mag default to the layer's own values; pass float64 leaves to take gradients."""
    cfg = m.config[name]
    W = lora.dense_weight(m.base).detach().double()
    A = m.lora_A[name].detach().double() if A is None else A
    B = m.lora_B[name].detach().double() if B is None else B
    b = m.base.bias.detach().double() if m.base.bias is not None else 0
    x, xd = x.double(), (x if x_drop is None else x_drop).double()
    Wx, lora_x = x @ W.T, (xd @ A.T @ B.T) * cfg["scale"]
    if not cfg["use_dora"]:
        return Wx + b + lora_x
    n = (W + cfg["scale"] * B @ A).norm(dim=1).detach()
    mag = m.lora_magnitude[name].detach().double() if mag is None else mag
    return mag / n * (Wx + lora_x) + b


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_grads_match_dense_float64(use_dora, use_rslora, bias):
    m = layer(bias=bias)
    m.add_adapter("default", r=4, alpha=8, use_dora=use_dora, use_rslora=use_rslora)
    randomize(m.named_parameters())
    x = torch.randn(2, 7, 24)
    w = torch.randn(2, 7, 16)
    params = [m.lora_A["default"], m.lora_B["default"]] + ([m.lora_magnitude["default"]] if use_dora else [])
    ours = torch.autograd.grad((m(x) * w).sum(), params)
    leaves = [p.detach().double().requires_grad_() for p in params]
    ref_out = dense_reference(m, x, A=leaves[0], B=leaves[1], mag=leaves[2] if use_dora else None)
    ref = torch.autograd.grad((ref_out * w.double()).sum(), leaves)
    assert m.config["default"]["scale"] == (8 / 2 if use_rslora else 8 / 4)
    for g_ours, g_ref in zip(ours, ref, strict=True):
        assert_close(g_ours, g_ref, 1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_forward_matches_dense_float64(use_dora):
    m = layer()
    m.add_adapter("default", r=4, alpha=8, use_dora=use_dora)
    randomize(m.named_parameters())
    x = torch.randn(2, 7, 24)
    assert_close(m(x), dense_reference(m, x), 1e-5)


def plain_form(m, x, name="default"):
    """One adapter of layer m through lora.lora_reference / lora.dora_reference, on the dense weight."""
    cfg, W, bias = m.config[name], lora.dense_weight(m.base), m.base.bias
    A, B = m.lora_A[name], m.lora_B[name]
    if cfg["use_dora"]:
        return lora.dora_reference(x, W, bias, A, B, cfg["scale"], m.lora_magnitude[name])
    return lora.lora_reference(x, W, bias, A, B, cfg["scale"])


def assert_same_forward_and_grads(ours, ref, params):
    """ours and ref (fp32) within fp32 rounding (1e-6 of the largest entry; measured up to 3e-7) of each
    other, and so are their gradients for params."""
    w = torch.randn(ours.shape, generator=torch.Generator().manual_seed(5))
    g_ours = torch.autograd.grad((ours * w).sum(), params)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    assert_close(ours, ref, 1e-6)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert_close(a, b, 1e-6)


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_the_plain_form(quant, use_dora, use_rslora, bias):
    """LoRALinear.forward (fused) against lora_reference / dora_reference, fp32 or NF4 base, eval mode."""
    m = layer(bias=bias, quant=quant)
    m.add_adapter("default", r=4, alpha=8, dropout=0.1, use_dora=use_dora, use_rslora=use_rslora)
    randomize(m.named_parameters())
    m.eval()  # dropout off: the plain forms have none
    x = torch.randn(2, 7, 24)
    params = [p for n, p in m.named_parameters() if "lora_" in n]
    assert_same_forward_and_grads(m(x), plain_form(m, x), params)


@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_the_plain_form_with_two_adapters(bias):
    """A LoRA and a DoRA adapter active together: base(x) + sum_k (reference_k(x) - base(x))."""
    m = layer(bias=bias)
    m.add_adapter("a", r=4, alpha=8)
    m.add_adapter("b", r=2, alpha=4, use_dora=True)
    randomize(m.named_parameters())
    m.eval()
    x = torch.randn(2, 7, 24)
    base = m.base(x)
    ref = base + (plain_form(m, x, "a") - base) + (plain_form(m, x, "b") - base)
    params = [p for n, p in m.named_parameters() if "lora_" in n]
    assert len(params) == 5 and m.active == ["a", "b"]
    assert_same_forward_and_grads(m(x), ref, params)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3, 5)])
def test_forward_takes_any_leading_shape(use_dora, lead):
    """The layer works on 2-D rows inside (so that the products add into the output in place); a vector or a
    4-D input comes back in its own shape, equal to the plain form."""
    m = layer()
    m.add_adapter("default", r=4, alpha=8, use_dora=use_dora)
    randomize(m.named_parameters())
    m.eval()
    x = torch.randn(*lead, 24)
    y = m(x)
    assert y.shape == (*lead, 16)
    assert_same_forward_and_grads(y, plain_form(m, x), [p for n, p in m.named_parameters() if "lora_" in n])


@pytest.mark.parametrize("use_dora", [False, True])
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(use_dora):
    m = layer()
    m.add_adapter("default", r=4, alpha=8, use_dora=use_dora)
    y = m(torch.randn(0, 3, 24))
    assert y.shape == (0, 3, 16)
    y.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for n, p in m.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_forward_on_a_bf16_base_with_fp32_adapters(use_dora, autocast):
    """A bf16 base under fp32 adapters, with autocast (the products in bf16) and without (in fp32, the
    output rounded to bf16 once): base(x)'s dtype out, the plain fp32 form within bf16 rounding."""
    m = layer()
    m.add_adapter("default", r=4, alpha=8, use_dora=use_dora)
    randomize(m.named_parameters())
    m.eval()
    x = torch.randn(2, 7, 24)
    ref = plain_form(m, x)
    m.base.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = m(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert_close(y, ref, 2e-2)


def test_dropout_touches_only_the_adapter_branch_and_base_runs_once():
    m = layer()
    m.add_adapter("default", r=4, alpha=8, dropout=0.5, use_dora=True)
    randomize(m.named_parameters())
    calls = []
    m.base.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 7, 24)
    m.train()
    torch.manual_seed(3)
    y = m(x)
    torch.manual_seed(3)
    x_drop = nn.functional.dropout(x, 0.5, True)
    assert len(calls) == 1
    assert_close(y, dense_reference(m, x, x_drop=x_drop), 1e-5)


def test_factored_dora_norm_equals_dense_norm():
    for quant in (False, True):
        m = layer(quant=quant, in_f=64, out_f=48)
        m.add_adapter("default", r=8, alpha=16, use_dora=True)
        randomize(m.named_parameters())
        W = lora.dense_weight(m.base).double()
        A, B = m.lora_A["default"].double(), m.lora_B["default"].double()
        assert_close(m.dora_norm("default"), (W + 2.0 * B @ A).norm(dim=1), 1e-6)


def test_dora_norm_is_cached_until_the_adapter_changes():
    m = layer()
    m.add_adapter("default", r=4, alpha=8, use_dora=True)
    randomize(m.named_parameters())
    n1 = m.dora_norm("default")
    assert m.dora_norm("default") is n1  # same step, same micro-batch or recompute: no new work
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    (m(torch.randn(4, 24)) ** 2).sum().backward()
    opt.step()
    n2 = m.dora_norm("default")
    W, A, B = m.base.weight.double(), m.lora_A["default"].double(), m.lora_B["default"].double()
    assert not torch.equal(n1, n2)
    assert_close(n2, (W + 2.0 * B @ A).norm(dim=1), 1e-6)


def test_zero_rows_give_no_nan():
    m = layer()
    with torch.no_grad():
        m.base.weight[3].zero_()
    m.add_adapter("default", r=4, alpha=8, use_dora=True)
    x = torch.randn(5, 24, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(m.lora_magnitude["default"].grad).all()


def one_layer_model():
    """(a model whose only layer is a q_proj, an input, its output without adapters)."""
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(24, 16))
    x = torch.randn(3, 24)
    return model, x, model(x)


def test_two_adapters_sum_and_set_active():
    model, x, base_out = one_layer_model()
    lora.inject(model, ["q_proj"], name="a", r=4, alpha=8)
    lora.inject(model, ["q_proj"], name="b", r=2, alpha=4, use_dora=True)
    randomize(model.named_parameters())
    both = model(x)
    lora.set_active(model, "a")
    only_a = model(x)
    lora.set_active(model, ["b"])
    only_b = model(x)
    lora.set_active(model, [])
    assert torch.equal(model(x), base_out)
    assert_close(both - base_out, (only_a - base_out) + (only_b - base_out), 1e-6)
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        lora.set_active(model, ["c"])


def test_wrapping_keeps_the_models_train_or_eval_mode():
    model = tiny_lm()  # in eval mode
    lora.inject(model, ["q_proj"], r=4, dropout=0.5)
    assert not model.model.layers[0].self_attn.q_proj.training  # else dropout would run at inference
    model.train()
    lora.inject(model, ["v_proj"], r=4)
    assert model.model.layers[0].self_attn.v_proj.training


def test_scale_adapter():
    model, x, base_out = one_layer_model()
    lora.inject(model, ["q_proj"], name="a", r=4, alpha=8)
    randomize(model.named_parameters())
    full = model(x)
    lora.scale_adapter(model, "a", 0.25)
    assert_close(model(x) - base_out, 0.25 * (full - base_out), 1e-6)
    lora.inject(model, ["q_proj"], name="d", r=4, use_dora=True)
    with pytest.raises(ValueError, match="'d' is DoRA, which cannot be weighted"):
        lora.scale_adapter(model, "d", 0.5)


def test_mark_trainable_and_inject_errors():
    model = tiny_lm()
    paths = lora.inject(model, ["q_proj", "v_proj"], name="g", r=4)
    lora.inject(model, ["q_proj", "v_proj"], name="l", r=4, use_dora=True)
    assert paths == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    lora.mark_trainable(model, ["l"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".l") for n in trainable)
    assert len(trainable) == 4 * 3  # A, B, m on four layers
    with pytest.raises(ValueError, match=r"target_modules=\['qkv'\].*q_proj"):
        lora.inject(model, ["qkv"])
    with pytest.raises(ValueError, match="already exists"):
        lora.inject(model, ["q_proj"], name="g")
    with pytest.raises(ValueError, match="r >= 1"):
        lora.inject(model, ["q_proj"], name="x", r=0)


# ---------------------------------------------------------------- merging


def test_merge_equals_unmerged_fp32():
    model = tiny_lm()
    lora.inject(model, TARGETS, name="a", r=4, alpha=8)
    lora.inject(model, TARGETS, name="b", r=4, alpha=8, use_dora=True, use_rslora=True)
    randomize(model.named_parameters())
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        merged = lora.merge(model)
        after = merged(ids).logits
        assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
        assert_close(after, before, 1e-5)
        assert torch.equal(lora.merge(merged)(ids).logits, after)  # merging twice == merging once


def test_merged_weight_formulas():
    for use_dora in (False, True):
        m = layer()
        m.add_adapter("default", r=4, alpha=8, use_dora=use_dora)
        randomize(m.named_parameters())
        W, A, B = m.base.weight.double(), m.lora_A["default"].double(), m.lora_B["default"].double()
        expect = W + 2.0 * B @ A
        if use_dora:
            expect = (m.lora_magnitude["default"].double() / expect.norm(dim=1)).unsqueeze(1) * expect
        assert_close(lora.merged_weight(m), expect, 1e-6)


def test_merge_nf4_onto_dequantized_weight():
    model = tiny_lm(quant=True)
    lora.inject(model, TARGETS, r=4, alpha=8, use_dora=True)
    randomize(model.named_parameters())
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        q = model.model.layers[0].self_attn.q_proj
        W_deq = lora.dense_weight(q.base).float()
        merged = lora.merge(model)
        assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
        assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
        assert_close(merged(ids).logits, before, 1e-5)
        # with no adapter active the merge is exactly the dequantized weight
    m = layer(quant=True)
    m.add_adapter("default", r=4, alpha=8)
    lora.set_active(nn.Sequential(m), [])
    assert torch.equal(lora.merged_weight(m), lora.dense_weight(m.base).float())
    assert W_deq.shape == (64, 64)


# ---------------------------------------------------------------- files


def test_save_load_is_bit_exact(tmp_path):
    model = tiny_lm()
    lora.inject(model, TARGETS, r=4, alpha=8, use_dora=True, use_rslora=True)
    randomize(model.named_parameters())
    lora.save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["use_dora"] and cfg["use_rslora"] and cfg["target_modules"] == sorted(TARGETS)
    assert cfg["base_model_name_or_path"] == "tiny" and cfg["modules_to_save"] is None
    other = tiny_lm()
    loaded_cfg = lora.load_adapter(other, tmp_path)  # injects from the file's config
    assert loaded_cfg == cfg
    a, b = lora.adapter_state_dict(model), lora.adapter_state_dict(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in a
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, other(ids).logits)


def test_strict_state_loading_names_the_key():
    model = tiny_lm()
    lora.inject(model, ["q_proj"], r=4)
    state = lora.adapter_state_dict(model)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=f"{key} is missing"):
        lora.load_adapter_state_dict(model, missing)
    with pytest.raises(ValueError, match="unexpected key .*v_proj"):
        lora.load_adapter_state_dict(model, {**state, key.replace("q_proj", "v_proj"): state[key]})
    with pytest.raises(ValueError, match=rf"{key} has shape \(64, 5\)"):
        lora.load_adapter_state_dict(model, {**state, key: torch.zeros(64, 5)})


def test_bad_files_raise_value_error(tmp_path):
    model = tiny_lm()
    lora.inject(model, ["q_proj"], r=4)
    lora.save_adapter(model, tmp_path / "ok")
    with pytest.raises(ValueError, match="adapter_config.json: file not found"):
        lora.load_adapter(tiny_lm(), tmp_path / "nowhere")
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lora.load_adapter(tiny_lm(), bad)
    (bad / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match="adapter_config.json: invalid JSON"):
        lora.load_adapter(tiny_lm(), bad)
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match="modules_to_save=.*not supported"):
        lora.load_adapter(tiny_lm(), tmp_path / "ok")
    # an adapter for another base: the same names, other shapes
    from transformers import Qwen2Config, Qwen2ForCausalLM

    wide = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(4, 64\), the model expects \(4, 32\)"):
        lora.load_adapter(wide, tmp_path / "ok")


# ---------------------------------------------------------------- PEFT, the reference implementation

VARIANTS = [dict(), dict(use_rslora=True), dict(use_dora=True)]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("quant", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("variant", VARIANTS, ids=["lora", "rslora", "dora"])
def test_our_adapter_opens_in_peft(tmp_path, quant, variant):
    peft = pytest.importorskip("peft")
    ours = tiny_lm(quant)
    lora.inject(ours, TARGETS, r=4, alpha=8, **variant)
    randomize(ours.named_parameters())
    lora.save_adapter(ours, tmp_path)
    base = tiny_lm(quant)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    ids = torch.randint(0, 96, (2, 12))
    assert_close(logits(ours, ids), logits(theirs, ids), 1e-4)
    assert_close(
        logits(ours, ids) - logits(tiny_lm(quant), ids), logits(theirs, ids) - logits(tiny_lm(quant), ids), 1e-3
    )  # the adapter's part alone


@pytest.mark.parametrize("quant", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("variant", VARIANTS, ids=["lora", "rslora", "dora"])
def test_peft_adapter_opens_here(tmp_path, quant, variant):
    peft = pytest.importorskip("peft")
    base = tiny_lm(quant)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
        rank_pattern={"q_proj": 2},
        alpha_pattern={"down_proj": 3},
        **variant,
    )
    theirs = peft.get_peft_model(base, cfg).eval()
    randomize(theirs.named_parameters())
    theirs.save_pretrained(tmp_path)
    ours = tiny_lm(quant)
    lora.load_adapter(ours, tmp_path)
    q = ours.model.layers[0].self_attn.q_proj
    assert q.config["default"]["r"] == 2
    assert ours.model.layers[0].mlp.down_proj.config["default"]["alpha"] == 3
    ids = torch.randint(0, 96, (2, 12))
    assert_close(logits(ours, ids), logits(theirs, ids), 1e-4)


def test_peft_dora_file_keys(tmp_path):
    """PEFT stores DoRA's magnitude as <path>.lora_magnitude_vector, as we do."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    theirs = peft.get_peft_model(tiny_lm(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    theirs.save_pretrained(tmp_path)
    ours = tiny_lm()
    lora.inject(ours, ["q_proj"], r=4, use_dora=True)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(lora.adapter_state_dict(ours))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpu_repacked_4bit_weight_is_restored(seed, double_quant):
    """bitsandbytes repacks a CPU 4-bit weight on an eval forward (AVX512-BF16 only); wrapping undoes it, to
    within the bf16 rounding of the block scales that keep_standard_layout documents."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    torch.manual_seed(seed)
    linear = nn.Linear(128, 64)
    m = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=double_quant)
    m.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=double_quant
    )
    m.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    m = m.to("cpu")
    never_packed = lora.dense_weight(m).float().clone()
    x = torch.randn(3, 128)
    with torch.no_grad():
        m.eval()(x)
    assert m.weight.quant_state.packing_format_for_cpu  # bitsandbytes did repack it
    wrapped = lora.LoRALinear(m)
    assert not m.weight.quant_state.packing_format_for_cpu
    restored = lora.dense_weight(m).float()
    err = (restored - never_packed).abs().max().item()
    assert 0 < err <= 3e-4, err  # not bit-exact (bf16 scales), but within the documented loss
    assert err <= 0.0035 * never_packed.abs().max()
    wrapped.add_adapter("default", r=4, use_dora=True)
    xg = x.clone().requires_grad_()
    wrapped.train()(xg).sum().backward()  # trains after an eval pass
    with torch.no_grad():
        assert_close(wrapped.eval()(x), x @ restored.T + m.bias, 1e-5)
