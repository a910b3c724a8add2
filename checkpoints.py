"""Run folders and checkpoints: what a run writes, written so that a crash never leaves half of it.

    check_output_dir(out, resume, overwrite)          # refuse to mix two runs in one folder
    save_checkpoint(out, step, model, opt, scaler, config, base, keep)
    ckpt, state = read_checkpoint(out, world)         # --resume

A checkpoint is a directory, <output_dir>/checkpoints/step_NNNNNN/{adapter/, state.pt, config.yaml},
written under a temporary name and renamed (write_atomically): a directory named step_<number> is
complete, and the largest number is the newest. The federated rounds (server.py, client.py) use the same
helpers for round_NNN. State includes every random generator's state, so that a resumed run draws the same
dropout masks and data order as an uninterrupted one; it holds tensors, numbers and strings only, read back
with weights_only=True (load_state), so that loading a checkpoint never runs code from it. Needs torch,
numpy, pyyaml and lora.py (for the adapter files).
"""

import os
import random
import re
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
    """The state of every random generator a run draws from (torch, numpy, Python, CUDA), as tensors,
    numbers and strings only, so that load_state reads it back without unpickling an object."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # ("MT19937", 624 uint32 words, ...)
    version, words, gauss_next = random.getstate()  # (3, 625 ints < 2**32, a float or None)
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned: the generators then draw exactly what they drew after it."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"].tolist()), p["gauss_next"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(path: str) -> dict[str, Any]:
    """Read a file that torch.save wrote, holding tensors, numbers and strings only: torch loads it with
    weights_only=True, which unpickles no other object, so a file from elsewhere cannot run code.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or holds other Python objects; one line
            naming it and what to do.
    """
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, KeyError, EOFError, ... depending on the damage
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # a class the safe load will not build
        if isinstance(e, FileNotFoundError):
            what = "missing"
        elif refused:
            what = f"holds {refused[1]}, which a weights-only load refuses (written by an older version?)"
        else:
            what = "unreadable (truncated or corrupt)"
        raise CheckpointError(
            f"{path}: {what}; delete the checkpoint directory that holds it to resume from the one before, "
            "or start over with train.overwrite=true"
        ) from None


# ----------------------------------------------------------------------------------------------------
# Directories written whole


def save_yaml(obj: dict, path: str) -> None:
    """Write a config (or any plain dict) as YAML, keys in their order."""
    with open(path, "w") as f:
        yaml.safe_dump(obj, f, sort_keys=False)


def write_atomically(final_dir: str, write: Callable[[str], None]) -> None:
    """Call write(tmp_dir), then rename tmp_dir to final_dir (replacing an older one): a crash leaves the
    old version or the new one under final_dir, never half of one.

    A final_dir.old left by an earlier crash is put back when final_dir is missing (the crash came between
    the two renames, so .old is the previous complete version) and deleted otherwise (a stale copy)."""
    tmp, old = f"{final_dir}.tmp", f"{final_dir}.old"
    if os.path.exists(old):
        shutil.rmtree(old) if os.path.exists(final_dir) else os.rename(old, final_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(final_dir):
        os.rename(final_dir, old)
        os.rename(tmp, final_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final_dir)


def completed(parent: str, prefix: str) -> list[str]:
    """Names of the complete checkpoint directories in parent, prefix followed by a number, in the order of
    that number (step_999999 before step_1000000; round_999, round_1000, round_1001). Other names, such as
    write_atomically's .tmp and .old, are never complete."""
    names = os.listdir(parent) if os.path.isdir(parent) else []
    numbered = [n for n in names if re.fullmatch(re.escape(prefix) + r"\d+", n)]
    return sorted(numbered, key=lambda n: int(n[len(prefix) :]))


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
        CheckpointError: its state.pt cannot be read (load_state), or it was written by a run with another
            number of processes, whose data order and batch per step this run cannot continue.
    """
    ckpt = latest_checkpoint(out_dir)
    state = load_state(os.path.join(ckpt, "state.pt"))
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
