r"""Causal-LM cross-entropy from the final hidden states, a chunk of tokens at a time: the (tokens x vocab)
logits are never built whole. Copy this file alone into another project: it needs torch only.

    total, n = loss_sum(model, batch)       # any transformers *ForCausalLM; batch: input_ids, labels, ...
    (total / n).backward()                  # the mean over the labelled tokens

The problem. `model(**batch).loss` computes logits = lm_head(hidden) for every position, upcasts them to
fp32 and takes log_softmax: for Qwen2.5-7B (vocabulary 152,064) and 4 x 1024 tokens that is 2.5 GB of fp32
logits, and their gradient is as large again. Most of those positions carry no label anyway (the prompt).
full_logits_cross_entropy below is that plain form, the definition of what we compute; the rest of the file
is an optimization of it (linear_cross_entropy), and tests/test_loss.py ties the two together.

What is computed instead. Only positions with a label go through lm_head (labels == -100 are dropped
first), a chunk of rows at a time. For a chunk of hidden states h (n, H), the output weight W (V, H) and
bias b, the model's own logits (what transformers' *ForCausalLM computes after lm_head) are

    z = scale * (h W^T + b)                  scale: Cohere's logit_scale, 1 / Granite's logits_scaling
    logits = softcap * tanh(z / softcap)     Gemma 2's final logit soft-capping (else logits = z)

and the summed loss and its gradient with respect to the logits are

    CE = sum_i [ logsumexp(logits_i) - logits_i[y_i] ]
    d CE / d logits = softmax(logits) - onehot(y)

The chain rule through the transform is one factor per logit,

    d logits / d (h W^T) = scale * (1 - tanh^2(z / softcap)) = scale * (1 - (logits / softcap)^2)

so with g = (softmax - onehot) * that factor, the input gradient g W (n, H) is taken right there, while
the chunk's logits exist, and kept until backward (in fp32, small next to the logits); backward only
multiplies it by the upstream gradient (e.g. 1 / n_tokens). Compared with checkpointing each chunk and
recomputing its logits in backward, that is one lm_head matmul less per chunk. (Liger Kernel's fused
linear cross-entropy and Apple's Cut Cross-Entropy do the same in Triton / CUDA; this file does it in
PyTorch alone.) W itself gets a gradient only if it requires one (a frozen lm_head does not).

Precision: under bf16 autocast the matmuls run in bf16, the logits are taken to fp32 before softmax, and
the loss is accumulated in fp32. tests/test_loss.py checks loss and gradients against float64
F.cross_entropy for plain, scaled and soft-capped logits, with ignored labels, in fp32 and bf16.

The chunk is a number of rows (default_chunk_rows: a few hundred on a CPU for a 7B model's head); its time
and memory against the full logits, and why that rule, are measured in docs/performance.md
(`python bench.py --loss`). Each chunk takes one exp pass over its logits: exp(logits - max) gives both
the log-sum-exp (its row sums) and, divided by them in place, the softmax of the gradient.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: a position without a label


def full_logits_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scale: float = 1.0,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """The plain form: linear_cross_entropy's (sum, count), computed on the full logits at once.

        logits = softcap * tanh(scale * (h W^T + b) / softcap)     (or scale * (h W^T + b) without a cap)
        sum = sum over positions with labels != -100 of CE(logits_i, labels_i)

    hidden (..., H), weight (V, H), labels (...), bias (V,). The (..., V) logits are taken to fp32 before the
    transform, as in the chunked form. Memory grows with tokens x vocabulary: fine for small problems and
    tests, the cost that linear_cross_entropy avoids on real ones.
    """
    logits = F.linear(hidden, weight, bias).float() * scale  # (..., V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    total = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)
    return total, int((labels != IGNORE_INDEX).sum())


# ----------------------------------------------------------------------------------------------------
# The optimized form: the same sum, a chunk of labelled rows at a time, gradients taken in forward


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(logits_i, labels_i) for logits = transform(hidden @ weight.T + bias), a chunk of rows at a
    time, with the gradient computed in the forward pass (the module docstring has the derivation).

    The optimized form of full_logits_cross_entropy: the same value and gradients (tests/test_loss.py,
    test_chunked_loss_equals_the_full_logits_form), without ever holding all the logits.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk_rows: int,
        scale: float = 1.0,
        softcap: float | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden (N, H), weight (V, H), labels (N,), bias (V,) -> the summed loss, a fp32 scalar."""
        want_h, want_w = ctx.needs_input_grad[:2]
        if bias is not None and bias.requires_grad:
            raise ValueError("LinearCrossEntropy does not train the output layer's bias; freeze it")
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for i in range(0, labels.numel(), chunk_rows):
            h, y = hidden[i : i + chunk_rows], labels[i : i + chunk_rows]
            out = F.linear(h, weight, bias)  # (n, V), the compute dtype under autocast
            compute_dtype = out.dtype
            probs = out.float()  # the logits in fp32 (out itself if it is fp32); turned into d CE / d logits in place
            del out
            if scale != 1:
                probs.mul_(scale)
            if softcap is not None:
                probs.div_(softcap).tanh_().mul_(softcap)
            target = probs.gather(1, y[:, None])  # (n, 1)
            top = probs.amax(dim=1, keepdim=True)
            factor = None if softcap is None else 1 - (probs / softcap).square()  # before probs is overwritten
            probs.sub_(top).exp_()  # exp(logits - max): the one exp pass, for the loss and its gradient alike
            norm = probs.sum(dim=1, keepdim=True)
            total += (top + norm.log() - target).sum()  # logsumexp - the target's logit, summed over the rows
            if want_h or want_w:
                probs.div_(norm)  # softmax
                probs[torch.arange(len(y), device=y.device), y] -= 1  # d CE / d logits
                if factor is not None:
                    probs.mul_(factor)
                if scale != 1:
                    probs.mul_(scale)  # now d CE / d (hidden @ weight.T)
                g = probs.to(compute_dtype)  # probs itself in fp32
                if want_h:
                    grad_h[i : i + chunk_rows] = g @ weight
                if want_w:
                    grad_w += g.t() @ h
                del g
            del probs, factor  # before the next chunk's logits exist: one chunk's (n, V) at a time, not two
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx: FunctionCtx, grad_total: torch.Tensor) -> tuple:
        """The gradients kept by forward, times the upstream gradient."""
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (
            None if grad_h is None else (grad_h * grad_total).to(h_dtype),
            None if grad_w is None else (grad_w * grad_total).to(w_dtype),
            *(None,) * 5,  # labels, chunk_rows, scale, softcap, bias
        )


def default_chunk_rows(device: torch.device, vocab: int, hidden: int) -> int:
    """Rows (labelled tokens) per chunk. On a CPU, hidden / 4 rows, kept between 2^22 and 2^26 logits
    (16 and 256 MiB in fp32). A large model's head needs long chunks: its matmuls are the cost, and a chunk
    of a few dozen rows streams the whole weight matrix for little work. A small model's needs short ones:
    its softmax passes cost as much as its matmuls, and run faster in cache. The upper bound keeps the
    chunk's memory a small part of the full logits'. Chosen by measurement (docs/performance.md,
    `python bench.py --loss`). On a GPU, 2^25 / vocab rows (128 MiB of fp32 logits), not measured here."""
    if device.type == "cpu":
        return max(2**22 // vocab, min(hidden // 4, 2**26 // vocab), 1)
    return max(2**25 // vocab, 1)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scale: float = 1.0,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropies over the positions whose label is not -100, their number) for the logits
    transform(hidden @ weight.T + bias). hidden (..., H) and labels (...) are aligned: position i is
    scored against labels[i] (shift them before, for next-token prediction). With no labelled position
    the sum is 0 and its gradients are zero."""
    keep = labels != IGNORE_INDEX
    hidden, labels = hidden[keep], labels[keep]  # (N, H), (N,)
    chunk_rows = chunk_rows or default_chunk_rows(hidden.device, *weight.shape)
    return LinearCrossEntropy.apply(hidden, weight, labels, chunk_rows, scale, softcap, bias), labels.numel()


def logit_transform(config: object) -> tuple[float, float | None]:
    """(scale, softcap) of what a transformers causal LM does to lm_head's output before its loss.

    Cohere multiplies by config.logit_scale, Granite divides by config.logits_scaling, Gemma 2 (and Gemma 3
    where set) soft-caps with config.final_logit_softcapping. Others: (1.0, None). check_loss verifies the
    result against the model's own loss, so an architecture that does something else is refused, not
    trained on another function.
    """
    scale = getattr(config, "logit_scale", None) or 1.0
    if getattr(config, "logits_scaling", None):
        scale = scale / config.logits_scaling
    return float(scale), getattr(config, "final_logit_softcapping", None)


def loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_rows: int | None = None
) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over the positions with a label, their number) of a transformers
    causal LM on a batch of input_ids and labels (aligned with input_ids; position t predicts token
    t + 1), plus attention_mask (padded) or position_ids (packed). The model's decoder runs as usual; only
    the labelled positions go through lm_head and the model's logit transform, chunk_rows of them at a
    time (default_chunk_rows)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    scale, softcap = logit_transform(model.config)
    return linear_cross_entropy(
        hidden[:, :-1], head.weight, batch["labels"][:, 1:], scale, softcap, head.bias, chunk_rows
    )


@torch.no_grad()
def check_loss(model: nn.Module, input_ids: list[int], labels: list[int], dtype: torch.dtype = torch.float32) -> None:
    """Refuse a model whose loss loss_sum does not reproduce: on one example (a short one will do: a row of
    input_ids and its labels), its mean must equal transformers' own `model(...).loss`, which builds the
    full logits. Both run in eval mode under autocast to `dtype` (none for fp32), with lm_head's output
    taken to fp32, so that the model's transform runs in fp32 as ours does: the two then differ by
    summation order (~1e-7), not by rounding of the logits (~1e-3).

    Raises:
        ValueError: the output layer is not a plain nn.Linear (an adapter on lm_head, say), or the two
            losses differ by more than rounding (an architecture whose head does something else).
    """
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(
            f"{type(model).__name__}'s output layer is a {type(head).__name__}, not a plain nn.Linear, so the "
            "chunked loss cannot use it (lm_head cannot take an adapter: leave it out of lora.target_modules)"
        )
    device = head.weight.device
    batch = {"input_ids": torch.tensor([input_ids], device=device), "labels": torch.tensor([labels], device=device)}
    was_training = model.training
    model.eval()
    upcast = head.register_forward_hook(lambda module, args, out: out.float())
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            ours, n = loss_sum(model, batch)
            theirs = model(**batch).loss.float()
    finally:
        upcast.remove()
        model.train(was_training)
    ours = ours / max(n, 1)
    if not torch.isclose(ours, theirs, rtol=1e-4, atol=1e-5):
        raise ValueError(
            f"{type(model).__name__}: the chunked loss ({ours.item():.4f}) differs from the model's own "
            f"({theirs.item():.4f}) on one example, so this architecture's output head is not supported"
        )
