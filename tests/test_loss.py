"""loss.py alone (torch, and transformers for a tiny model): the chunked linear cross-entropy against
float64 F.cross_entropy on the full logits, for plain, scaled and soft-capped logits, with ignored labels,
in fp32 and bf16, with chunk sizes that do not divide the token count and with no labelled token at all;
against full_logits_cross_entropy, the plain form it optimizes; then loss_sum and check_loss against a
transformers model's own loss."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers

import loss as L

TRANSFORMS = [(1.0, None), (0.0625, None), (0.25, 30.0)]  # plain; Cohere-like scale; scale and Gemma 2's cap


def problem(dtype, n=13, h=8, v=11, ignored=(1, 4, 5), seed=0):
    """hidden (n, h), weight (v, h), bias (v,), labels (n,) with some positions ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 2).to(dtype).requires_grad_()  # logits up to ~20: the cap acts
    bias = torch.randn(v, generator=g).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[list(ignored)] = L.IGNORE_INDEX
    return hidden, weight, bias, labels


def reference(hidden, weight, bias, labels, scale, softcap):
    """float64 F.cross_entropy(sum) on the full logits, and its gradients for hidden and weight."""
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    z = scale * F.linear(h64, w64, bias.double())
    logits = z if softcap is None else softcap * torch.tanh(z / softcap)
    total = F.cross_entropy(logits, labels, reduction="sum", ignore_index=L.IGNORE_INDEX)
    return total, torch.autograd.grad(total, [h64, w64])


def relative(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("scale, softcap", TRANSFORMS)
@pytest.mark.parametrize("chunk_rows", [1, 3, 5, 100])  # 10 labelled rows: 3 and 5 leave a short last chunk
def test_loss_and_gradients_equal_float64_cross_entropy_in_fp32(scale, softcap, chunk_rows):
    hidden, weight, bias, labels = problem(torch.float32)
    total, n = L.linear_cross_entropy(hidden, weight, labels, scale, softcap, bias, chunk_rows)
    grads = torch.autograd.grad(3.0 * total, [hidden, weight])  # an upstream factor, as from "/ n_tokens"
    ref, ref_grads = reference(hidden, weight, bias, labels, scale, softcap)
    assert n == 10 and total.dtype == torch.float32
    assert relative(total, ref) <= 1e-6
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32 and relative(g, 3.0 * r) <= 1e-5


@pytest.mark.parametrize("scale, softcap", TRANSFORMS)
def test_loss_and_gradients_in_bf16_within_its_rounding(scale, softcap):
    """bf16 inputs, as under bf16 autocast: the loss (accumulated in fp32) and both gradients within bf16
    rounding of the float64 reference on the same (bf16-representable) values."""
    hidden, weight, bias, labels = problem(torch.bfloat16, n=40, h=32, v=50, ignored=range(0, 40, 3))
    total, n = L.linear_cross_entropy(hidden, weight, labels, scale, softcap, bias, 7)
    grads = torch.autograd.grad(total, [hidden, weight])
    ref, ref_grads = reference(hidden, weight, bias, labels, scale, softcap)
    assert n == 26 and total.dtype == torch.float32
    assert relative(total, ref) <= 1e-3
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.bfloat16 and relative(g, r) <= 2e-2  # bf16's 8-bit mantissa


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale, softcap", TRANSFORMS)
@pytest.mark.parametrize("chunk_rows", [1, 3, 100])
def test_chunked_loss_equals_the_full_logits_form(dtype, scale, softcap, chunk_rows):
    """linear_cross_entropy (the optimization) against full_logits_cross_entropy (the plain form), in the
    same dtype: the same sum, count and gradients, up to summation order (measured: 1e-7 on the sum, 1e-6
    on the fp32 gradients; 4e-3 on the bf16 weight gradient, which the chunked form sums over chunks in fp32
    and the plain form in one bf16 matmul)."""
    hidden, weight, bias, labels = problem(dtype, n=40, h=32, v=50, ignored=range(0, 40, 3))
    hidden, weight, labels = hidden.reshape(4, 10, 32), weight, labels.reshape(4, 10)  # a (batch, time) shape
    total, n = L.linear_cross_entropy(hidden, weight, labels, scale, softcap, bias, chunk_rows)
    plain, plain_n = L.full_logits_cross_entropy(hidden, weight, labels, scale, softcap, bias)
    grads = torch.autograd.grad(2.0 * total, [hidden, weight])
    plain_grads = torch.autograd.grad(2.0 * plain, [hidden, weight])
    assert n == plain_n == 26 and total.dtype == plain.dtype == torch.float32
    assert relative(total, plain) <= 1e-6
    for g, r in zip(grads, plain_grads, strict=True):
        assert g.dtype == r.dtype == dtype and relative(g, r) <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("h, rows", [(48, 64), (400, 100)])  # 2^22 / vocab rows; hidden / 4 rows
def test_the_default_chunk_rule_on_a_cpu_keeps_loss_and_gradients(h, rows, monkeypatch):
    """default_chunk_rows on a CPU: hidden / 4 rows within 2^22 to 2^26 logits; with a 65,536-word
    vocabulary and 250 rows (200 labelled) the lower bound and hidden / 4 both cut the rows into several
    chunks, and the sum and gradients equal float64 F.cross_entropy on the full logits."""
    hidden, weight, bias, labels = problem(torch.float32, n=250, h=h, v=2**16, ignored=range(0, 250, 5))
    assert L.default_chunk_rows(torch.device("cpu"), 2**16, h) == rows < 200
    used, apply = [], L.LinearCrossEntropy.apply
    monkeypatch.setattr(L.LinearCrossEntropy, "apply", lambda *a: used.append(a[3]) or apply(*a))
    total, n = L.linear_cross_entropy(hidden, weight, labels, 0.25, 30.0, bias)
    assert used == [rows]  # linear_cross_entropy took the rule's chunk (vocab and hidden in that order)
    grads = torch.autograd.grad(total, [hidden, weight])
    ref, ref_grads = reference(hidden, weight, bias, labels, 0.25, 30.0)
    assert n == 200 and relative(total, ref) <= 1e-6
    for g, r in zip(grads, ref_grads, strict=True):
        assert relative(g, r) <= 1e-5


def test_the_default_chunk_rule_bounds_a_chunk_to_2_22_to_2_26_logits():
    cpu = torch.device("cpu")
    assert L.default_chunk_rows(cpu, 152064, 3584) == 2**26 // 152064  # Qwen2.5-7B: 441 rows, not 896
    assert L.default_chunk_rows(cpu, 32000, 512) == 2**22 // 32000  # 131 rows, not 128
    assert L.default_chunk_rows(cpu, 49152, 576) == 576 // 4  # SmolLM2: between the bounds
    assert L.default_chunk_rows(cpu, 2**30, 64) == 1


def test_no_labelled_token_gives_zero_and_zero_gradients():
    hidden, weight, bias, labels = problem(torch.float32)
    total, n = L.linear_cross_entropy(hidden, weight, torch.full_like(labels, L.IGNORE_INDEX), bias=bias)
    total.backward()
    assert n == 0 and total.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_a_frozen_weight_gets_no_gradient_and_a_trainable_bias_is_refused():
    hidden, weight, bias, labels = problem(torch.float32)
    weight.requires_grad_(False)
    total, _ = L.linear_cross_entropy(hidden, weight, labels, bias=bias)
    total.backward()
    assert weight.grad is None and hidden.grad is not None
    with pytest.raises(ValueError, match="does not train the output layer's bias"):
        L.linear_cross_entropy(hidden, weight, labels, bias=bias.requires_grad_())


def test_logit_transform_reads_each_familys_config():
    assert L.logit_transform(SimpleNamespace()) == (1.0, None)
    assert L.logit_transform(SimpleNamespace(logit_scale=0.0625)) == (0.0625, None)  # Cohere
    assert L.logit_transform(SimpleNamespace(logits_scaling=4.0)) == (0.25, None)  # Granite divides
    assert L.logit_transform(SimpleNamespace(final_logit_softcapping=30.0)) == (1.0, 30.0)  # Gemma 2


@pytest.fixture(scope="module")
def gemma2():
    """A tiny random Gemma 2 (soft-capped logits), built from its config: no download. Its lm_head is drawn
    large enough (logits up to ~20) for the cap at 5 to change them."""
    config = transformers.Gemma2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, final_logit_softcapping=5.0,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    torch.nn.init.normal_(model.lm_head.weight, std=2.0)
    return model


def test_loss_sum_equals_the_models_own_loss_and_check_loss_passes(gemma2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = L.IGNORE_INDEX  # the prompts
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    total, n = L.loss_sum(gemma2, batch, chunk_rows=4)
    assert n == 3 * 7  # positions 5 to 11 of each row
    assert relative(total / n, gemma2(**batch).loss) <= 1e-5
    L.check_loss(gemma2, ids[0].tolist(), labels[0].tolist())


def test_check_loss_refuses_a_transform_it_does_not_reproduce(gemma2, monkeypatch):
    monkeypatch.setattr(L, "logit_transform", lambda config: (1.0, None))  # the soft-cap forgotten
    with pytest.raises(ValueError, match="Gemma2ForCausalLM: the chunked loss .* differs from the model's own"):
        L.check_loss(gemma2, list(range(12)), list(range(12)))
