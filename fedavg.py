"""Federated averaging of adapter state dicts, and the server optimizers built on it.

One round of FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", Algorithm 1):

    1. the server picks a fraction of the K clients                      sample_clients(...)
    2. each picked client k starts from the global adapter x_t, trains it on its n_k local examples and
       sends back x_k                                                     (state_bytes measures the traffic)
    3. the server averages the clients, weighting each by its sample count:

           x_avg = sum_k n_k x_k / sum_k n_k                               weighted_average(states, counts)

Reddi et al. 2021 ("Adaptive Federated Optimization", Algorithm 2) read step 3 as one optimizer step on
the pseudo-gradient

           delta_t = x_t - x_avg       (minus the clients' mean update, so it points uphill like a gradient)

Plain FedAvg is then SGD with server learning rate 1 (x_{t+1} = x_t - delta_t = x_avg), and any optimizer
can run on the server instead (ServerOptimizer):

    fedavg    x_{t+1} = x_t - lr * delta_t
    fedavgm   m_t = mu * m_{t-1} + delta_t;  x_{t+1} = x_t - lr * m_t      (server momentum, Hsu et al. 2019)
    fedadam   m_t = b1 * m_{t-1} + (1 - b1) * delta_t
              v_t = b2 * v_{t-1} + (1 - b2) * delta_t^2
              x_{t+1} = x_t - lr * m_t / (sqrt(v_t) + eps)                  (no bias correction, as in the paper)

LoRA caveat. Clients train the factors A (r, in) and B (out, r) of the update s * B @ A, and FedAvg averages
each factor on its own. The product of the averages is not the average of the products: with
p_k = n_k / sum_j n_j,

    sum_k p_k B_k A_k = B_avg A_avg + sum_k p_k (B_k - B_avg) (A_k - A_avg)

so the aggregated adapter misses the last term, a weighted covariance of the clients' factors. It is zero
when all clients share A (FFA-LoRA, Sun et al. 2024, freezes A for this reason) or share B, and small while
the clients stay near their common starting point, which is why FedAvg of LoRA factors works in practice;
but it is an approximation, and the gap grows with local steps and client heterogeneity. Other methods
change what is sent, e.g. FedSA-LoRA (Guo et al. 2025) aggregates only A and keeps each client's B local.
DoRA's magnitude is averaged like any parameter, and is approximate for the same reason (the row norm is
not linear). fedavg_error measures the missing term on real uploads.

Three ways around it, each exact (federated.aggregation picks one; AGGREGATIONS below is the table):

    ffa    FFA-LoRA (Sun et al., ICLR 2024): A stays at its shared random init, only B trains and is sent:
           sum_k p_k B_k A = B_avg A. Half the upload; under DP the noise lands on B alone.
    fedsa  FedSA-LoRA (Guo et al. 2025): only A is sent and averaged; each client keeps its own B. Nothing
           is averaged across factors, so there is no cross term; the global update differs per client.
    stack  FLoRA (Wang et al. 2024): the server concatenates the factors (stack_lora),

               B = [p_1 s B_1, ..., p_K s B_K]  (out, K r),    A = [A_1; ...; A_K]  (K r, in),

           so B A = sum_k p_k s B_k A_k exactly, at rank K r. The clients train a fresh adapter next round on
           top of the stack, which grows by K r every round.

This file needs only torch and the standard library (and dp-accounting for dp_epsilon, imported there);
copy it anywhere.
"""

import builtins
import logging
import math
import random
from dataclasses import dataclass

import torch

KINDS = ("fedavg", "fedavgm", "fedadam")


def _check_like(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor], ref_name: str, other_name: str) -> None:
    """Raise ValueError unless `other` has the keys, shapes and dtypes of `ref` (floating-point tensors)."""
    for key in ref:
        if key not in other:
            raise ValueError(f"{other_name} is missing key {key!r}, which {ref_name} has")
    for key in other:
        if key not in ref:
            raise ValueError(f"{other_name} has an extra key {key!r}, which {ref_name} lacks")
    for key, r in ref.items():
        o = other[key]
        if not (isinstance(r, torch.Tensor) and r.is_floating_point()):
            raise ValueError(
                f"key {key!r} in {ref_name} is {getattr(r, 'dtype', type(r).__name__)}; "
                f"only floating-point tensors can be averaged"
            )
        if o.shape != r.shape:
            raise ValueError(
                f"key {key!r} has shape {tuple(o.shape)} in {other_name} but {tuple(r.shape)} in {ref_name}"
            )
        if o.dtype != r.dtype:
            raise ValueError(f"key {key!r} has dtype {o.dtype} in {other_name} but {r.dtype} in {ref_name}")


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 tensors (fp64 stays fp64): the precision the averaging math runs in."""
    return torch.promote_types(dtype, torch.float32)


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """x_avg = sum_i w_i x_i / sum_i w_i, key by key (McMahan et al. 2017, Algorithm 1).

    Weights are usually the clients' sample counts. The sum runs in fp32, so bf16/fp16 states are rounded
    once, at the end. It is written relative to the heaviest state a, x_avg = x_a + sum_i p_i (x_i - x_a)
    with p_i = w_i / sum_j w_j, so that identical states come back bit-exact, as does a lone state with
    nonzero weight.

    Returns:
        New tensors, each in the dtype and on the device of the first state's tensor.
    Raises:
        ValueError: no states; a weight count that does not match; a negative, non-finite or all-zero
            weight; states whose keys, shapes or dtypes differ (the message names the key and the state).
    """
    if len(states) == 0:
        raise ValueError("weighted_average needs at least one state")
    if len(weights) != len(states):
        raise ValueError(f"got {len(states)} states but {len(weights)} weights; give one weight per state")
    for i, w in enumerate(weights):
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"weight {i} is {w!r}; weights must be finite and >= 0 (e.g. sample counts)")
    total = math.fsum(weights)
    if total == 0:
        raise ValueError("all weights are zero; at least one state needs a positive weight")
    for i in range(1, len(states)):
        _check_like(states[0], states[i], "state 0", f"state {i}")

    p = [w / total for w in weights]
    a = max(range(len(p)), key=p.__getitem__)  # anchor at the heaviest state (the first, on ties)
    out = {}
    for key, first in states[0].items():
        device, dtype = first.device, _math_dtype(first.dtype)
        x_a = states[a][key].to(device, dtype)
        acc = x_a.clone()  # x_a may be the caller's tensor; never add into it
        for i, state in enumerate(states):
            if i != a and p[i] > 0:
                acc.add_(state[key].to(device, dtype) - x_a, alpha=p[i])
        out[key] = acc.to(first.dtype)
    return out


def sample_clients(
    clients: list[str], round: int, seed: int, fraction: float | None = None, count: int | None = None
) -> list[str]:
    """The clients that take part in `round`: a random subset, in the order of `clients`.

    Give exactly one of `fraction` (0 < fraction <= 1; picks max(1, round(fraction * n)) clients, with
    Python's round, which rounds halves to even) or `count` (1 <= count <= n). The choice depends only on
    (seed, round), not on the global random state, so a resumed run picks the same clients.

    Raises:
        ValueError: no clients, duplicate names, non-integer round/seed, or a bad fraction/count.
    """
    n = len(clients)
    if n == 0:
        raise ValueError("there are no clients to sample from")
    if len(set(clients)) != n:
        raise ValueError("client names must be unique")
    for name, value in (("round", round), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction or count")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        count = max(1, builtins.round(fraction * n))  # builtins: `round` is this function's argument
    elif isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= n:
        raise ValueError(f"count must be an integer in [1, {n}] (the number of clients), got {count!r}")

    rng = random.Random(f"sample_clients:{seed}:{round}")  # a str seed is hashed with SHA-512: stable
    return [clients[i] for i in sorted(rng.sample(range(n), count))]


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """{layer: (key of A, key of B)} for the layers whose A and B are both in `state` (PEFT's key names)."""
    a_keys = {k[: -len(".lora_A.weight")]: k for k in state if k.endswith(".lora_A.weight")}
    return {layer: (a, f"{layer}.lora_B.weight") for layer, a in a_keys.items() if f"{layer}.lora_B.weight" in state}


def fedavg_error(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, float]:
    """{layer: ||sum_k p_k B_k A_k - B_avg A_avg||_F / ||sum_k p_k B_k A_k||_F}: how far FedAvg of the
    factors is from the weighted mean of the clients' updates (the covariance term of the module doc), per
    layer whose A and B the states hold; p_k = w_k / sum w, as in weighted_average. 0 where the exact
    mean is zero (e.g. every B still zero).

    No (out, in) matrix is formed. The difference is the covariance term of the module doc, U V with
    U = [p_1 (B_1 - B_avg) ... p_K (B_K - B_avg)] and V = [A_1 - A_avg; ...; A_K - A_avg], and
    ||U V||_F^2 = sum((U^T U) * (V V^T)), matrices of size K r; so is the exact mean's norm. Centring first
    matters: the difference of the two products is small against each, and its square, taken as a
    difference of squares, would lose most of float64's digits to cancellation.
    """
    if len(states) != len(weights) or not states:
        raise ValueError(f"got {len(states)} states and {len(weights)} weights; need as many, at least one")
    total = math.fsum(weights)
    p = [w / total for w in weights]
    out = {}
    for layer, (ka, kb) in lora_pairs(states[0]).items():
        A = [s[ka].double().cpu() for s in states]
        B = [s[kb].double().cpu() for s in states]
        A_avg = sum(pk * a for pk, a in zip(p, A, strict=True))
        B_avg = sum(pk * b for pk, b in zip(p, B, strict=True))
        U = torch.cat([pk * b for pk, b in zip(p, B, strict=True)], 1)  # (out, K r)
        V = torch.cat(A, 0)  # (K r, in)
        exact = ((U.t() @ U) * (V @ V.t())).sum().clamp_min(0)  # ||sum_k p_k B_k A_k||_F^2
        Uc = torch.cat([pk * (b - B_avg) for pk, b in zip(p, B, strict=True)], 1)
        Vc = torch.cat([a - A_avg for a in A], 0)
        diff = ((Uc.t() @ Uc) * (Vc @ Vc.t())).sum().clamp_min(0)  # rounding can make it a hair below 0
        out[layer] = 0.0 if exact <= 0 else math.sqrt(diff.item() / exact.item())
    return out


def stack_lora(
    stacked: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]], weights: list[float], scale: float
) -> dict[str, torch.Tensor]:
    """FLoRA's aggregation: `stacked` (the sum of earlier rounds, as A and B of rank R; {} at the start)
    with each client's factors appended, B_k weighted by p_k s:

        B' = [B, p_1 s B_1, ..., p_K s B_K],   A' = [A; A_1; ...; A_K],   B' A' = B A + sum_k p_k s B_k A_k

    exactly (s is the clients' LoRA scaling: the result is used with scaling 1). Rank R + K r; fp32.

    Raises:
        ValueError: states without A/B pairs, or with DoRA magnitudes (DoRA's row norm is no sum of
            products), or layers that differ from the stack's.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"got {len(states)} states and {len(weights)} weights; need as many, at least one")
    for i in range(1, len(states)):
        _check_like(states[0], states[i], "state 0", f"state {i}")
    if any(k.endswith("lora_magnitude_vector") for k in states[0]):
        raise ValueError("DoRA adapters cannot be stacked: the row norm of W + s B A is no sum of products")
    pairs = lora_pairs(states[0])
    if not pairs or len(states[0]) != 2 * len(pairs):
        raise ValueError("stacking needs states made of LoRA A/B pairs")
    if stacked and lora_pairs(stacked).keys() != pairs.keys():
        raise ValueError("the clients' adapters are on other layers than the stack's")
    total = math.fsum(weights)
    p = [w / total for w in weights]
    out = {}
    for ka, kb in pairs.values():
        old_A, old_B = ([stacked[ka].float()], [stacked[kb].float()]) if stacked else ([], [])
        out[ka] = torch.cat(old_A + [s[ka].float() for s in states], 0)
        out[kb] = torch.cat(old_B + [s[kb].float() * (pk * scale) for pk, s in zip(p, states, strict=True)], 1)
    return out


# ----------------------------------------------------------------------------------------------------
# The aggregation choices (federated.aggregation), as one table: what a client sends, what it keeps, what
# never trains, and how the server combines the uploads. client.py and server.py look the choice up once.


@dataclass(frozen=True)
class Aggregation:
    """One way of combining the clients' global adapters (see the module docstring for the math)."""

    sends: tuple[str, ...]  # the global adapter's tensors a client uploads (PEFT key endings); it keeps the rest
    freeze_a: bool = False  # A never trains: every client keeps the shared random init (the server writes it too)
    own_rest: bool = False  # what a client keeps is its own and persists across rounds (saved with its state)
    stacks: bool = False  # the server appends the uploads to a frozen stack (stack_lora) instead of averaging

    def split(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the tensors a client sends, those it keeps) of a global adapter state."""
        sent = {k: v for k, v in state.items() if k.endswith(self.sends)}
        return sent, {k: v for k, v in state.items() if k not in sent}


_A, _B, _M = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"
AGGREGATIONS = {
    # sends A, B (and m); keeps nothing; the server averages them, weighted, then its optimizer steps
    "fedavg": Aggregation(sends=(_A, _B, _M)),
    # sends B (and m); A stays at the init every client shares, frozen, so the mean of B A is exact
    "ffa": Aggregation(sends=(_B, _M), freeze_a=True),
    # sends A; each client keeps its own B (and m) from round to round; the server averages A
    "fedsa": Aggregation(sends=(_A,), own_rest=True),
    # sends a fresh A and B each round; the server appends them to the frozen stack (stack_lora): exact
    "stack": Aggregation(sends=(_A, _B), stacks=True),
}


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors in `state` (numel * element size): what one client sends, or receives, per round."""
    return sum(t.numel() * t.element_size() for t in state.values())


def _check_hyperparameters(kind: str, lr: float, momentum: float, beta1: float, beta2: float, eps: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown server optimizer kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"server lr must be a finite number > 0, got {lr!r}")
    for name, value in (("momentum", momentum), ("beta1", beta1), ("beta2", beta2)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def _previous(buffers: dict[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    """Last round's buffer for `key` (zeros on the first round), on `like`'s device and dtype."""
    if key not in buffers:
        return torch.zeros_like(like)
    return buffers[key].to(like.device, like.dtype)


class ServerOptimizer:
    """FedAvg, FedAvgM or FedAdam on the server, stepping on delta = global - average (see the module doc).

    Buffers (m for momentum / Adam's first moment, v for Adam's second) are kept in fp32, key by key.
    eps (Reddi et al.'s tau) defaults to 1e-3, much larger than Adam's usual 1e-8; the paper tunes it.

        opt = ServerOptimizer("fedadam", lr=1e-2)
        for round in range(R):
            average = weighted_average(client_states, sample_counts)
            global_state = opt.step(global_state, average)
    """

    def __init__(
        self,
        kind: str = "fedavg",
        lr: float = 1.0,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        eps: float = 1e-3,
    ) -> None:
        _check_hyperparameters(kind, lr, momentum, beta1, beta2, eps)
        self.kind, self.lr, self.momentum = kind, lr, momentum
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.steps = 0
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(self, global_state: dict[str, torch.Tensor], average: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new global state. Pure in its arguments (only the optimizer's own buffers change).

        Results have each global tensor's dtype and device. With kind "fedavg" and lr=1 the result equals
        `average` exactly.
        """
        _check_like(global_state, average, "the global state", "the average")
        for buffers in (self.m, self.v):
            if buffers and buffers.keys() != global_state.keys():
                raise ValueError(
                    "the optimizer's buffers hold other keys than this global state "
                    "(was it built, or loaded, for another adapter?)"
                )
        new, m, v = {}, {}, {}
        for key, g in global_state.items():
            x = g.to(_math_dtype(g.dtype))
            avg = average[key].to(x.device, x.dtype)
            delta = x - avg  # pseudo-gradient
            if self.kind == "fedavg":
                x_new = avg + (1 - self.lr) * delta  # = x - lr * delta, written so that lr=1 gives avg exactly
            elif self.kind == "fedavgm":
                m[key] = self.momentum * _previous(self.m, key, delta) + delta
                x_new = x - self.lr * m[key]
            else:  # fedadam
                m[key] = self.beta1 * _previous(self.m, key, delta) + (1 - self.beta1) * delta
                v[key] = self.beta2 * _previous(self.v, key, delta) + (1 - self.beta2) * delta.square()
                x_new = x - self.lr * m[key] / (v[key].sqrt() + self.eps)
            new[key] = x_new.to(g.dtype)
        self.m, self.v, self.steps = m, v, self.steps + 1  # only now, so a failed step changes nothing
        return new

    def state_dict(self) -> dict:
        """Kind, hyperparameters, step count and buffers (as CPU copies): what resuming a run needs."""
        return {
            "kind": self.kind,
            "lr": self.lr,
            "momentum": self.momentum,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "steps": self.steps,
            "m": {k: t.to("cpu", copy=True) for k, t in self.m.items()},
            "v": {k: t.to("cpu", copy=True) for k, t in self.v.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned; the kind must match this optimizer's."""
        missing = {"kind", "lr", "momentum", "beta1", "beta2", "eps", "steps", "m", "v"} - state.keys()
        if missing:
            raise ValueError(f"server optimizer state lacks {', '.join(sorted(missing))}")
        if state["kind"] != self.kind:
            raise ValueError(f"this state is for a {state['kind']!r} server optimizer, not {self.kind!r}")
        _check_hyperparameters(
            state["kind"], state["lr"], state["momentum"], state["beta1"], state["beta2"], state["eps"]
        )
        self.lr, self.momentum, self.eps = state["lr"], state["momentum"], state["eps"]
        self.beta1, self.beta2, self.steps = state["beta1"], state["beta2"], state["steps"]
        self.m = {k: t.clone() for k, t in state["m"].items()}
        self.v = {k: t.clone() for k, t in state["v"].items()}


# ----------------------------------------------------------------------------------------------------
# Client-level differential privacy: DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private
# Recurrent Language Models", Algorithm 1, flat clipping and the fixed-denominator estimator)
#
#     client k:  delta_k = x_k - x_t, clipped to ||delta_k|| <= S (one L2 norm over every tensor)
#     server:    x_avg = x_t + (1 / m) sum_k delta_k + N(0, (z S / m)^2 I)
#
# m is the *expected* number of clients per round (q times the number of clients under Poisson sampling),
# not the number that answered, and every client weighs the same: one client then moves the sum by at most
# S, whatever it sent, so the Gaussian noise z S / m hides it. Sample-count weights would let a client with
# more data move the average further than S / m and break that bound. The privacy spent over the rounds
# (epsilon at a delta) comes from an accountant for the Poisson-sampled Gaussian mechanism (dp_epsilon).


def _check_clip_norm(max_norm: float) -> None:
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"the clipping norm must be a finite number > 0, got {max_norm!r}")


def _update(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], name: str
) -> tuple[dict[str, torch.Tensor], float]:
    """(state - reference in float64 on the CPU, its L2 norm over all tensors together, as if flattened into
    one vector); ValueError if the two differ in keys, shapes or dtypes (`name` names the state)."""
    _check_like(reference, state, "the reference", name)
    delta = {k: state[k].double().cpu() - reference[k].double().cpu() for k in reference}
    return delta, math.sqrt(math.fsum(d.square().sum().item() for d in delta.values()))


def update_norm(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """||state - reference||, one L2 norm over every tensor (float64): how far a client moved what it got."""
    return _update(state, reference, "the state")[1]


def clip_update(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], max_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """(reference + delta * min(1, S / ||delta||), ||delta||) with delta = state - reference, its norm taken
    over all tensors together. A state already within the bound comes back unchanged (the same values).

    Raises:
        ValueError: max_norm not > 0, or states whose keys, shapes or dtypes differ.
    """
    _check_clip_norm(max_norm)
    delta, norm = _update(state, reference, "the state")
    if norm <= max_norm:
        return {k: t.clone() for k, t in state.items()}, norm
    factor = max_norm / norm
    return {
        k: (reference[k].double().cpu() + d * factor).to(state[k].device, state[k].dtype) for k, d in delta.items()
    }, norm


def dp_mean(
    reference: dict[str, torch.Tensor],
    uploads: list[dict[str, torch.Tensor]],
    max_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """x_t + (1 / m) sum_k (x_k - x_t) + N(0, (z S / m)^2) per coordinate: DP-FedAvg's noisy average of
    uploads that the clients clipped (clip_update) around the reference x_t they received. No uploads is a
    legal round: the result is then x_t plus noise. `generator` (a CPU torch.Generator) draws the noise, so
    a seeded run, and its resume, draws the same. The result goes on through ServerOptimizer.step.

    Raises:
        ValueError: an upload farther than S (with float slack) from the reference: not clipped, so the
            noise would not cover it; or a bad S, z or m.
    """
    _check_clip_norm(max_norm)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"the noise multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if not (math.isfinite(expected_clients) and expected_clients > 0):
        raise ValueError(f"the expected number of clients must be > 0, got {expected_clients!r}")
    total = {k: torch.zeros(t.shape, dtype=torch.float64) for k, t in reference.items()}
    for i, upload in enumerate(uploads):
        delta, norm = _update(upload, reference, f"upload {i}")
        if norm > max_norm * (1 + 1e-5):
            raise ValueError(f"upload {i} is {norm:.4g} from the global state, more than the clipping norm {max_norm}")
        for k in total:
            total[k] += delta[k]
    std = noise_multiplier * max_norm / expected_clients
    out = {}
    for k in sorted(reference):  # sorted: the same draws for the same state however its dict is ordered
        t = reference[k]
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64) * std
        out[k] = (t.double().cpu() + total[k] / expected_clients + noise).to(t.device, t.dtype)
    return {k: out[k] for k in reference}


def poisson_sample(clients: list[str], round: int, seed: int, rate: float) -> list[str]:
    """Each client independently with probability `rate` (0 < rate <= 1), as the privacy accountant assumes;
    the round may sample none. Depends only on (seed, round), like sample_clients."""
    if not 0 < rate <= 1:
        raise ValueError(f"the sampling rate must be in (0, 1], got {rate!r}")
    rng = random.Random(f"poisson_sample:{seed}:{round}")
    return [c for c in clients if rng.random() < rate]


def dp_epsilon(sample_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` Poisson-sampled Gaussian mechanisms (client sampling rate q, noise
    multiplier z): the RDP accountant of Google's dp-accounting (the one Flower's DP strategies wrap).

    Raises:
        ImportError: dp-accounting is not installed (pip install dp-accounting).
    """
    try:
        import dp_accounting
    except ImportError:
        raise ImportError("client-level DP accounting needs dp-accounting: pip install dp-accounting") from None
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    absl = logging.getLogger("absl")  # at large q it warns, per call, that it skips orders it cannot compute
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
        return accountant.get_epsilon(delta)
    finally:
        absl.setLevel(level)
