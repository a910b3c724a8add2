"""One optimizer step and what feeds it: the schedule, the optimizer, the stream of batches.

    optimizer = make_optimizer(params, lr, weight_decay, device)
    batches = batch_stream(examples, batch_size, seed, group_by_length, collate)
    for step in range(max_steps):
        set_lr(optimizer, lr_at(step, max_steps, warmup_steps, lr, min_lr_ratio))
        loss, n_tokens, grad_norm = train_step(model, params, optimizer, scaler, [next(batches)], device, dtype, 1.0)

train.py's loop and the federated clients (client.py) both train through train_step, so a client's
local training is the single-machine training. Also here: how a micro-batch is laid out (collator), the
batch-size probe for `train.batch_size=auto`, and the check that a model masks packed rows. Library
module: plain arguments, no config; needs torch, data.py, loss.py, model.py and distributed.py.
"""

import functools
import math
import os
from collections.abc import Callable, Iterator

import torch
import yaml
from torch import nn

import data as D
import distributed
import loss as L
import model as M


def lr_at(step: int, max_steps: int, warmup_steps: int, lr: float, min_lr_ratio: float) -> float:
    """Linear warmup to lr, then cosine decay to min_lr_ratio * lr at max_steps. A pure function of the
    step, so the schedule's whole state is the step counter."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group this step's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(
    params: list[nn.Parameter], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW; the fused kernel on CUDA (one launch for all parameters instead of several per tensor)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def train_step(
    model: nn.Module,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    micro_batches: list[D.Batch],
    device: torch.device,
    dtype: torch.dtype,
    max_grad_norm: float,
) -> tuple[float | None, int, float | None]:
    """One optimizer step over a list of micro-batches (gradient accumulation), on every rank at once
    under torchrun. Returns (loss, tokens, gradient norm before clipping) of the whole step, or
    (None, tokens, None) when the loss was NaN/inf and the step was skipped."""
    # Normalise by the labelled tokens of the whole step (all its micro-batches, on all ranks), so k
    # micro-batches on n ranks give the same gradient as one batch k x n times larger (a mean of
    # per-micro-batch means would weight them wrongly).
    n_tokens = sum(int((mb["labels"][:, 1:] != D.IGNORE_INDEX).sum()) for mb in micro_batches)
    n_tokens = int(distributed.all_sum([n_tokens])[0])  # nothing to add in one process
    total = 0.0
    for mb in micro_batches:
        mb = {k: v.to(device) for k, v in mb.items()}
        with M.autocast(device, dtype):
            loss, _ = L.loss_sum(model, mb)
        loss = loss / max(n_tokens, 1)
        if not torch.isfinite(loss):
            total = math.inf
            break
        scaler.scale(loss).backward()  # a no-op scaler unless fp16
        total += loss.item()
    total = distributed.sync_gradients(params, total)  # sums over the ranks; nothing to do in one process
    if not math.isfinite(total):  # every rank sees the same total, so all skip the step together
        optimizer.zero_grad(set_to_none=True)
        return None, n_tokens, None
    scaler.unscale_(optimizer)  # (a no-op unless fp16) so that the norm below is the true one
    if max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total, n_tokens, grad_norm.item()


def collator(model: nn.Module, pad_id: int, packing: bool, max_seq_len: int) -> Callable[[list[D.Example]], D.Batch]:
    """How a micro-batch's examples become tensors: padded to the longest (data.collate), or with
    data.packing laid end to end (data.collate_packed), in rows of at most data.max_seq_len tokens, or
    in one row under flash_attention_2, whose varlen kernel costs nothing for the examples' boundaries.
    Either way a micro-batch holds the same examples, so the loss, the gradients and the schedule are
    those of the padded run; packing only drops the padding's compute."""
    if not packing:
        return functools.partial(D.collate, pad_id=pad_id)
    one_row = model.config._attn_implementation == "flash_attention_2"
    return functools.partial(D.collate_packed, pad_id=pad_id, max_len=None if one_row else max_seq_len)


def batch_stream(
    examples: list[D.Example],
    batch_size: int,
    seed: int,
    group_by_length: bool,
    collate: Callable[[list[D.Example]], D.Batch],
    start: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[D.Batch]:
    """Endless micro-batches (made by `collate`: collator), epoch after epoch, deterministic from the
    seed; skips the first `start`. With `world` ranks, one shared order is dealt out: rank r takes the
    micro-batches r, r + world, ..."""
    lengths = [len(e["input_ids"]) for e in examples]
    epoch, i = 0, 0
    while True:
        for idx in D.batch_indices(lengths, batch_size, seed, epoch, group_by_length):
            if i >= start and i % world == rank:
                yield collate([examples[j] for j in idx])
            i += 1
        epoch += 1


def largest_batch_size(
    model: nn.Module,
    examples: list[D.Example],
    collate: Callable[[list[D.Example]], D.Batch],
    device: torch.device,
    dtype: torch.dtype,
    limit: int,
) -> int:
    """The largest micro-batch of the longest example, up to `limit`, whose forward and backward fit in
    GPU memory: doubling from 1, then bisection. `collate` lays it out as training will (packed or
    not): n copies of the longest example are the most tokens a micro-batch of n can hold. Room is
    kept for AdamW's two moments (allocated at the first real step). Returns 0 if not even one fits."""
    params = [p for p in model.parameters() if p.requires_grad]
    longest = [max(examples, key=lambda e: len(e["input_ids"]))]
    reserve = [torch.empty_like(p, dtype=torch.float32) for p in params for _ in range(2)]  # noqa: F841
    was_training = model.training
    model.train()  # transformers checkpoints layers only in training mode

    def fits(n: int) -> bool:
        batch = {k: v.to(device) for k, v in collate(longest * n).items()}
        try:
            with M.autocast(device, dtype):
                loss, _ = L.loss_sum(model, batch)
            loss.backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            for p in params:
                p.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()

    good, n = 0, 1
    while n <= limit and fits(n):
        good, n = n, 2 * n
    bad = min(n, limit + 1)  # the smallest size known not to fit (or past the limit)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    model.train(was_training)
    return good


def resolve_batch_size(
    batch_size: int | str,
    model: nn.Module,
    examples: list[D.Example],
    collate: Callable[[list[D.Example]], D.Batch],
    device: torch.device,
    dtype: torch.dtype,
    previous_config: str | None = None,
) -> int:
    """train.batch_size, with "auto" resolved: on CUDA the largest micro-batch that fits (probed on every
    rank, the smallest answer taken by all), on other devices 16 (running out of CPU memory kills the
    process instead of raising). A resumed run keeps the size its first part used (from its saved config),
    so its batches are the same."""
    if batch_size != "auto":
        return batch_size
    if previous_config and os.path.isfile(previous_config):
        with open(previous_config) as f:
            saved = (yaml.safe_load(f) or {}).get("train", {}).get("batch_size")
        if isinstance(saved, int):
            return saved
    if device.type != "cuda":
        print(f"train.batch_size auto: 16 on {device.type} (probing the largest batch needs a CUDA GPU)")
        return 16
    n = distributed.all_min(largest_batch_size(model, examples, collate, device, dtype, limit=min(len(examples), 256)))
    if n == 0:
        raise M.ModelError(
            "train.batch_size auto: not even one example of the longest length fits in GPU "
            "memory; lower data.max_seq_len"
        )
    print(f"train.batch_size auto: {n} (the largest micro-batch of the longest example that fits in GPU memory)")
    return n


@torch.no_grad()
def check_packing(model: nn.Module, example: D.Example, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse data.packing for a model whose attention would cross the examples of a packed row: an
    example's tokens (the last 64), reversed, give the same hidden states alone as after the example in
    one row with positions restarting (collate_packed's layout). Models whose masks transformers builds
    read the restart; one that ignored it would let every token attend to the example before it.

    Raises:
        M.ModelError: the hidden states differ by more than bf16 rounding could explain.
    """
    a = torch.tensor(example["input_ids"][-64:], device=device)
    b = a.flip(0)
    n = len(a)
    was_training = model.training
    model.eval()
    try:
        with M.autocast(device, dtype):
            alone = model.base_model(input_ids=b[None], use_cache=False).last_hidden_state[0]
            positions = torch.arange(n, device=device).repeat(2)[None]
            row = torch.cat([a, b])[None]
            packed = model.base_model(input_ids=row, position_ids=positions, use_cache=False).last_hidden_state[0, n:]
    finally:
        model.train(was_training)
    err = ((packed.float() - alone.float()).abs().max() / alone.float().abs().max().clamp_min(1e-6)).item()
    if err > 0.1:  # bf16 rounding: up to 0.01 (measured); attention across the examples: about 1
        raise M.ModelError(
            f"data.packing: {type(model).__name__} lets attention cross the examples of a packed row (hidden "
            f"states differ by {err:.2g} relative), so packing would train on other examples' tokens; set "
            "data.packing=false"
        )
