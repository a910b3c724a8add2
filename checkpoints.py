"""Run folders and checkpoints: what a run writes, written so that a crash never leaves half of it.

    check_output_dir(out, resume, overwrite)          # refuse to mix two runs in one folder
    save_checkpoint(out, step, model, opt, scaler, config, base, keep)
    ckpt, state = read_checkpoint(out, world)         # --resume

A checkpoint is a directory, <output_dir>/checkpoints/step_NNNNNN/{adapter/, state.pt, config.yaml},
written under a temporary name and renamed (write_atomically): a directory named step_* is complete. The
federated rounds (server.py, client.py) use the same helpers for round_NNN. State includes every random
generator's state, so that a resumed run draws the same dropout masks and data order as an uninterrupted
one. Needs torch, numpy, pyyaml and lora.py (for the adapter files).
"""

import os
import random
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

import lora

RUN_FILES = ("metrics.jsonl", "checkpoints", "adapter", "config.yaml")  # what train.py writes in its output_dir


class CheckpointError(ValueError):
    """An output directory or checkpoint that this run cannot use; the message says what to do."""


# ----------------------------------------------------------------------------------------------------
# Random generators


def rng_state() -> dict[str, Any]:
    """The state of every random generator a run draws from (torch, numpy, Python, CUDA)."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# Directories written whole


def save_yaml(obj: dict, path: str) -> None:
    """Write a config (or any plain dict) as YAML, keys in their order."""
    with open(path, "w") as f:
        yaml.safe_dump(obj, f, sort_keys=False)


def write_atomically(final_dir: str, write: Callable[[str], None]) -> None:
    """Call write(tmp_dir), then rename tmp_dir to final_dir (replacing an older one)."""
    tmp = f"{final_dir}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(final_dir):
        old = f"{final_dir}.old"
        os.rename(final_dir, old)
        os.rename(tmp, final_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final_dir)


def completed(parent: str, prefix: str) -> list[str]:
    """Names of the complete checkpoint directories prefix* in parent, oldest first (write_atomically's
    .tmp and .old names are never complete)."""
    names = os.listdir(parent) if os.path.isdir(parent) else []
    return sorted(n for n in names if n.startswith(prefix) and "." not in n)


def keep_latest(parent: str, prefix: str, keep: int) -> None:
    """Delete all but the newest `keep` complete prefix* directories in parent."""
    for old in completed(parent, prefix)[:-keep]:
        shutil.rmtree(os.path.join(parent, old))


# ----------------------------------------------------------------------------------------------------
# train.py's checkpoints: <output_dir>/checkpoints/step_NNNNNN/{adapter/, state.pt, config.yaml}


def save_checkpoint(
    out_dir: str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: dict,
    base_path: str,
    keep: int,
    rng_states: list[dict[str, Any]] | None = None,
) -> None:
    """Write checkpoints/step_NNNNNN (adapter, optimizer, scaler, RNG, config); keep the latest `keep`.
    rng_states: every rank's rng_state() in a data-parallel run (default: this process's)."""
    rng_states = rng_states or [rng_state()]
    ckpt_dir = os.path.join(out_dir, "checkpoints")

    def write(tmp: str) -> None:
        lora.save_adapter(model, os.path.join(tmp, "adapter"), "default", base_path)
        torch.save(
            {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "schedule": {"step": step},
                "rng": rng_states,
                "world_size": len(rng_states),
            },
            os.path.join(tmp, "state.pt"),
        )
        save_yaml(config, os.path.join(tmp, "config.yaml"))

    write_atomically(os.path.join(ckpt_dir, f"step_{step:06d}"), write)
    keep_latest(ckpt_dir, "step_", keep)


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoints/step_* directory of a run, or None."""
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    done = completed(ckpt_dir, "step_")
    return os.path.join(ckpt_dir, done[-1]) if done else None


def read_checkpoint(out_dir: str, world: int) -> tuple[str, dict[str, Any]]:
    """(the newest checkpoint's directory, its state.pt) for --resume.

    Raises:
        CheckpointError: it was written by a run with another number of processes, whose data order and
            batch per step this run cannot continue.
    """
    ckpt = latest_checkpoint(out_dir)
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    n = state.get("world_size", 1)
    if n != world:
        how = "python train.py" if n == 1 else f"torchrun --nproc_per_node {n} on one machine"
        raise CheckpointError(
            f"--resume: {ckpt} was written by {n} process{'es' if n > 1 else ''} and this run has {world}; "
            f"resume it with as many ({how}), or start over with train.overwrite=true"
        )
    return ckpt, state


# ----------------------------------------------------------------------------------------------------
# The output directory: one run per folder


def check_output_dir(
    out_dir: str,
    resume: bool,
    overwrite: bool,
    files: Sequence[str] = RUN_FILES,
    latest: Callable[[str], str | None] = latest_checkpoint,
) -> list[str]:
    """Refuse to mix two runs in one directory: --resume continues it, train.overwrite=true replaces it.
    `files`: what a run writes there (a name ending in * is a prefix); `latest`: its newest complete
    checkpoint. Returns the previous run's files, which clear_output_dir removes once everything else
    checked out (so a bad input never costs an earlier run)."""
    previous = sorted(
        f
        for f in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
        if f in files or any(f.startswith(p.rstrip("*")) for p in files if p.endswith("*"))
    )
    if resume and latest(out_dir) is None:
        raise CheckpointError(f"--resume: {out_dir} holds no complete checkpoint to resume from")
    if previous and not resume and not overwrite:
        raise CheckpointError(
            f"{out_dir} already holds a run ({', '.join(previous)}); pass --resume to continue "
            "it or train.overwrite=true to replace it"
        )
    return [] if resume else previous


def clear_output_dir(out_dir: str, previous: list[str]) -> None:
    """Delete the previous run's files (check_output_dir's list) and make sure out_dir exists."""
    for f in previous:
        path = os.path.join(out_dir, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(out_dir, exist_ok=True)
