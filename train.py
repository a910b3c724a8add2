"""Fine-tune a 4-bit causal LM with LoRA / DoRA adapters: one hand-written training loop.

    python train.py config.yaml [section.key=value ...] [--resume]

Reading order: the config (defaults and checks), the loss, one optimizer step, evaluation,
checkpoints, and main(), which is the whole run top to bottom. federated.py reuses the pieces.
"""

import argparse
import difflib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import yaml

import data as D
import lora
import model as M

# ----------------------------------------------------------------------------------------------------
# Config: every key, its default and its type. config.yaml documents them; a file may set any subset.

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULTS = {
    "model": dict(name_or_path="tiny", quantization="nf4", compute_dtype="auto", device="auto",
                  attention="auto", gradient_checkpointing=True, cache_dir=".cache"),
    "lora": dict(r=16, alpha=32, dropout=0.05, use_dora=False, use_rslora=False, target_modules=ALL_LINEAR),
    "data": dict(train_file="data/demo.json", eval_file=None, eval_fraction=0.1, field_map={},
                 system_prompt=None, max_seq_len=1024, train_on_prompt=False, group_by_length=True,
                 clients=None, partition="iid", num_clients=4, dirichlet_alpha=0.5, partition_key="category"),
    "train": dict(output_dir="runs/train", seed=0, max_steps=400, batch_size=16, grad_accum=1, lr=3e-3,
                  weight_decay=0.0, warmup_steps=20, min_lr_ratio=0.1, max_grad_norm=1.0, eval_every=100,
                  save_every=100, keep_checkpoints=2, log_every=10, max_bad_steps=5, overwrite=False),
    "federated": dict(output_dir="runs/federated", rounds=12, fraction=1.0, mode="alternating",
                      local_steps=8, global_steps=22, local_weight_decay=5.0, min_clients=1, server_optimizer="fedavg",
                      server_lr=1.0, max_new_tokens=8),
}
AUTO = {"train.batch_size"}  # keys that also take the value "auto"
NULLABLE = {"data.eval_file": str, "data.system_prompt": str, "data.clients": list}  # keys whose default is None
CHOICES = {
    "model.quantization": M.QUANTIZATIONS, "model.compute_dtype": ("auto", *M.DTYPES),
    "model.attention": M.ATTENTIONS, "data.partition": ("iid", "dirichlet"),
    "federated.mode": ("alternating", "joint", "global_only"),
    "federated.server_optimizer": ("fedavg", "fedavgm", "fedadam"),
}
RULES = {  # key: (test, what it must be)
    "lora.r": (lambda v: v >= 1, ">= 1"), "lora.alpha": (lambda v: v > 0, "> 0"),
    "lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"), "lora.target_modules": (bool, "a non-empty list"),
    "data.eval_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"), "data.max_seq_len": (lambda v: v >= 8, ">= 8"),
    "data.num_clients": (lambda v: v >= 1, ">= 1"), "data.dirichlet_alpha": (lambda v: v > 0, "> 0"),
    "train.max_steps": (lambda v: v >= 1, ">= 1"), "train.batch_size": (lambda v: v == "auto" or v >= 1, ">= 1 or auto"),
    "train.grad_accum": (lambda v: v >= 1, ">= 1"), "train.lr": (lambda v: v > 0, "> 0"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"), "train.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "train.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"), "train.max_grad_norm": (lambda v: v >= 0, ">= 0"),
    "train.eval_every": (lambda v: v >= 0, ">= 0"), "train.save_every": (lambda v: v >= 0, ">= 0"),
    "train.keep_checkpoints": (lambda v: v >= 1, ">= 1"), "train.log_every": (lambda v: v >= 1, ">= 1"),
    "train.max_bad_steps": (lambda v: v >= 1, ">= 1"),
    "federated.rounds": (lambda v: v >= 1, ">= 1"), "federated.fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "federated.local_steps": (lambda v: v >= 1, ">= 1"), "federated.global_steps": (lambda v: v >= 1, ">= 1"),
    "federated.local_weight_decay": (lambda v: v >= 0, ">= 0"),
    "federated.min_clients": (lambda v: v >= 1, ">= 1"), "federated.server_lr": (lambda v: v > 0, "> 0"),
    "federated.max_new_tokens": (lambda v: v >= 1, ">= 1"),
}


class ConfigError(ValueError):
    pass


def _check_type(key, value, default):
    want = NULLABLE.get(key, type(default))
    if value is None and key in NULLABLE:
        return value
    if key in AUTO and value == "auto":
        return value
    if want is float and type(value) is int:
        return float(value)  # lr=1 means 1.0
    if want is float and type(value) is str:
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if type(value) is not want:
        raise ConfigError(f"{key}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    if want is list and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    return value


def _set(cfg, key, value, where):
    section, _, name = key.partition(".")
    if section not in DEFAULTS or name not in DEFAULTS[section]:
        known = [f"{s}.{k}" for s in DEFAULTS for k in DEFAULTS[s]]
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{where}: unknown key {key}{hint}")
    cfg[section][name] = _check_type(key, value, DEFAULTS[section][name])


def load_config(path, overrides=()):
    """Defaults <- the YAML file <- `section.key=value` overrides (values parsed as YAML scalars), checked."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected sections model/lora/data/train/federated, got {type(raw).__name__}")
    cfg = {s: dict(v) for s, v in DEFAULTS.items()}
    for section, values in raw.items():
        if section not in DEFAULTS or not isinstance(values, dict):
            close = difflib.get_close_matches(str(section), list(DEFAULTS), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{path}: {section!r} is not a section of model/lora/data/train/federated{hint}")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value, path)
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: {text!r} is not a YAML value") from None
        _set(cfg, key.strip(), value, "override")
    for key, options in CHOICES.items():
        section, name = key.split(".")
        if cfg[section][name] not in options:
            raise ConfigError(f"{key}: {cfg[section][name]!r} is not one of {', '.join(options)}")
    for key, (test, what) in RULES.items():
        section, name = key.split(".")
        if not test(cfg[section][name]):
            raise ConfigError(f"{key}: must be {what}, got {cfg[section][name]!r}")
    return cfg


# ----------------------------------------------------------------------------------------------------
# Loss: cross-entropy on response tokens only, in chunks, from the final hidden states


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, labels_i), a chunk of rows at a time, with the gradient computed in
    the forward pass.

    Each chunk's logits live only while that chunk is processed: its softmax minus the one-hot label is
    the gradient of the logits, so grad_hidden = (softmax - onehot) @ weight is taken right there and
    kept ((N, H) in fp32, small next to the logits), and backward only scales it. Compared with
    checkpointing each chunk, that is one lm_head matmul less per chunk (no recompute), for that one
    (N, H) tensor held until backward. (Liger-Kernel's fused linear cross-entropy does the same in
    Triton; this is the plain PyTorch form.)
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        want_h, want_w = ctx.needs_input_grad[:2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for i in range(0, labels.numel(), chunk_size):
            h, y = hidden[i:i + chunk_size], labels[i:i + chunk_size]
            logits = F.linear(h, weight)  # the compute dtype under autocast
            probs = logits.float()
            lse = torch.logsumexp(probs, dim=-1)
            total += (lse - probs.gather(1, y[:, None]).squeeze(1)).sum()
            if want_h or want_w:
                probs.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(len(y), device=y.device), y] -= 1  # d CE / d logits
                g = probs.to(logits.dtype)
                if want_h:
                    grad_h[i:i + chunk_size] = g @ weight
                if want_w:
                    grad_w += g.t() @ h
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if grad_h is None else (grad_h * grad_total).to(h_dtype),
                None if grad_w is None else (grad_w * grad_total).to(w_dtype), None, None)


def loss_sum(model, batch, chunk_elements=None):
    """(sum of next-token cross-entropies over positions with a label, number of such positions).

    The usual `model(**batch).loss` builds (B, T, vocab) fp32 logits: 4.9 GB at B*T = 8k tokens for
    Qwen's 152k vocabulary. Here only the labelled positions (the responses) go through lm_head, in
    chunks of at most chunk_elements logits, with their gradient taken on the spot (LinearCrossEntropy).
    The result equals F.cross_entropy over full logits (tests/test_train.py).

    Default chunk: 2^25 logits (128 MiB in fp32) on a GPU, where bigger chunks keep lm_head's matmuls
    efficient; 2^22 (16 MiB) on a CPU, where the softmax passes over a chunk then run in cache (a
    whole training step measured 4% to 14% faster than with 2^25: bench.py's CPU shape).
    """
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = labels != D.IGNORE_INDEX
    hidden, labels = hidden[:, :-1][keep], labels[keep]  # (N, H), (N,)
    weight = model.get_output_embeddings().weight
    if chunk_elements is None:
        chunk_elements = 2**22 if hidden.device.type == "cpu" else 2**25
    chunk = max(1, chunk_elements // weight.shape[0])
    return LinearCrossEntropy.apply(hidden, weight, labels, chunk), labels.numel()


# ----------------------------------------------------------------------------------------------------
# Optimizer, schedule, precision


def lr_at(step, max_steps, warmup_steps, lr, min_lr_ratio):
    """Linear warmup to lr, then cosine decay to min_lr_ratio * lr at max_steps. A pure function of the
    step, so the schedule's whole state is the step counter."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(params, lr, weight_decay, device):
    """AdamW; the fused kernel on CUDA (one launch for all parameters instead of several per tensor)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def autocast(device, dtype):
    """Mixed precision: matmuls in the compute dtype (bf16/fp16), adapter weights and optimizer in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class NonFiniteLoss(RuntimeError):
    pass


def train_step(model, params, optimizer, scaler, micro_batches, device, dtype, max_grad_norm):
    """One optimizer step over a list of micro-batches (gradient accumulation). Returns (loss, tokens),
    or (None, tokens) when the loss was NaN/inf and the step was skipped."""
    # Normalise by the labelled tokens of the whole step, so accumulating k micro-batches gives the same
    # gradient as one batch k times larger (a mean of per-micro-batch means would weight them wrongly).
    n_tokens = sum(int((mb["labels"][:, 1:] != D.IGNORE_INDEX).sum()) for mb in micro_batches)
    total = 0.0
    for mb in micro_batches:
        mb = {k: v.to(device) for k, v in mb.items()}
        with autocast(device, dtype):
            loss, _ = loss_sum(model, mb)
        loss = loss / max(n_tokens, 1)
        if not torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            return None, n_tokens
        scaler.scale(loss).backward()  # a no-op scaler unless fp16
        total += loss.item()
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total, n_tokens


def batch_stream(examples, batch_size, seed, group_by_length, pad_id, start=0):
    """Endless micro-batches, epoch after epoch, deterministic from the seed; skips the first `start`."""
    lengths = [len(e["input_ids"]) for e in examples]
    epoch, i = 0, 0
    while True:
        for idx in D.batch_indices(lengths, batch_size, seed, epoch, group_by_length):
            if i >= start:
                yield D.collate([examples[j] for j in idx], pad_id)
            i += 1
        epoch += 1


def largest_batch_size(model, examples, pad_id, device, dtype, limit):
    """The largest micro-batch of the longest example, up to `limit`, whose forward and backward fit in
    GPU memory: doubling from 1, then bisection. Room is kept for AdamW's two moments (allocated at the
    first real step). Returns 0 if not even one example fits."""
    params = [p for p in model.parameters() if p.requires_grad]
    longest = [max(examples, key=lambda e: len(e["input_ids"]))]
    reserve = [torch.empty_like(p, dtype=torch.float32) for p in params for _ in range(2)]  # noqa: F841
    was_training = model.training
    model.train()  # transformers checkpoints layers only in training mode

    def fits(n):
        batch = {k: v.to(device) for k, v in D.collate(longest * n, pad_id).items()}
        try:
            with autocast(device, dtype):
                loss, _ = loss_sum(model, batch)
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


def resolve_batch_size(tc, model, examples, pad_id, device, dtype, previous_config=None):
    """train.batch_size, with "auto" resolved: on CUDA the largest micro-batch that fits (probed), on
    other devices 16 (running out of CPU memory kills the process instead of raising). A resumed run
    keeps the size its first part used (from its saved config), so its batches are the same."""
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
    n = largest_batch_size(model, examples, pad_id, device, dtype, limit=min(len(examples), 256))
    if n == 0:
        raise M.ModelError("train.batch_size auto: not even one example of the longest length fits in GPU "
                           "memory; lower data.max_seq_len")
    print(f"train.batch_size auto: {n} (the largest micro-batch of the longest example that fits in GPU memory)")
    return n


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, device, dtype):
    """Mean response-token loss and its perplexity over `examples`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for idx in D.batch_indices([len(e["input_ids"]) for e in examples], batch_size, 0, 0, True):
        batch = {k: v.to(device) for k, v in D.collate([examples[j] for j in idx], pad_id).items()}
        with autocast(device, dtype):
            loss, n = loss_sum(model, batch)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50))}


# ----------------------------------------------------------------------------------------------------
# Checkpoints: <output_dir>/checkpoints/step_NNNNNN/{adapter/, state.pt, config.yaml}, written to a
# temporary directory and renamed, so a directory named step_* is always complete.


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomically(final_dir, write):
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


def save_yaml(obj, path):
    with open(path, "w") as f:
        yaml.safe_dump(obj, f, sort_keys=False)


def save_checkpoint(out_dir, step, model, optimizer, scaler, cfg, base_path, keep):
    ckpt_dir = os.path.join(out_dir, "checkpoints")

    def write(tmp):
        lora.save_adapter(model, os.path.join(tmp, "adapter"), "default", base_path)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "schedule": {"step": step}, "rng": rng_state()}, os.path.join(tmp, "state.pt"))
        save_yaml(cfg, os.path.join(tmp, "config.yaml"))

    write_atomically(os.path.join(ckpt_dir, f"step_{step:06d}"), write)
    keep_latest(ckpt_dir, "step_", keep)


def completed(parent, prefix):
    """Names of the complete checkpoint directories prefix* in parent, oldest first (write_atomically's
    .tmp and .old names are never complete)."""
    names = os.listdir(parent) if os.path.isdir(parent) else []
    return sorted(n for n in names if n.startswith(prefix) and "." not in n)


def keep_latest(parent, prefix, keep):
    for old in completed(parent, prefix)[:-keep]:
        shutil.rmtree(os.path.join(parent, old))


def latest_checkpoint(out_dir):
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    done = completed(ckpt_dir, "step_")
    return os.path.join(ckpt_dir, done[-1]) if done else None


RUN_FILES = ("metrics.jsonl", "checkpoints", "adapter", "config.yaml")


def check_output_dir(out_dir, resume, overwrite, files=RUN_FILES, latest=latest_checkpoint):
    """Refuse to mix two runs in one directory: --resume continues it, train.overwrite=true replaces it.
    Returns the previous run's files, which clear_output_dir removes once everything else checked out."""
    previous = sorted(f for f in (os.listdir(out_dir) if os.path.isdir(out_dir) else []) if f in files
                      or any(f.startswith(p.rstrip("*")) for p in files if p.endswith("*")))
    if resume and latest(out_dir) is None:
        raise ConfigError(f"--resume: {out_dir} holds no complete checkpoint to resume from")
    if previous and not resume and not overwrite:
        raise ConfigError(f"{out_dir} already holds a run ({', '.join(previous)}); pass --resume to continue "
                          "it or train.overwrite=true to replace it")
    return [] if resume else previous


def clear_output_dir(out_dir, previous):
    for f in previous:
        path = os.path.join(out_dir, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(out_dir, exist_ok=True)


# ----------------------------------------------------------------------------------------------------
# Setup shared with federated.py, infer.py and merge.py


def resolve_model_path(cfg):
    """model.name_or_path, with `tiny` built once from the demo data into model.cache_dir."""
    name = cfg["model"]["name_or_path"]
    if name != "tiny":
        return name
    texts = D.demo_texts(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    digest = hashlib.sha1("\0".join(texts).encode()).hexdigest()[:10]  # new demo data, new tokenizer
    return M.build_tiny(os.path.join(cfg["model"]["cache_dir"], f"tiny-{digest}"), texts)


def load_base(cfg, gradient_checkpointing=None):
    """(model, tokenizer, base path, device, compute dtype) as the config asks."""
    mc = cfg["model"]
    device = M.resolve_device(mc["device"])
    dtype = M.resolve_dtype(mc["compute_dtype"], device)
    path = resolve_model_path(cfg)
    ckpt = mc["gradient_checkpointing"] if gradient_checkpointing is None else gradient_checkpointing
    model, tok = M.load_model(path, mc["quantization"], dtype, device, mc["attention"], ckpt)
    return model, tok, path, device, dtype


def load_examples(cfg, tok, train_file=None):
    """Tokenized (train, eval) examples: eval from data.eval_file, else a data.eval_fraction split."""
    dc = cfg["data"]
    records = D.load_records(train_file or dc["train_file"], dc["field_map"] or None)
    if dc["eval_file"]:
        train_recs, eval_recs = records, D.load_records(dc["eval_file"], dc["field_map"] or None)
    else:
        train_recs, eval_recs = D.split_eval(records, dc["eval_fraction"], cfg["train"]["seed"])
    encode = lambda recs, name: D.tokenize_records(tok, recs, dc["max_seq_len"], dc["system_prompt"],  # noqa: E731
                                                   dc["train_on_prompt"], name)
    return encode(train_recs, "train"), encode(eval_recs, "eval")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quiet_libraries():
    """transformers' progress bars and advice are noise in a training log."""
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # bitsandbytes logs at import, on CPUs with AVX512-BF16, that an optional kernels package is missing
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def cli(description, argv, extra=None):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("config", help="YAML config, e.g. config.yaml")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-3")
    if extra:
        extra(ap)
    return ap.parse_intermixed_args(argv)  # overrides may come before or after the options


def fail(message):
    """Bad input ends in one line on stderr and exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Logger:
    """metrics.jsonl (one JSON object per event), plus TensorBoard when it is installed."""

    def __init__(self, out_dir):
        self.file = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        except ImportError:
            self.tb = None

    def log(self, **event):
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in event.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, event.get("step", 0))


# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    args = cli(__doc__.splitlines()[0], argv,
               lambda ap: ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint"))
    try:
        cfg = load_config(args.config, args.overrides)
        tc, lc = cfg["train"], cfg["lora"]
        out_dir = tc["output_dir"]
        previous = check_output_dir(out_dir, args.resume, tc["overwrite"])
        quiet_libraries()
        seed_everything(tc["seed"])
        model, tok, base_path, device, dtype = load_base(cfg)
        train_ex, eval_ex = load_examples(cfg, tok)
        if not train_ex:
            raise D.DataError(f"{cfg['data']['train_file']}: no example fits data.max_seq_len")
        lora.inject(model, lc["target_modules"], "default", lc["r"], lc["alpha"], lc["dropout"],
                    lc["use_dora"], lc["use_rslora"])
        lora.mark_trainable(model, ["default"])
        tc["batch_size"] = resolve_batch_size(tc, model, train_ex, tok.pad_token_id, device, dtype,
                                              os.path.join(out_dir, "config.yaml") if args.resume else None)
    except (ConfigError, D.DataError, M.ModelError, ValueError) as e:
        fail(e)
    clear_output_dir(out_dir, previous)  # only now: a bad input above leaves an earlier run untouched
    save_yaml(cfg, os.path.join(out_dir, "config.yaml"))  # the resolved config, with every default
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tc["lr"], tc["weight_decay"], device)
    # fp16 needs loss scaling (its exponent range is narrow); bf16 and fp32 do not, so the scaler is off
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    logger = Logger(out_dir)
    trainable, total = M.count_parameters(model)
    print(f"model {base_path} on {device} in {str(dtype).replace('torch.', '')}, "
          f"{cfg['model']['quantization']}; adapters: {trainable:,} trainable of {total:,} parameters; "
          f"{len(train_ex)} train / {len(eval_ex)} eval examples")

    step = 0
    if args.resume:
        ckpt = latest_checkpoint(out_dir)
        state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
        lora.load_adapter(model, os.path.join(ckpt, "adapter"), "default")
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step = state["step"]
        logger.log(event="resume", step=step)
        print(f"resumed from {ckpt}")
    elif eval_ex:
        metrics = evaluate(model, eval_ex, tc["batch_size"], tok.pad_token_id, device, dtype)
        logger.log(step=0, **metrics)
        print(f"step 0: eval_loss {metrics['eval_loss']:.4f} (before training)")

    batches = batch_stream(train_ex, tc["batch_size"], tc["seed"], cfg["data"]["group_by_length"],
                           tok.pad_token_id, start=step * tc["grad_accum"])
    from tqdm import tqdm

    bar = tqdm(total=tc["max_steps"], initial=step, dynamic_ncols=True, disable=None)
    model.train()
    bad_steps, t0, tokens_seen = 0, time.time(), 0
    while step < tc["max_steps"]:
        lr = lr_at(step, tc["max_steps"], tc["warmup_steps"], tc["lr"], tc["min_lr_ratio"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [next(batches) for _ in range(tc["grad_accum"])]
        loss, n_tokens = train_step(model, params, optimizer, scaler, micro, device, dtype, tc["max_grad_norm"])
        step += 1
        if loss is None:
            bad_steps += 1
            tqdm.write(f"warning: step {step}: loss is NaN/inf, step skipped", file=sys.stderr)
            logger.log(step=step, event="nonfinite_loss")
            if bad_steps >= tc["max_bad_steps"]:
                last = latest_checkpoint(out_dir)
                fail(f"the loss was NaN/inf for {bad_steps} steps in a row; lower train.lr or check the data"
                     + (f" (the last good checkpoint is {last})" if last else ""))
            continue
        bad_steps, tokens_seen = 0, tokens_seen + n_tokens
        bar.update(1)
        if step % tc["log_every"] == 0 or step == tc["max_steps"]:
            tok_s = tokens_seen / (time.time() - t0)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            logger.log(step=step, loss=loss, lr=lr, tokens_per_s=tok_s)
            if bar.disable:
                print(f"step {step}: loss {loss:.4f} lr {lr:.2e} {tok_s:.0f} tok/s")
            tokens_seen, t0 = 0, time.time()
        if eval_ex and tc["eval_every"] and step % tc["eval_every"] == 0 and step < tc["max_steps"]:
            metrics = evaluate(model, eval_ex, tc["batch_size"], tok.pad_token_id, device, dtype)
            logger.log(step=step, **metrics)
            tqdm.write(f"step {step}: eval_loss {metrics['eval_loss']:.4f}")
        if (tc["save_every"] and step % tc["save_every"] == 0) or step == tc["max_steps"]:
            save_checkpoint(out_dir, step, model, optimizer, scaler, cfg, base_path, tc["keep_checkpoints"])
    bar.close()

    if eval_ex:
        metrics = evaluate(model, eval_ex, tc["batch_size"], tok.pad_token_id, device, dtype)
        logger.log(step=step, **metrics)
        print(f"step {step}: eval_loss {metrics['eval_loss']:.4f} (end of training)")
    write_atomically(os.path.join(out_dir, "adapter"),
                     lambda tmp: lora.save_adapter(model, tmp, "default", base_path))
    print(f"adapter saved to {os.path.join(out_dir, 'adapter')}")


if __name__ == "__main__":
    main()
