"""Setting up a run, written once: seed, base model, tokenized data, adapters, checks, batch size.

    records = {"": train_records(cfg)}                       # train.py: one data set
    records = client_records(cfg)                            # federated.py: {client: (train, eval)}
    records = {name: site_records(cfg, path)}                # flower_app.py: this site's file
    run = prepare(cfg, records, adapters=["default"])        # run.model, run.examples[name], run.batch_size

train.py, the simulation's clients (federated.py) and a Flower site (flower_app.py) all start here, so a
site builds exactly the model, adapters and examples that the simulation builds for the same client: same
seed, same base, adapters injected in the same order, the same checks. Reading the config is this
module's job (with config.py); everything below it takes plain arguments.
"""

import os
import random
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

import config as C
import data as D
import lora
import loss as L
import trainer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Records = tuple[list[D.Record], list[D.Record]]  # (train, eval) records of one data set


@dataclass
class Run:
    """What prepare() sets up: the base with its adapters, and each data set's tokenized examples."""

    model: nn.Module
    tok: "PreTrainedTokenizerBase"
    base_path: str
    device: torch.device
    dtype: torch.dtype
    examples: dict[str, tuple[list[D.Example], list[D.Example]]]  # name -> (train, eval)
    collate: Callable[[list[D.Example]], D.Batch]
    batch_size: int


def prepare(
    cfg: C.Config, datasets: dict[str, Records], adapters: list[str], previous_config: str | None = None
) -> Run:
    """Seed every generator, load the base (config.load_base), tokenize each data set, inject `adapters`
    (all trainable), check the loss and, with data.packing, the model's masking of packed rows, and
    resolve train.batch_size (`auto`; previous_config: a resumed run's saved config, whose size it keeps).

    Raises:
        D.DataError: a data set with no training example that fits data.max_seq_len, or a bad record.
        M.ModelError, C.ConfigError: the base cannot load or run as configured.
    """
    tc, dc = cfg["train"], cfg["data"]
    seed_everything(tc["seed"])
    model, tok, base_path, device, dtype = C.load_base(cfg)
    examples = {}
    for name, (train_recs, eval_recs) in datasets.items():
        prefix = f"{name} " if name else ""
        train_ex = tokenize(cfg, tok, train_recs, f"{prefix}train")
        examples[name] = (train_ex, tokenize(cfg, tok, eval_recs, f"{prefix}eval"))
        if not examples[name][0]:
            where = f"client {name}" if name else dc["train_file"]
            raise D.DataError(f"{where}: no training example fits data.max_seq_len")
    add_adapters(model, cfg["lora"], adapters)
    everyone = [e for train_ex, _ in examples.values() for e in train_ex]
    L.check_loss(model, everyone[0]["input_ids"][-64:], everyone[0]["labels"][-64:], dtype)
    if dc["packing"]:
        trainer.check_packing(model, everyone[0], device, dtype)
    collate = trainer.collator(model, tok.pad_token_id, dc["packing"], dc["max_seq_len"])
    batch_size = trainer.resolve_batch_size(tc["batch_size"], model, everyone, collate, device, dtype, previous_config)
    return Run(model, tok, base_path, device, dtype, examples, collate, batch_size)


def fresh_adapter(cfg: C.Config, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(the fresh adapter `name` on the CPU, its adapter_config.json) exactly as prepare() gives every
    client the first of its adapters (same seed, base, injection), from the config alone: the Flower
    coordinator's starting point, which it checks each site's against. Loads the base and lets it go."""
    seed_everything(cfg["train"]["seed"])
    model, _, base_path, _, _ = C.load_base(cfg, gradient_checkpointing=False)
    add_adapters(model, cfg["lora"], [name])
    state = {k: v.cpu() for k, v in lora.adapter_state_dict(model, name).items()}
    return state, lora.adapter_config(model, name, base_path)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# The records: one data set, the simulation's clients, one Flower site


def train_records(cfg: C.Config) -> Records:
    """(train, eval) records: eval from data.eval_file, else a data.eval_fraction split of the train file."""
    dc = cfg["data"]
    records = D.load_records(dc["train_file"], dc["field_map"] or None)
    if dc["eval_file"]:
        return records, D.load_records(dc["eval_file"], dc["field_map"] or None)
    return D.split_eval(records, dc["eval_fraction"], cfg["train"]["seed"])


def client_names(paths: list[str]) -> list[str]:
    """A client's name is its file's name without the extension: data/clients/fr.json -> fr."""
    return [os.path.splitext(os.path.basename(p))[0] for p in paths]


def client_records(cfg: C.Config) -> dict[str, Records]:
    """{name: (train, eval)}: one file per client (data.clients), or data.train_file partitioned into
    data.num_clients (data.partition); each client's eval is a data.eval_fraction split of its records."""
    dc, seed = cfg["data"], cfg["train"]["seed"]
    field_map = dc["field_map"] or None
    if dc["clients"]:
        names = client_names(dc["clients"])
        if len(set(names)) < len(names):
            raise D.DataError(f"data.clients: two files share a name ({', '.join(names)}); names identify clients")
        parts = [D.load_records(p, field_map) for p in dc["clients"]]
    else:
        records = D.load_records(dc["train_file"], field_map)
        parts = D.partition(
            records, dc["num_clients"], dc["partition"], dc["dirichlet_alpha"], seed, dc["partition_key"]
        )
        names = [f"client_{i}" for i in range(len(parts))]
    return {name: D.split_eval(recs, dc["eval_fraction"], seed) for name, recs in zip(names, parts, strict=True)}


def site_records(cfg: C.Config, path: str) -> Records:
    """(train, eval) of one Flower site's file, split as the simulation splits each client's."""
    dc = cfg["data"]
    return D.split_eval(D.load_records(path, dc["field_map"] or None), dc["eval_fraction"], cfg["train"]["seed"])


# ----------------------------------------------------------------------------------------------------
# Tokens and adapters


def tokenize(cfg: C.Config, tok: "PreTrainedTokenizerBase", records: list[D.Record], name: str) -> list[D.Example]:
    """The records' examples as the data section says (max_seq_len, system_prompt, train_on)."""
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
