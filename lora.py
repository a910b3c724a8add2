"""LoRA, rsLoRA and DoRA adapters for plain and 4-bit linear layers, in one file.

A frozen linear layer computes ``y = W x + b`` with W of shape (out, in). An adapter adds a trainable
low-rank update next to it, without touching W:

    LoRA   (Hu et al. 2021, "LoRA", eq. 3):           y = W x + b + s * B A x
    rsLoRA (Kalajdzievski 2023, "rank-stabilized"):   the same, with s = alpha / sqrt(r) instead of alpha / r
    DoRA   (Liu et al. 2024, "DoRA", eq. 5):           y = m / ||W + s B A||_row * (W + s B A) x + b

A is (r, in), B is (out, r), s is the scaling and m (out,) is DoRA's learned magnitude per output row.
B starts at zero, so a fresh adapter leaves the model exactly as it was. lora_reference and
dora_reference compute these formulas as written; LoRALinear computes the same thing fused (several
adapters, dropout, 4-bit weights, one base matmul), and tests/test_lora.py ties the two together.

Usage, loralib style: the API works off module and parameter names.

    paths = inject(model, ["q_proj", "v_proj"], r=8, alpha=16)  # wrap layers, adapter "default"
    mark_trainable(model, ["default"])                           # freeze everything else
    ...train...
    save_adapter(model, "out/adapter")                           # PEFT's file format
    merged = merge(model)                                        # plain nn.Linear layers again

Files are PEFT's (adapter_config.json + adapter_model.safetensors), so adapters made here open in PEFT,
vLLM and friends, and PEFT's LoRA/DoRA adapters open here. This file needs torch and safetensors;
bitsandbytes is imported only to dequantize a 4-bit weight.
"""

import functools
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

ALL_LINEAR = "all-linear"  # inject's target_modules for every linear layer but the output layer
PREFIX = "base_model.model."  # PEFT's key prefix for a causal LM: base_model.model.<module path>.lora_A.weight
EPS = 1e-6  # guards DoRA's division by a row norm that is zero


# ----------------------------------------------------------------------------------------------------
# The plain forms: one adapter, a dense weight, no dropout. LoRALinear.forward is the optimized form.


def lora_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """LoRA (and rsLoRA, which only picks another scale), as written: y = W x + b + s * B A x.

    x (..., in), weight W (out, in), bias b (out,) or None, A (r, in), B (out, r) -> y (..., out).
    """
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, A), B)  # (..., r) then (..., out)


def dora_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
) -> torch.Tensor:
    """DoRA (Liu et al. 2024, eq. 5), as written: y = g * (W' x) + b with

        W' = W + s B A,   g = m / ||W'||_row

    The norm is detached (treated as a constant, as DoRA section 4.3 suggests), so no gradient flows
    through it. Shapes as in lora_reference, plus magnitude m (out,).
    """
    adapted = weight + scale * B @ A  # (out, in)
    g = magnitude / adapted.norm(dim=1).detach()  # (out,)
    out = g * F.linear(x, adapted)
    return out if bias is None else out + bias


def dense_weight(base: nn.Linear) -> torch.Tensor:
    """The (out, in) weight of a plain or bitsandbytes 4-bit linear layer, dequantized if needed."""
    weight = base.weight
    if hasattr(weight, "quant_state"):  # bitsandbytes Params4bit: packed uint8 plus the quantization state
        import bitsandbytes.functional as bnbF

        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            raise ValueError(
                "this 4-bit weight is in bitsandbytes' CPU inference layout; wrap the layer in "
                "LoRALinear (or call keep_standard_layout) before dequantizing it"
            )
        return bnbF.dequantize_4bit(weight.data, weight.quant_state)
    return weight


def keep_standard_layout(base: nn.Linear) -> None:
    """Keep a bitsandbytes 4-bit weight in its standard layout.

    On CPUs with AVX512-BF16, bitsandbytes (>= 0.48) repacks a Linear4bit's weight in place on its first
    eval-mode, no-grad forward, into a layout that only its inference kernel reads: the outputs shift
    (bf16 scales) and a later training forward fails. Training, eval and dequantizing must all see the
    same weight, so this turns the repacking off, undoing it (as bitsandbytes does before saving) if it
    already happened. A no-op for other layers.

    Undoing is not exact: the repacked layout keeps each block's scale (absmax) in bf16, so the restored
    weight differs from the never-packed one by 2.4e-4 to 2.8e-4 on an nn.Linear(128, 64) at its default
    init (largest |w| 0.088: at most 0.32% of it over 30 seeds; tests/test_lora.py bounds it at 3e-4 and
    0.35%). Without double quantization, bitsandbytes 0.50's inverse also leaves the scales transposed (a 5%
    error); they are put back here.
    """
    if hasattr(base, "support_avx512bf16_for_cpu"):
        base.support_avx512bf16_for_cpu = False
    weight = getattr(base, "weight", None)
    state = getattr(weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        if not state.nested and state.absmax.dim() == 2:  # (in / blocksize, out) bf16 -> flat fp32, as quantized
            state.absmax = state.absmax.T.reshape(-1).float()
        weight.quant_state = state


class LoRALinear(nn.Module):
    """A frozen linear layer (``nn.Linear`` or ``bnb.nn.Linear4bit``) plus any number of named adapters.

    Forward:  y = base(x) + sum over active adapters k of term_k(x), where, with xd = dropout(x),

        LoRA:  term = s * B A xd
        DoRA:  term = (g - 1) * (W x) + g * s * B A xd,    g = m / n,   n = ||W + s B A||_row (detached)

    For a single DoRA adapter without dropout this is exactly eq. 5 of the paper, g * (W + s B A) x + b
    (dora_reference); for a single LoRA adapter, W x + b + s B A x (lora_reference). With several
    adapters, term_k = reference_k(x) - base(x).
    W x is base(x) minus the bias, so the bias is never scaled and the base matmul runs once, also with
    dropout (dropout touches only the adapter branch, unlike PEFT, which runs W on dropout(x) again).
    n is treated as a constant, as DoRA section 4.3 suggests: no gradient flows through it.

    Cost: in fp32 each adapter's second product adds itself into the output in place (addmm, beta = 1), so
    LoRA makes no pass over the (N, out) output beyond its products; in bf16 the product is rounded and
    then added, as PEFT does, so that the two give the same numbers. DoRA adds the rescaling G * out (g
    is folded into B), its elementwise gradients in backward (of out and m) and its norm, once per
    optimizer step (see dora_norm).
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        keep_standard_layout(base)
        self.base = base  # kept as is: same object, same weight, no copy
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.lora_magnitude = nn.ParameterDict()  # name -> (out,), DoRA adapters only
        self.config = {}  # name -> dict(r, alpha, scale, dropout, use_dora, use_rslora)
        self.active = []  # names of the adapters that contribute to forward
        self._norm_cache = {}  # name -> (key, n); see dora_norm

    @property
    def weight(self) -> nn.Parameter:  # some model code reads layer.weight.dtype/device
        """The base layer's weight parameter, as stored (packed if 4-bit)."""
        return self.base.weight

    def add_adapter(
        self,
        name: str,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_dora: bool = False,
        use_rslora: bool = False,
    ) -> None:
        """Add a fresh adapter: A ~ kaiming-uniform(a=sqrt(5)) (nn.Linear's own init), B = 0, m = ||W||_row."""
        if name in self.config:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        device = self.base.weight.device
        A = torch.empty(r, self.in_features)  # fp32: AdamW needs it; drawn on the CPU: the same A on any device
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A.to(device))
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.config[name] = dict(
            r=r, alpha=alpha, scale=scale, dropout=dropout, use_dora=use_dora, use_rslora=use_rslora
        )
        if use_dora:
            self.lora_magnitude[name] = nn.Parameter(self.weight_sq_norm().sqrt())
        self.active.append(name)

    @torch.no_grad()
    def weight_sq_norm(self) -> torch.Tensor:
        """|W_i|^2 per output row in fp32, computed once: W is frozen."""
        if not hasattr(self, "_wsq"):
            self.register_buffer("_wsq", dense_weight(self.base).float().pow(2).sum(1), persistent=False)
        return self._wsq

    @torch.no_grad()
    def dora_norm(self, name: str) -> torch.Tensor:
        """n_i = ||W_i + s (B A)_i|| in fp32, factored so that no (out, in) product is ever formed:

            n^2 = |W|^2 + 2s * rowdot(W A^T, B) + s^2 * rowdot(B (A A^T), B)

        W A^T is (out, r) and A A^T is (r, r). n changes only when A or B do, so it is cached against
        their version counters (bumped by every in-place update: optimizer steps, load_state_dict). It is
        therefore computed once per optimizer step, not per micro-batch or gradient-checkpoint recompute.
        """
        A, B = self.lora_A[name], self.lora_B[name]
        key = (A._version, B._version, A.data_ptr(), B.data_ptr())
        cached = self._norm_cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        s = self.config[name]["scale"]
        A32, B32 = A.float(), B.float()
        WAt = dense_weight(self.base).float() @ A32.t()  # (out, r)
        BAAt = B32 @ (A32 @ A32.t())  # (out, r)
        n2 = self.weight_sq_norm() + 2 * s * (WAt * B32).sum(1) + s * s * (BAAt * B32).sum(1)
        n = n2.clamp_min(0).sqrt().clamp_min(EPS)  # rounding can make n2 a hair below zero on a zero row
        self._norm_cache[name] = (key, n)
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) plus the active adapters' terms (see the class docstring), in base(x)'s dtype.

        The fused, optimized form of lora_reference and dora_reference: one base matmul for all adapters,
        s and g folded into B, in fp32 each adapter's product added into the output in place, and the norm
        factored and cached (dora_norm) instead of forming W + s B A. tests/test_lora.py's
        test_forward_equals_the_plain_form* tests check it against those functions (plain and 4-bit bases,
        LoRA, rsLoRA, DoRA, two adapters).
        """
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # (N, in): 2-D, so that the products below can add into out in place
        out = self.base(x)  # W x + b, the one base matmul
        if not self.active:
            return out.view(*lead, self.out_features)
        # Rewrite the sum of terms as  y = G * (W x) + b + sum_k B'_k A_k xd_k  with G = 1 + sum_k (g_k - 1)
        # over DoRA adapters and B' = s B (LoRA) or g s B (DoRA). Folding s and g into B is an (out, r)
        # op, where scaling the output would be an (..., out) one. G * (W x) + b = G * out + (1 - G) * b.
        B_eff, G = [], None
        for name in self.active:
            cfg, B = self.config[name], self.lora_B[name]
            if cfg["use_dora"]:
                g = self.lora_magnitude[name] / self.dora_norm(name)  # (out,), n detached
                B = B * (cfg["scale"] * g).unsqueeze(1)
                G = g if G is None else G + (g - 1)
            else:
                B = B * cfg["scale"]
            B_eff.append(B)
        xa = []  # (N, r) each: A_k xd_k
        for name in self.active:
            cfg, A = self.config[name], self.lora_A[name]
            xd = F.dropout(x, cfg["dropout"], True) if self.training and cfg["dropout"] > 0 else x
            if not torch.is_autocast_enabled(x.device.type):
                xd = xd.to(A.dtype)  # under autocast the matmul picks the dtype; a cast here would copy x
            xa.append(F.linear(xd, A))
        # the products' dtype: the compute dtype under autocast; fp32 for fp32 adapters on a bf16 base without it
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in xa], out.dtype)
        bias = self.base.bias
        fix_bias = None if G is None or bias is None else (1 - G) * bias  # keeps the bias unscaled
        if dtype == torch.float32:
            # each product adds itself into y in place (addmm, beta = 1): one pass over the (N, out) output,
            # where a product and then a sum take three. fp32 only: in bf16 it would round once where PEFT
            # rounds twice, and greedy answers would drift apart from PEFT's
            y = out.float() if G is None else out * G if fix_bias is None else torch.addcmul(fix_bias, G, out)
            for t, B in zip(xa, B_eff, strict=True):
                y.addmm_(t.float(), B.t())
            return y.to(out.dtype).view(*lead, self.out_features)
        branches = None
        for i, t in enumerate(xa):
            b = fix_bias.to(B_eff[i].dtype) if i == 0 and fix_bias is not None else None
            branch = F.linear(t, B_eff[i], b)  # (N, out); b rides along free
            branches = branch if branches is None else branches + branch
        if G is None:
            return (out + branches).to(out.dtype).view(*lead, self.out_features)
        y = torch.addcmul(branches, G.to(branches.dtype), out)  # G * out + branches, one fused op
        return y.to(out.dtype).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        """The layer's sizes, adapter configs and active adapters, for print(model)."""
        return f"in={self.in_features}, out={self.out_features}, adapters={self.config}, active={self.active}"


# ----------------------------------------------------------------------------------------------------
# Wrapping layers and choosing adapters


def _wrapped_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(path, LoRALinear) for every wrapped layer of the model."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def _wrap(model: nn.Module, path: str) -> LoRALinear:
    """Replace the linear layer at `path` by a LoRALinear around it (or return the one already there)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layer = getattr(parent, attr)
    if not isinstance(layer, LoRALinear):
        layer = LoRALinear(layer).train(layer.training)  # a model in eval mode stays in eval mode
        setattr(parent, attr, layer)
    return layer


def _linear_paths(model: nn.Module) -> list[str]:
    """Paths of the plain/4-bit linear layers that could take an adapter (not those inside a wrapper)."""
    modules = dict(model.named_modules())
    inner = {f"{p}.base" for p, m in modules.items() if isinstance(m, LoRALinear)}
    # bitsandbytes' Linear4bit is a subclass of nn.Linear
    return [p for p, m in modules.items() if isinstance(m, (nn.Linear, LoRALinear)) and p not in inner]


def linear_names(model: nn.Module) -> list[str]:
    """The attribute names of the linear layers that could take an adapter (q_proj, lm_head, ...), in order."""
    return list(dict.fromkeys(p.rpartition(".")[2] for p in _linear_paths(model)))


def inject(
    model: nn.Module,
    target_modules: str | Iterable[str],
    name: str = "default",
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    use_dora: bool = False,
    use_rslora: bool = False,
) -> list[str]:
    """Add adapter `name` to every linear layer whose attribute name is in `target_modules`.

    Args:
        model: any nn.Module; its linear layers are nn.Linear or bitsandbytes Linear4bit.
        target_modules: attribute names such as ["q_proj", "v_proj"], or "all-linear" (PEFT's meaning):
            every linear layer but the output layer (model.get_output_embeddings(), else one named lm_head).
        name: the adapter's name; a layer can hold several.
        r, alpha, dropout: rank, scaling numerator, dropout on the adapter's input.
        use_dora, use_rslora: DoRA's magnitude vector; s = alpha/sqrt(r) instead of alpha/r.

    Returns:
        The module paths that received the adapter. The adapter is active and its parameters trainable.

    Raises:
        ValueError: r < 1, dropout outside [0, 1), or no layer matched.
    """
    if r < 1 or not 0 <= dropout < 1:
        raise ValueError(f"need r >= 1 and 0 <= dropout < 1, got r={r}, dropout={dropout}")
    candidates = _linear_paths(model)
    if target_modules == ALL_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        modules = dict(model.named_modules())
        targets = {ALL_LINEAR}
        paths = [p for p in candidates if modules[p] is not head and p.rpartition(".")[2] != "lm_head"]
    else:
        targets = set([target_modules] if isinstance(target_modules, str) else target_modules)
        paths = [p for p in candidates if p.rpartition(".")[2] in targets]
    if not paths:
        raise ValueError(
            f"no linear layer matches target_modules={sorted(targets)}; "
            f"the model's linear layers are named: {', '.join(linear_names(model)[:12]) or 'none'}"
        )
    for path in paths:
        layer = _wrap(model, path)
        layer.add_adapter(name, r, alpha, dropout, use_dora, use_rslora)
        for p in (layer.lora_A[name], layer.lora_B[name], layer.lora_magnitude.get(name)):
            if p is not None:
                p.requires_grad_(True)
    return paths


def set_active(model: nn.Module, names: str | Iterable[str]) -> None:
    """Make exactly `names` (a name or a list; [] for the bare base model) contribute to forward."""
    names = [names] if isinstance(names, str) else list(names)
    layers = [m for _, m in _wrapped_layers(model)]
    for n in names:
        if not any(n in m.config for m in layers):
            raise ValueError(f"no adapter named {n!r} in the model")
    for m in layers:
        m.active = [n for n in names if n in m.config]


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter `name` from every layer that has it (its parameters, config and norm cache); the
    layers stay wrapped. A no-op where no layer has it."""
    for _, m in _wrapped_layers(model):
        if name in m.config:
            for d in (m.lora_A, m.lora_B, m.lora_magnitude):
                if name in d:
                    del d[name]
            del m.config[name]
            m.active = [n for n in m.active if n != name]
            m._norm_cache.pop(name, None)


def scale_adapter(model: nn.Module, name: str, weight: float) -> None:
    """Scale LoRA adapter `name`'s update by `weight` (s -> weight * s), e.g. to mix several adapters.

    A DoRA adapter refuses: it rescales whole rows by m / ||W + s B A||, so its update is no term that a
    weight could scale.
    """
    layers = [m for _, m in _wrapped_layers(model) if name in m.config]
    if not layers:
        raise ValueError(f"no adapter named {name!r} in the model")
    if weight != 1 and any(m.config[name]["use_dora"] for m in layers):
        raise ValueError(f"adapter {name!r} is DoRA, which cannot be weighted (weight {weight}); use 1")
    for m in layers:
        m.config[name]["scale"] *= weight
        m._norm_cache.pop(name, None)  # n depends on s


def adapter_parameters(model: nn.Module, names: str | Sequence[str]) -> Iterator[nn.Parameter]:
    """The A, B (and DoRA m) parameters of the named adapters."""
    names = [names] if isinstance(names, str) else names
    for _, m in _wrapped_layers(model):
        for d in (m.lora_A, m.lora_B, m.lora_magnitude):
            yield from (d[n] for n in names if n in d)


def mark_trainable(model: nn.Module, names: str | Sequence[str]) -> None:
    """requires_grad on the named adapters' parameters only; everything else, base included, is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model, names):
        p.requires_grad_(True)


# ----------------------------------------------------------------------------------------------------
# State dicts in PEFT's key format: base_model.model.<path>.lora_A.weight / .lora_B.weight /
# .lora_magnitude_vector (DoRA, no ".weight" suffix)


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """A copy of adapter `name`'s tensors, keyed as in PEFT's adapter_model.safetensors."""
    state = {}
    for path, m in _wrapped_layers(model):
        if name in m.config:
            state[f"{PREFIX}{path}.lora_A.weight"] = m.lora_A[name].detach().clone()
            state[f"{PREFIX}{path}.lora_B.weight"] = m.lora_B[name].detach().clone()
            if name in m.lora_magnitude:
                state[f"{PREFIX}{path}.lora_magnitude_vector"] = m.lora_magnitude[name].detach().clone()
    if not state:
        raise ValueError(f"no adapter named {name!r} in the model")
    return state


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], name: str = "default") -> None:
    """Copy `state` into adapter `name`, strictly: every key present, none extra, every shape equal."""
    own = adapter_state_dict(model, name)
    for key in own:
        if key not in state:
            raise ValueError(f"adapter {name!r}: key {key} is missing from the state")
    for key, value in state.items():
        if key not in own:
            raise ValueError(f"adapter {name!r}: unexpected key {key} (not a layer of this model's adapter)")
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(
                f"adapter {name!r}: {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)} (an adapter for another base?)"
            )
    layers = dict(_wrapped_layers(model))
    for key, value in state.items():
        path, _, kind = key[len(PREFIX) :].rpartition(".lora_")
        d = {"A.weight": "lora_A", "B.weight": "lora_B", "magnitude_vector": "lora_magnitude"}[kind]
        getattr(layers[path], d)[name].copy_(value)  # in place: bumps the version, so DoRA's cached n is stale


# ----------------------------------------------------------------------------------------------------
# Files


def save_adapter(
    model: nn.Module, path: str | os.PathLike, name: str = "default", base_model_name_or_path: str | None = None
) -> None:
    """Write adapter `name` as PEFT does: path/adapter_config.json and path/adapter_model.safetensors."""
    write_adapter(path, adapter_state_dict(model, name), adapter_config(model, name, base_model_name_or_path))


def adapter_config(
    model: nn.Module, name: str = "default", base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """Adapter `name`'s settings as PEFT's adapter_config.json holds them."""
    layers = [(p, m.config[name]) for p, m in _wrapped_layers(model) if name in m.config]
    if not layers:
        raise ValueError(f"no adapter named {name!r} in the model")
    r, alpha = (Counter(c[k] for _, c in layers).most_common(1)[0][0] for k in ("r", "alpha"))
    first = layers[0][1]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first["dropout"],
        "target_modules": sorted({p.rpartition(".")[2] for p, _ in layers}),
        "rank_pattern": {re.escape(p): c["r"] for p, c in layers if c["r"] != r},
        "alpha_pattern": {re.escape(p): c["alpha"] for p, c in layers if c["alpha"] != alpha},
        "use_dora": first["use_dora"],
        "use_rslora": first["use_rslora"],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return config


def write_adapter(path: str | os.PathLike, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write an adapter's tensors and config as PEFT does, each file beside its final name first, then
    renamed: a crash mid-write never leaves a half file. Needs no model (a federated server has none)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in state.items()}
    # write beside, then rename: a crash mid-write never leaves a half file under the real name
    save_file(state, os.path.join(path, "adapter_model.safetensors.tmp"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json.tmp"), "w") as f:
        json.dump(config, f, indent=2)
    for fname in ("adapter_model.safetensors", "adapter_config.json"):
        os.replace(os.path.join(path, fname + ".tmp"), os.path.join(path, fname))


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state) of a PEFT-format adapter directory, refusing what this module cannot run."""
    from safetensors.torch import load_file

    cfg_path, st_path = os.path.join(path, "adapter_config.json"), os.path.join(path, "adapter_model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            raise ValueError(f"{p}: file not found (is {path} an adapter directory?)")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
    try:
        state = load_file(st_path)
    except Exception as e:  # safetensors raises its own error types for a damaged header or body
        raise ValueError(f"{st_path}: not a readable safetensors file ({e})") from None
    unsupported = {
        "peft_type": "LORA",
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "lora_bias": False,
        "layer_replication": None,
        "trainable_token_indices": None,
    }
    for k, ok in unsupported.items():
        value = config.get(k)
        if not (value is None or value == ok or (not ok and not value)):  # [] counts as None, 0 as False
            raise ValueError(f"{cfg_path}: {k}={config[k]!r} is not supported (only {k}={ok!r})")
    for key in state:
        if not key.startswith(PREFIX) or not key.endswith(
            (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")
        ):
            raise ValueError(
                f"{st_path}: key {key} is not a LoRA/DoRA tensor of a linear layer "
                "(embedding LoRA, modules_to_save, ... are not supported)"
            )
    return config, state


def _pattern_value(patterns: dict[str, float], path: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> dict[str, Any]:
    """Load a PEFT-format LoRA/DoRA adapter into adapter `name`; inject it from the file's config first if
    the model does not have it. Returns the adapter's config. Raises ValueError on any mismatch."""
    config, state = read_adapter(path)
    if not any(name in m.config for _, m in _wrapped_layers(model)):
        modules = dict(model.named_modules())
        for key in state:
            if not key.endswith(".lora_A.weight"):
                continue
            mpath = key[len(PREFIX) : -len(".lora_A.weight")]
            if not isinstance(modules.get(mpath), (nn.Linear, LoRALinear)):
                raise ValueError(
                    f"{path}: key {key}: the model has no linear layer {mpath} (an adapter for another base model?)"
                )
            alpha = _pattern_value(config.get("alpha_pattern") or {}, mpath, config.get("lora_alpha", 8))
            _wrap(model, mpath).add_adapter(
                name,
                r=state[key].shape[0],
                alpha=alpha,
                dropout=config.get("lora_dropout", 0.0),
                use_dora=bool(config.get("use_dora")),
                use_rslora=bool(config.get("use_rslora")),
            )
    load_adapter_state_dict(model, state, name)
    return config


# ----------------------------------------------------------------------------------------------------
# Several adapters at once, each with a weight (infer.py, merge.py)


def check_adapters(dirs: Sequence[str], weights: Sequence[float] | None = None) -> list[float]:
    """The cheap checks, before any model loads: every directory exists, one weight per adapter.
    Returns the weights (1.0 each when none are given)."""
    for path in dirs:
        if not os.path.isdir(path):
            raise ValueError(f"adapter {path}: no such directory")
    if not weights:
        return [1.0] * len(dirs)
    if len(weights) != len(dirs):
        raise ValueError(f"{len(weights)} adapter weights for {len(dirs)} adapters: give one weight per adapter")
    return list(weights)


def load_adapters(model: nn.Module, dirs: Sequence[str], weights: Sequence[float] | None = None) -> list[str]:
    """Load adapter directories as a0, a1, ... and make them all active; returns their names.

    Active adapters add up: y = W x + b + sum_i w_i s_i B_i A_i x. A weight w_i scales adapter i's update
    by scaling its s (LoRA). DoRA rescales whole rows by m / ||W + s B A||, so its update is not a term
    that a weight could scale: a DoRA adapter only takes weight 1.

    Raises:
        ValueError: a missing directory, a file that is not a LoRA/DoRA adapter, an adapter made for
        another base (the message names the layer and both shapes), a weight on a DoRA adapter.
    """
    weights = check_adapters(dirs, weights)
    names = []
    for i, (path, w) in enumerate(zip(dirs, weights, strict=True)):
        name = f"a{i}"
        load_adapter(model, path, name)
        try:
            scale_adapter(model, name, w)
        except ValueError:
            raise ValueError(
                f"adapter {path}: a DoRA adapter cannot be weighted (weight {w}); use 1 or leave the weights out"
            ) from None
        names.append(name)
    if names:
        set_active(model, names)
    return names


# ----------------------------------------------------------------------------------------------------
# Merging: a pure function of the layer's tensors, then a plain nn.Linear in its place


@torch.no_grad()
def merged_weight(layer: LoRALinear) -> torch.Tensor:
    """W' such that W' x + b equals layer(x) with its active adapters, computed in fp32:

        W' = W + sum_k [(g_k - 1) W + g_k s_k B_k A_k],   g_k = m_k / n_k for DoRA, 1 for LoRA

    For one adapter: LoRA gives W + s B A, DoRA gives (m / n) * (W + s B A).
    """
    W = dense_weight(layer.base).float()
    merged = W.clone()
    for name in layer.active:
        cfg = layer.config[name]
        delta = cfg["scale"] * (layer.lora_B[name].float() @ layer.lora_A[name].float())  # (out, in), once
        if cfg["use_dora"]:
            g = (layer.lora_magnitude[name].float() / layer.dora_norm(name)).unsqueeze(1)  # (out, 1)
            delta = (g - 1) * W + g * delta
        merged += delta
    return merged


def merge(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every layer's active adapters into a plain nn.Linear and remove the wrappers (in place).

    4-bit weights are dequantized and the result is stored in `dtype`, by default the layer's compute
    dtype (bitsandbytes) or the original weight's dtype. Returns the model.
    """
    for path, layer in _wrapped_layers(model):
        base = layer.base
        if dtype is not None:
            out_dtype = dtype
        elif hasattr(base.weight, "quant_state"):
            out_dtype = getattr(base, "compute_dtype", None) or base.weight.quant_state.dtype
        else:
            out_dtype = base.weight.dtype
        device = base.weight.device
        linear = nn.Linear(
            layer.in_features, layer.out_features, bias=base.bias is not None, device=device, dtype=out_dtype
        )
        linear.weight.data.copy_(merged_weight(layer))
        if base.bias is not None:
            linear.bias.data.copy_(base.bias.data)
        linear.requires_grad_(False)
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, linear)
    return model
