"""Fine-tune a 4-bit causal LM with LoRA / DoRA adapters: one hand-written training loop.

    python train.py config.yaml [section.key=value ...] [--resume]
    torchrun --nproc_per_node N train.py config.yaml ...        # data-parallel over N GPUs (or CPU processes)

Reading order: main(), which is the whole run top to bottom, then the pieces it calls in that order: the
packing check, one optimizer step, the batches, evaluation, checkpoints and the few data-parallel helpers.
The loss is loss.py's (cross-entropy on the labelled tokens, in chunks); the config (defaults, checks,
overrides) lives in config.py; federated.py reuses the pieces here.
"""

import functools
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

import config as C
import data as D
import infer
import lora
import loss as L
import model as M

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Batch = dict[str, torch.Tensor]  # input_ids, labels, and attention_mask (padded) or position_ids (packed): (B, T)
Example = dict[str, list[int]]  # input_ids, labels of one tokenized record


def main(argv: Sequence[str] | None = None) -> None:
    """The whole run: check the config, load the base and the data, add adapters, train, save."""
    args = C.cli(
        __doc__.splitlines()[0],
        argv,
        lambda ap: ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint"),
    )
    # Under torchrun every process runs all of main(); rank 0 alone prints and writes files for all
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # errors and warnings (stderr) still come from every process
    try:
        cfg = C.load_config(args.config, args.overrides)
        tc, lc = cfg["train"], cfg["lora"]
        out_dir = tc["output_dir"]
        previous = check_output_dir(out_dir, args.resume, tc["overwrite"])
        ckpt, state = read_checkpoint(out_dir, world) if args.resume else (None, None)
        C.quiet_libraries()
        seed_everything(tc["seed"])
        if world > 1:
            start_data_parallel(cfg["model"]["device"])
        model, tok, base_path, device, dtype = C.load_base(cfg)
        train_ex, eval_ex, eval_recs = load_examples(cfg, tok)
        if not train_ex:
            raise D.DataError(f"{cfg['data']['train_file']}: no example fits data.max_seq_len")
        add_adapters(model, lc, ["default"])
        L.check_loss(model, train_ex[0]["input_ids"][-64:], train_ex[0]["labels"][-64:], dtype)
        if cfg["data"]["packing"]:
            check_packing(model, train_ex[0], device, dtype)
        collate = collator(cfg, model, tok.pad_token_id)
        tc["batch_size"] = resolve_batch_size(
            tc,
            model,
            train_ex,
            collate,
            device,
            dtype,
            os.path.join(out_dir, "config.yaml") if args.resume else None,
        )
        if world > 1:
            dist.barrier()  # every process has checked its inputs: only now may rank 0 clear an old run
    except (C.ConfigError, D.DataError, M.ModelError, ValueError) as e:
        C.fail(e)
    if rank == 0:
        clear_output_dir(out_dir, previous)  # only now: a bad input above leaves an earlier run untouched
        C.save_yaml(cfg, os.path.join(out_dir, "config.yaml"))  # the resolved config, with every default
    if world > 1:
        seed_everything(tc["seed"] + rank)  # the adapters started equal; now each rank its own dropout masks
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tc["lr"], tc["weight_decay"], device)
    # fp16 needs loss scaling (its exponent range is narrow); bf16 and fp32 do not, so the scaler is off
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    logger = C.Logger(out_dir if rank == 0 else None)
    trainable, total = M.count_parameters(model)
    print(
        f"model {base_path} on {device} in {str(dtype).replace('torch.', '')}, "
        f"{cfg['model']['quantization']}; adapters: {trainable:,} trainable of {total:,} parameters; "
        f"{len(train_ex)} train / {len(eval_ex)} eval examples"
    )
    print(
        f"batch: {tc['batch_size'] * tc['grad_accum'] * world} sequences per optimizer step = "
        f"{tc['batch_size']} (train.batch_size) x {tc['grad_accum']} (train.grad_accum) x {world} "
        f"process{'es' if world > 1 else ''}"
    )

    step = 0
    if args.resume:
        lora.load_adapter(model, os.path.join(ckpt, "adapter"), "default")
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # a dict before torchrun
        set_rng_state(rngs[rank])
        step = state["step"]
        logger.log(event="resume", step=step)
        print(f"resumed from {ckpt}")
    elif eval_ex:
        metrics = eval_metrics(model, tok, eval_ex, eval_recs, cfg, collate, device, dtype)
        logger.log(step=0, **metrics)
        print(f"step 0: {describe(metrics)} (before training)")

    batches = batch_stream(
        train_ex,
        tc["batch_size"],
        tc["seed"],
        cfg["data"]["group_by_length"],
        collate,
        start=step * tc["grad_accum"] * world,
        rank=rank,
        world=world,
    )
    from tqdm import tqdm

    bar = tqdm(total=tc["max_steps"], initial=step, dynamic_ncols=True, disable=True if rank else None)
    model.train()
    bad_steps, t0, tokens_seen = 0, time.time(), 0
    while step < tc["max_steps"]:
        lr = lr_at(step, tc["max_steps"], tc["warmup_steps"], tc["lr"], tc["min_lr_ratio"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [next(batches) for _ in range(tc["grad_accum"])]
        loss, n_tokens, grad_norm = train_step(
            model, params, optimizer, scaler, micro, device, dtype, tc["max_grad_norm"]
        )
        step += 1
        if loss is None:
            bad_steps += 1
            if rank == 0:
                tqdm.write(f"warning: step {step}: loss is NaN/inf, step skipped", file=sys.stderr)
            logger.log(step=step, event="nonfinite_loss")
            if bad_steps >= tc["max_bad_steps"]:
                last = latest_checkpoint(out_dir)
                C.fail(
                    f"the loss was NaN/inf for {bad_steps} steps in a row; lower train.lr or check the data"
                    + (f" (the last good checkpoint is {last})" if last else "")
                )
            continue
        bad_steps, tokens_seen = 0, tokens_seen + n_tokens
        bar.update(1)
        if step % tc["log_every"] == 0 or step == tc["max_steps"]:
            tok_s = tokens_seen / (time.time() - t0)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            logger.log(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tok_s)
            if bar.disable:
                print(f"step {step}: loss {loss:.4f} lr {lr:.2e} {tok_s:.0f} tok/s")
            tokens_seen, t0 = 0, time.time()
        if eval_ex and tc["eval_every"] and step % tc["eval_every"] == 0 and step < tc["max_steps"]:
            metrics = eval_metrics(model, tok, eval_ex, eval_recs, cfg, collate, device, dtype)
            logger.log(step=step, **metrics)
            tqdm.write(f"step {step}: {describe(metrics)}")
        if (tc["save_every"] and step % tc["save_every"] == 0) or step == tc["max_steps"]:
            rngs = all_rng_states()  # every rank's generators, so that each resumes its own dropout masks
            if rank == 0:
                save_checkpoint(out_dir, step, model, optimizer, scaler, cfg, base_path, tc["keep_checkpoints"], rngs)
    bar.close()

    if eval_ex:
        metrics = eval_metrics(model, tok, eval_ex, eval_recs, cfg, collate, device, dtype)
        logger.log(step=step, **metrics)
        print(f"step {step}: {describe(metrics)} (end of training)")
    if rank == 0:
        final = os.path.join(out_dir, "adapter")
        write_atomically(final, lambda tmp: lora.save_adapter(model, tmp, "default", base_path))
        print(f"adapter saved to {final}")
    if world > 1:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Setup: seeds and the tokenized data


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_examples(cfg: C.Config, tok: "PreTrainedTokenizerBase") -> tuple[list[Example], list[Example], list[D.Record]]:
    """Tokenized (train, eval) examples, and the eval records: eval from data.eval_file, else a
    data.eval_fraction split of the train file."""
    dc = cfg["data"]
    records = D.load_records(dc["train_file"], dc["field_map"] or None)
    if dc["eval_file"]:
        train_recs, eval_recs = records, D.load_records(dc["eval_file"], dc["field_map"] or None)
    else:
        train_recs, eval_recs = D.split_eval(records, dc["eval_fraction"], cfg["train"]["seed"])
    return tokenize(cfg, tok, train_recs, "train"), tokenize(cfg, tok, eval_recs, "eval"), eval_recs


def tokenize(cfg: C.Config, tok: "PreTrainedTokenizerBase", records: list[D.Record], name: str) -> list[Example]:
    """The records' examples as the data section says (max_seq_len, system_prompt, train_on): the one
    place train.py, federated.py's clients and flower_app.py's sites tokenize."""
    dc = cfg["data"]
    return D.tokenize_records(tok, records, dc["max_seq_len"], dc["system_prompt"], dc["train_on"], name)


def add_adapters(model: nn.Module, lc: dict, names: list[str]) -> None:
    """Inject the adapters `names` as the lora section says, make them (only them) trainable, and report
    in one line which layers got them; a target name that matches no layer of this model is a warning."""
    for name in names:
        paths = lora.inject(
            model, lc["target_modules"], name, lc["r"], lc["alpha"], lc["dropout"], lc["use_dora"], lc["use_rslora"]
        )
    lora.mark_trainable(model, names)
    counts = Counter(p.rpartition(".")[2] for p in paths)
    each = f" ({next(iter(counts.values()))} layers each)" if len(set(counts.values())) == 1 else ""
    listed = ", ".join(n if each else f"{n} x{c}" for n, c in counts.items())
    print(f"adapters {' + '.join(names)} on {len(paths)} linear layers: {listed}{each}")
    unmatched = [t for t in lc["target_modules"] if t not in counts] if isinstance(lc["target_modules"], list) else []
    if unmatched:
        print(
            f"warning: lora.target_modules: {', '.join(unmatched)} match no linear layer of {type(model).__name__}, "
            f"whose layers are named {', '.join(lora.linear_names(model))} (lora.target_modules=all-linear adapts "
            "all but the output layer)",
            file=sys.stderr,
        )


# ----------------------------------------------------------------------------------------------------
# Packing: the check that a model masks packed rows as collate_packed lays them out


@torch.no_grad()
def check_packing(model: nn.Module, example: Example, device: torch.device, dtype: torch.dtype) -> None:
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


# ----------------------------------------------------------------------------------------------------
# One optimizer step, its schedule, and the stream of batches


def lr_at(step: int, max_steps: int, warmup_steps: int, lr: float, min_lr_ratio: float) -> float:
    """Linear warmup to lr, then cosine decay to min_lr_ratio * lr at max_steps. A pure function of the
    step, so the schedule's whole state is the step counter."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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
    micro_batches: list[Batch],
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
    n_tokens = int(all_sum([n_tokens])[0])  # nothing to add in one process
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
    total = sync_gradients(params, total)  # sums over the ranks; nothing to do in one process
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


def collator(cfg: C.Config, model: nn.Module, pad_id: int) -> Callable[[list[Example]], Batch]:
    """How a micro-batch's examples become tensors: padded to the longest (data.collate), or with
    data.packing laid end to end (data.collate_packed), in rows of at most data.max_seq_len tokens, or
    in one row under flash_attention_2, whose varlen kernel costs nothing for the examples' boundaries.
    Either way a micro-batch holds the same examples, so the loss, the gradients and the schedule are
    those of the padded run; packing only drops the padding's compute."""
    if not cfg["data"]["packing"]:
        return functools.partial(D.collate, pad_id=pad_id)
    one_row = model.config._attn_implementation == "flash_attention_2"
    return functools.partial(D.collate_packed, pad_id=pad_id, max_len=None if one_row else cfg["data"]["max_seq_len"])


def batch_stream(
    examples: list[Example],
    batch_size: int,
    seed: int,
    group_by_length: bool,
    collate: Callable[[list[Example]], Batch],
    start: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[Batch]:
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
    examples: list[Example],
    collate: Callable[[list[Example]], Batch],
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
    tc: dict,
    model: nn.Module,
    examples: list[Example],
    collate: Callable[[list[Example]], Batch],
    device: torch.device,
    dtype: torch.dtype,
    previous_config: str | None = None,
) -> int:
    """train.batch_size, with "auto" resolved: on CUDA the largest micro-batch that fits (probed on every
    rank, the smallest answer taken by all), on other devices 16 (running out of CPU memory kills the
    process instead of raising). A resumed run keeps the size its first part used (from its saved config),
    so its batches are the same."""
    if tc["batch_size"] != "auto":
        return tc["batch_size"]
    if previous_config and os.path.isfile(previous_config):
        with open(previous_config) as f:
            saved = (yaml.safe_load(f) or {}).get("train", {}).get("batch_size")
        if isinstance(saved, int):
            return saved
    if device.type != "cuda":
        print(f"train.batch_size auto: 16 on {device.type} (probing the largest batch needs a CUDA GPU)")
        return 16
    n = all_min(largest_batch_size(model, examples, collate, device, dtype, limit=min(len(examples), 256)))
    if n == 0:
        raise M.ModelError(
            "train.batch_size auto: not even one example of the longest length fits in GPU "
            "memory; lower data.max_seq_len"
        )
    print(f"train.batch_size auto: {n} (the largest micro-batch of the longest example that fits in GPU memory)")
    return n


# ----------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[Example],
    batch_size: int,
    collate: Callable[[list[Example]], Batch],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, float]:
    """Mean response-token loss and its perplexity over `examples`; under torchrun each rank takes its
    share of the batches and the sums are added up, so that evaluation costs 1 / ranks."""
    was_training = model.training
    model.eval()
    rank, world = rank_and_world()
    total, count = 0.0, 0
    for idx in D.batch_indices([len(e["input_ids"]) for e in examples], batch_size, 0, 0, True)[rank::world]:
        batch = {k: v.to(device) for k, v in collate([examples[j] for j in idx]).items()}
        with M.autocast(device, dtype):
            loss, n = L.loss_sum(model, batch)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    total, count = all_sum([total, count])
    mean = total / max(count, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50))}


def eval_metrics(
    model: nn.Module,
    tok: "PreTrainedTokenizerBase",
    examples: list[Example],
    records: list[D.Record],
    cfg: C.Config,
    collate: Callable[[list[Example]], Batch],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, float]:
    """evaluate()'s loss and perplexity, plus, unless train.eval_max_new_tokens is 0, the exact match of
    the greedy answers to the eval records (infer.predict and infer.exact_match, as `infer.py --input`
    scores), each rank answering its share of the records under torchrun."""
    tc = cfg["train"]
    metrics = evaluate(model, examples, tc["batch_size"], collate, device, dtype)
    if tc["eval_max_new_tokens"]:
        greedy = dict(max_new_tokens=tc["eval_max_new_tokens"], temperature=0.0, top_p=1.0)
        rank, world = rank_and_world()
        mine = records[rank::world]
        answers = infer.predict(model, tok, mine, cfg["data"]["system_prompt"], device, dtype, greedy, progress=False)
        hits = sum(infer.exact_match(a, D.reference(r)) for r, a in zip(mine, answers, strict=True))
        hits, n = all_sum([hits, len(mine)])
        metrics["exact_match"] = hits / n
    return metrics


def describe(metrics: dict[str, float]) -> str:
    """'eval_loss 1.2345, exact_match 0.900': one eval for the log line."""
    return ", ".join(
        f"{k} {metrics[k]:.{4 if k == 'eval_loss' else 3}f}" for k in ("eval_loss", "exact_match") if k in metrics
    )


# ----------------------------------------------------------------------------------------------------
# Checkpoints: <output_dir>/checkpoints/step_NNNNNN/{adapter/, state.pt, config.yaml}, written to a
# temporary directory and renamed, so a directory named step_* is always complete.


def rng_state() -> dict:
    """The state of every random generator a run draws from (torch, numpy, Python, CUDA)."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def save_checkpoint(
    out_dir: str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: C.Config,
    base_path: str,
    keep: int,
    rng_states: list[dict] | None = None,
) -> None:
    """Write checkpoints/step_NNNNNN (adapter, optimizer, scaler, RNG, config); keep the latest `keep`.
    rng_states: all_rng_states() of a data-parallel run, one per rank (default: this process's)."""
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
        C.save_yaml(cfg, os.path.join(tmp, "config.yaml"))

    write_atomically(os.path.join(ckpt_dir, f"step_{step:06d}"), write)
    keep_latest(ckpt_dir, "step_", keep)


def completed(parent: str, prefix: str) -> list[str]:
    """Names of the complete checkpoint directories prefix* in parent, oldest first (write_atomically's
    .tmp and .old names are never complete)."""
    names = os.listdir(parent) if os.path.isdir(parent) else []
    return sorted(n for n in names if n.startswith(prefix) and "." not in n)


def keep_latest(parent: str, prefix: str, keep: int) -> None:
    """Delete all but the newest `keep` complete prefix* directories in parent."""
    for old in completed(parent, prefix)[:-keep]:
        shutil.rmtree(os.path.join(parent, old))


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoints/step_* directory of a run, or None."""
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    done = completed(ckpt_dir, "step_")
    return os.path.join(ckpt_dir, done[-1]) if done else None


def read_checkpoint(out_dir: str, world: int) -> tuple[str, dict]:
    """(the newest checkpoint's directory, its state.pt) for --resume.

    Raises:
        C.ConfigError: it was written by a run with another number of processes, whose data order and
            batch per step this run cannot continue.
    """
    ckpt = latest_checkpoint(out_dir)
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    n = state.get("world_size", 1)
    if n != world:
        how = "python train.py" if n == 1 else f"torchrun --nproc_per_node {n} on one machine"
        raise C.ConfigError(
            f"--resume: {ckpt} was written by {n} process{'es' if n > 1 else ''} and this run has {world}; "
            f"resume it with as many ({how}), or start over with train.overwrite=true"
        )
    return ckpt, state


RUN_FILES = ("metrics.jsonl", "checkpoints", "adapter", "config.yaml")


def check_output_dir(
    out_dir: str,
    resume: bool,
    overwrite: bool,
    files: Sequence[str] = RUN_FILES,
    latest: Callable[[str], str | None] = latest_checkpoint,
) -> list[str]:
    """Refuse to mix two runs in one directory: --resume continues it, train.overwrite=true replaces it.
    Returns the previous run's files, which clear_output_dir removes once everything else checked out."""
    previous = sorted(
        f
        for f in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
        if f in files or any(f.startswith(p.rstrip("*")) for p in files if p.endswith("*"))
    )
    if resume and latest(out_dir) is None:
        raise C.ConfigError(f"--resume: {out_dir} holds no complete checkpoint to resume from")
    if previous and not resume and not overwrite:
        raise C.ConfigError(
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


# ----------------------------------------------------------------------------------------------------
# Data parallel: `torchrun --nproc_per_node N train.py config.yaml`. torchrun starts N copies of this
# script with RANK, LOCAL_RANK and WORLD_SIZE set; each loads the 4-bit base on its own device, starts
# with the same adapters (same seed), trains on its share of the micro-batches and adds its adapter
# gradients to the others' once per optimizer step, so all ranks take the same step. Without a process
# group (plain `python train.py`) every helper below returns its input unchanged.


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


def sync_gradients(params: list[nn.Parameter], loss: float) -> float:
    """Replace each adapter gradient by its sum over the ranks; return the step's loss summed likewise.

    Each rank divided its loss by the labelled tokens of every rank's micro-batches (train_step), so the
    sum is the gradient of the mean loss over the whole step: what one process computes from the same
    micro-batches with grad_accum x ranks. A rank that met a NaN/inf loss sends inf, so that all skip.

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


def all_rng_states() -> list[dict]:
    """rng_state() of every rank, in rank order."""
    world = rank_and_world()[1]
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


if __name__ == "__main__":
    main()
