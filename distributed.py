"""Data parallel with torchrun, for adapters: `torchrun --nproc_per_node N train.py config.yaml`.

torchrun starts N copies of train.py with RANK, LOCAL_RANK and WORLD_SIZE set. Each loads the 4-bit base
on its own device, starts with the same adapters (same seed), trains on its share of the micro-batches,
and adds its adapter gradients to the others' once per optimizer step (sync_gradients), so every rank
takes the same step. Without a process group (plain `python train.py`) every helper here returns its
input unchanged, so the single-process path pays nothing. Needs torch and model.py (device names).
"""

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import model as M


def start_data_parallel(device_name: str) -> None:
    """Join torchrun's process group: NCCL between GPUs, this process on cuda:LOCAL_RANK; gloo on the CPU.

    Raises:
        M.ModelError: model.device pins one GPU (cuda:N) or names mps; or this machine has fewer GPUs
            than torchrun started processes.
    """
    device = M.resolve_device(device_name)
    if device.type not in ("cpu", "cuda") or device.index is not None:
        raise M.ModelError(
            f"model.device: {device_name} cannot be shared by torchrun's processes; use auto, cuda or cpu "
            "(each process then takes the GPU cuda:LOCAL_RANK, or the CPU)"
        )
    if device.type == "cpu":
        dist.init_process_group("gloo")
        return
    local = int(os.environ["LOCAL_RANK"])
    if local >= torch.cuda.device_count():
        raise M.ModelError(
            f"torchrun started local rank {local} but this machine has {torch.cuda.device_count()} GPUs; "
            "lower --nproc_per_node"
        )
    torch.cuda.set_device(local)  # from here on, "cuda" means this process's own GPU
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))


def stop_data_parallel() -> None:
    """Leave the process group at the end of a run (nothing to do in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in one process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    """Where collective tensors must live: NCCL moves GPU tensors only, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Each value summed over the ranks (in float64)."""
    if rank_and_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_min(value: int) -> int:
    """The smallest of the ranks' values."""
    if rank_and_world()[1] == 1:
        return value
    t = torch.tensor([value], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order: [obj] in one process."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    return objs


def sync_gradients(params: list[nn.Parameter], loss: float) -> float:
    """Replace each adapter gradient by its sum over the ranks; return the step's loss summed likewise.

    Each rank divided its loss by the labelled tokens of every rank's micro-batches (trainer.train_step),
    so the sum is the gradient of the mean loss over the whole step: what one process computes from the
    same micro-batches with grad_accum x ranks. A rank that met a NaN/inf loss sends inf, so that all skip.

    One all-reduce per optimizer step, of the adapters' gradients alone (4 bytes per trainable parameter:
    161 MB for Qwen2.5-7B at r = 16 on all seven projections), after the last micro-batch. Why not
    DistributedDataParallel: DDP overlaps its all-reduce with the backward pass, bucket by bucket, which
    pays when the gradients are the model's billions of weights; for the adapters it saves little, and
    under gradient accumulation DDP too must sync on the last micro-batch only (no_sync() before it).
    Without DDP the model stays unwrapped (no .module between the loop and the model), and the loss rides
    in the same message.
    """
    if rank_and_world()[1] == 1:
        return loss
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.flatten().float() for g in grads] + [torch.tensor([loss], device=grads[0].device)])
    dist.all_reduce(flat)
    for p, g in zip(params, flat[:-1].split([p.numel() for p in params]), strict=True):
        p.grad = g.view_as(p).to(p.dtype)
    return flat[-1].item()
