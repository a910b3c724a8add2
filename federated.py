"""Federated fine-tuning with dual adapters, simulated serially on one GPU or CPU.

    python federated.py config.yaml [section.key=value ...] [--resume]

Every client holds private Alpaca-style data. The model carries two LoRA adapters on one frozen 4-bit
base (FedDPA, Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models", NeurIPS 2024):

    global: trained by every client, averaged by the server (FedAvg weighted by sample counts)
    local:  one per client, trained on that client alone; it never leaves the client

Each round the server samples clients; each loads the current global state and its own local state,
trains (federated.mode), and uploads only its global state and its sample count:

    alternating  (FedDPA-T) the local adapter trains with the global one active but frozen,
                 then the global adapter trains alone on the same data
    joint        both adapters train together
    global_only  plain FedAvg-LoRA (FedIT, Zhang et al. 2024), the baseline: no local adapter

After aggregation every client is evaluated on its own eval split with the adapters global, local and
global+local (eval loss, and exact match of greedy generations). Prompts that different clients answer
differently (the demo's "translate" task) are reported apart: one averaged adapter cannot serve them all.

What of the global adapter is sent and how the server combines it is federated.aggregation (fedavg.py
derives each): fedavg averages A and B (approximate: the mean of products is not the product of means);
ffa freezes A at its shared init and averages B; fedsa averages A and leaves each client its own B; stack
concatenates the clients' factors so that the sum of their products is exact, and the clients train a
fresh adapter on top of that frozen stack each round.

With federated.dp_clip > 0 the global adapter is released under client-level differential privacy
(DP-FedAvg): each client clips its update, clients are Poisson-sampled, the server adds Gaussian noise to
an equal-weight mean and reports the epsilon spent (fedavg.py has the formulas; README: "Privacy").
"""

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import config as C
import data as D
import fedavg
import infer
import lora
import loss as L
import model as M
import train

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RUN_FILES = ("metrics.jsonl", "config.yaml", "metrics.png", "round_*")  # what a run writes in its output_dir
VIEWS = {"global": ["global"], "local": ["local"], "global+local": ["global", "local"]}
SHARED = {  # federated.aggregation: the tensors of the global adapter that a client sends (PEFT key endings)
    "fedavg": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    "ffa": ("lora_B.weight", "lora_magnitude_vector"),  # A: the shared random init, frozen, known to all
    "fedsa": ("lora_A.weight",),  # B (and DoRA's magnitude) stay with each client
    "stack": ("lora_A.weight", "lora_B.weight"),  # the clients' fresh adapters, stacked by the server
}
STACKED = "stacked"  # aggregation stack: the frozen adapter holding the sum of the rounds so far


# ----------------------------------------------------------------------------------------------------
# Clients


def load_clients(cfg: C.Config) -> dict[str, tuple[list[D.Record], list[D.Record]]]:
    """{name: (train records, eval records)}: one file per client (data.clients), or train_file split."""
    dc, seed = cfg["data"], cfg["train"]["seed"]
    field_map = dc["field_map"] or None
    if dc["clients"]:
        names = [os.path.splitext(os.path.basename(p))[0] for p in dc["clients"]]
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


def conflicting_prompts(clients: dict[str, tuple[list[D.Record], list[D.Record]]]) -> set[str]:
    """The prompts (prompt_key) that two clients answer differently."""
    answers = {}
    for train_recs, eval_recs in clients.values():
        for r in train_recs + eval_recs:
            answers.setdefault(prompt_key(r), set()).add(D.reference(r))
    return {prompt for prompt, outs in answers.items() if len(outs) > 1}


def prompt_key(record: D.Record) -> str:
    """What a record asks: its instruction and input, or a conversation up to its last answer (as JSON)."""
    asked = record["messages"][:-1] if "messages" in record else [record["instruction"], record["input"]]
    return json.dumps(asked, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------------
# What is shared: federated.aggregation


def split(state: dict[str, torch.Tensor], aggregation: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the tensors a client sends, those it keeps) of a global adapter state, as federated.aggregation says."""
    sent = {k: v for k, v in state.items() if k.endswith(SHARED[aggregation])}
    return sent, {k: v for k, v in state.items() if k not in sent}


def load_stack(model: nn.Module, state: dict[str, torch.Tensor], targets: str | list[str]) -> list[str]:
    """Put stack's sum of past rounds into the model as the adapter "stacked" (scaling 1, the state's
    rank, on the layers `targets` names); returns ["stacked"], or [] (and no such adapter) while the stack
    is empty. Its rank changes every round, so the adapter is rebuilt when the rank differs."""
    if not state:
        lora.remove_adapter(model, STACKED)
        return []
    r = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
    layers = [m for m in model.modules() if isinstance(m, lora.LoRALinear) and STACKED in m.config]
    if not layers or layers[0].config[STACKED]["r"] != r:
        lora.remove_adapter(model, STACKED)
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the global RNG alone
            lora.inject(model, targets, STACKED, r=r, alpha=r)
    lora.load_adapter_state_dict(model, state, STACKED)
    return [STACKED]


def lora_scale(lc: dict[str, Any]) -> float:
    """The LoRA scaling s of the lora section: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return lc["alpha"] / (math.sqrt(lc["r"]) if lc["use_rslora"] else lc["r"])


# ----------------------------------------------------------------------------------------------------
# One client's turn


def to_cpu(obj: Any) -> Any:
    """A copy of a (nested) optimizer state with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    return obj


def train_adapter(
    model: nn.Module,
    active: list[str],
    trainable: list[str],
    examples: list[train.Example],
    steps: int,
    lr: float,
    cfg: C.Config,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    pad_id: int,
    optimizer_state: dict[str, Any] | None = None,
    weight_decay: float | None = None,
) -> tuple[float, dict[str, Any]]:
    """train.py's optimizer step, `steps` times, on the `trainable` adapters with `active` ones on.

    A fresh AdamW each call unless optimizer_state (from an earlier call) is given; its weight decay is
    train.weight_decay unless weight_decay is given. With federated.aggregation ffa the global adapter's A
    stays frozen. Returns (mean loss, optimizer state on the CPU).
    """
    tc = cfg["train"]
    weight_decay = tc["weight_decay"] if weight_decay is None else weight_decay
    lora.set_active(model, active)
    lora.mark_trainable(model, trainable)
    if cfg["federated"]["aggregation"] == "ffa":  # FFA-LoRA: A keeps the init every client shares
        for name, p in model.named_parameters():
            if name.endswith("lora_A.global"):
                p.requires_grad_(False)
    params = [p for p in lora.adapter_parameters(model, trainable) if p.requires_grad]
    optimizer = train.make_optimizer(params, lr, weight_decay, device)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = lr, weight_decay  # this round's, not the saved ones
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    collate = train.collator(cfg, model, pad_id)
    batches = train.batch_stream(examples, tc["batch_size"], seed, cfg["data"]["group_by_length"], collate)
    model.train()
    losses = []
    for _ in range(steps):
        micro = [next(batches) for _ in range(tc["grad_accum"])]
        loss, _, _ = train.train_step(model, params, optimizer, scaler, micro, device, dtype, tc["max_grad_norm"])
        if loss is not None:
            losses.append(loss)
    return sum(losses) / len(losses) if losses else float("nan"), to_cpu(optimizer.state_dict())


def client_update(
    model: nn.Module,
    mode: str,
    examples: list[train.Example],
    lr: float,
    cfg: C.Config,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    pad_id: int,
    local_optimizer: dict[str, Any] | None = None,
    frozen: list[str] = (),
) -> tuple[float, dict[str, Any] | None]:
    """Train one client, whose global and local states are loaded; the adapters `frozen` (stack's sum of
    past rounds) are on wherever the global one is, and never train.

    The global adapter gets a fresh AdamW every round, as in FedAvg: the server replaces its weights, so
    old moments would not fit them. The local adapter is one long training that never leaves the client,
    so its AdamW state stays with it (local_optimizer): a fresh Adam's first steps move every weight by
    about lr whatever its gradient, which would shake a trained local adapter every round.
    The local adapter also gets its own (strong) decoupled weight decay, federated.local_weight_decay:
    wherever the global adapter has learned to answer, the local one gets no gradient and decays to
    zero, so it keeps only what its client does differently. Without it, answers it memorised in the
    first rounds (before the global adapter knew them) stay and override the global adapter on prompts
    this client never saw.
    Returns (mean loss of the last phase, the local adapter's optimizer state or None).
    """
    fc, frozen = cfg["federated"], list(frozen)
    args = (examples, fc["global_steps"], lr, cfg, seed, device, dtype, pad_id)
    if mode == "alternating":
        _, local_optimizer = train_adapter(
            model,
            [*frozen, "global", "local"],
            ["local"],
            examples,
            fc["local_steps"],
            lr,
            cfg,
            seed + 1,
            device,
            dtype,
            pad_id,
            local_optimizer,
            fc["local_weight_decay"],
        )
        return train_adapter(model, [*frozen, "global"], ["global"], *args)[0], local_optimizer
    if mode == "joint":
        return train_adapter(model, [*frozen, "global", "local"], ["global", "local"], *args)[0], None
    return train_adapter(model, [*frozen, "global"], ["global"], *args)[0], None


def is_finite(state: dict[str, torch.Tensor]) -> bool:
    """Whether every tensor of the state dict is free of NaN and inf."""
    return all(torch.isfinite(t).all() for t in state.values())


# ----------------------------------------------------------------------------------------------------
# Evaluation: eval loss and exact match of greedy generations, per client and adapter view


@torch.no_grad()
def evaluate_client(
    model: nn.Module,
    tok: "PreTrainedTokenizerBase",
    records: list[D.Record],
    examples: list[train.Example],
    conflicts: set[str],
    cfg: C.Config,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, float | None]:
    """{eval_loss, exact_match, n, conflict_exact_match, n_conflict} for the active adapters."""
    collate = train.collator(cfg, model, tok.pad_token_id)
    metrics = train.evaluate(model, examples, cfg["train"]["batch_size"], collate, device, dtype)
    greedy = dict(max_new_tokens=cfg["federated"]["max_new_tokens"], temperature=0.0, top_p=1.0)
    answers = infer.predict(model, tok, records, cfg["data"]["system_prompt"], device, dtype, greedy, progress=False)
    hits = [infer.exact_match(a, D.reference(r)) for a, r in zip(answers, records, strict=True)]
    in_conflict = [prompt_key(r) in conflicts for r in records]
    n_conflict = sum(in_conflict)
    return {
        "eval_loss": metrics["eval_loss"],
        "exact_match": sum(hits) / max(len(hits), 1),
        "n": len(hits),
        "conflict_exact_match": sum(h for h, c in zip(hits, in_conflict, strict=True) if c) / n_conflict
        if n_conflict
        else None,
        "n_conflict": n_conflict,
    }


def print_table(rnd: int, rows: dict[str, dict[str, dict[str, float | None]]], views: list[str]) -> None:
    """One line per client: exact match and eval loss for each adapter view."""
    print(f"  {'client':<12}" + "".join(f"{v + ' EM/loss':>24}" for v in views))
    for client, by_view in rows.items():
        print(
            f"  {client:<12}"
            + "".join(f"{by_view[v]['exact_match']:>14.2f} {by_view[v]['eval_loss']:>9.3f}" for v in views)
        )


def plot(out_dir: str, records: list[dict[str, Any]], views: list[str]) -> None:
    """metrics.png: each client's exact match over rounds, one panel per adapter view (if matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(views), figsize=(5 * len(views), 3.5), squeeze=False)
    for ax, view in zip(axes[0], views, strict=True):
        for client in sorted({r["client"] for r in records}):
            pts = [(r["round"], r["exact_match"]) for r in records if r["client"] == client and r["adapters"] == view]
            ax.plot(*zip(*pts, strict=True), marker="o", label=client)
        ax.set(title=view, xlabel="round", ylabel="exact match", ylim=(-0.02, 1.02))
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "metrics.png"), dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# The two roles. A Client lives at a site: only what fit() returns ever leaves it. The Server lives at
# the coordinator: it never sees a data file or a local adapter. The serial simulation (main below) and
# the Flower app (flower_app.py) drive the same two.

Records = list[D.Record]


class Client:
    """One site: its data, its local adapter and that adapter's AdamW state, the part of the global adapter
    it does not send (`kept`: federated.aggregation's; nothing for fedavg), on a model it shares with no one
    (the simulation lends every client the one model in memory, in turn)."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        tok: "PreTrainedTokenizerBase",
        cfg: C.Config,
        records: tuple[Records, Records],
        examples: tuple[list[train.Example], list[train.Example]],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.name, self.model, self.tok, self.cfg = name, model, tok, cfg
        self.records, self.examples, self.device, self.dtype = records, examples, device, dtype
        self.has_local = cfg["federated"]["mode"] != "global_only"
        self.local = lora.adapter_state_dict(model, "local") if self.has_local else None  # the fresh adapter
        self.local_optimizer: dict[str, Any] | None = None
        self.aggregation = cfg["federated"]["aggregation"]
        fresh = lora.adapter_state_dict(model, "global")  # every client's is the same: same seed
        self.kept = fresh if self.aggregation == "stack" else split(fresh, self.aggregation)[1]  # stack: the start

    def load(self, received: dict[str, torch.Tensor]) -> list[str]:
        """Load the global adapter from what the server sent and what this client keeps, and the local
        adapter; returns the frozen adapters that go with the global one (stack's sum, once there is one)."""
        frozen = []
        if self.aggregation == "stack":
            frozen = load_stack(self.model, received, self.cfg["lora"]["target_modules"])
            lora.load_adapter_state_dict(self.model, self.kept, "global")  # a fresh adapter on top, every round
        else:
            lora.load_adapter_state_dict(self.model, {**self.kept, **received}, "global")
        if self.has_local:
            lora.load_adapter_state_dict(self.model, self.local, "local")
        return frozen

    def fit(
        self, global_state: dict[str, torch.Tensor], task: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], int, float]:
        """Train on the server's global state as `task` says (round, lr, seeds); returns (the trained global
        adapter's shared part to upload, the sample count that weights it, the mean training loss). The local
        adapter, its optimizer state and the kept part change only when this returns. Raises whatever
        training raised, and FloatingPointError for an upload with NaN/inf values."""
        frozen = self.load(global_state)
        torch.manual_seed(task["seed_dropout"])  # dropout: reproducible, also on resume
        loss, local_opt = client_update(
            self.model, self.cfg["federated"]["mode"], self.examples[0], task["lr"], self.cfg, task["seed_data"],
            self.device, self.dtype, self.tok.pad_token_id, self.local_optimizer, frozen,
        )  # fmt: skip
        trained = {k: v.cpu() for k, v in lora.adapter_state_dict(self.model, "global").items()}
        if not is_finite(trained):
            raise FloatingPointError("its global adapter has NaN/inf values")
        upload, kept = (trained, self.kept) if self.aggregation == "stack" else split(trained, self.aggregation)
        if self.cfg["federated"]["dp_clip"] > 0:  # client-level DP: clipped here, so no server sees more
            upload = fedavg.clip_update(upload, global_state, self.cfg["federated"]["dp_clip"])[0]
        if self.aggregation == "fedsa":  # its own B, trained on
            self.kept = kept
        if self.has_local:  # the local adapter stays here
            self.local = {k: v.cpu() for k, v in lora.adapter_state_dict(self.model, "local").items()}
            if local_opt is not None:
                self.local_optimizer = local_opt
        return upload, len(self.examples[0]), loss

    def evaluate(
        self, global_state: dict[str, torch.Tensor], conflicts: set[str] = frozenset()
    ) -> dict[str, dict[str, float | None]]:
        """{view: metrics} on this client's eval split for the views global, local and global+local (global
        only without a local adapter); `conflicts` are the prompts other clients answer differently."""
        frozen = self.load(global_state)
        rows = {}
        for view in VIEWS if self.has_local else ["global"]:
            lora.set_active(self.model, frozen + VIEWS[view] if "global" in VIEWS[view] else VIEWS[view])
            rows[view] = evaluate_client(
                self.model, self.tok, self.records[1], self.examples[1], conflicts, self.cfg, self.device, self.dtype
            )
        return rows


def uses_poisson(fc: dict[str, Any]) -> bool:
    """Whether clients are Poisson-sampled: federated.sampling poisson, or auto with DP on."""
    return fc["sampling"] == "poisson" or (fc["sampling"] == "auto" and fc["dp_clip"] > 0)


class Server:
    """The coordinator: samples the clients of a round and tells each what to do (lr, seeds), combines
    what they upload (fedavg.weighted_average then the server optimizer, or fedavg.stack_lora), and holds
    the shared part of the global adapter (`global_state`: what every client receives) and the round
    history. `initial` is the fresh global adapter, the same at every client."""

    def __init__(self, cfg: C.Config, clients: list[str], initial: dict[str, torch.Tensor]) -> None:
        self.cfg, self.clients = cfg, clients
        fc = cfg["federated"]
        self.aggregation = fc["aggregation"]
        shared, rest = split(initial, self.aggregation)
        self.global_state = {} if self.aggregation == "stack" else shared  # stack: nothing stacked yet
        self.fixed = rest if self.aggregation == "ffa" else {}  # ffa's frozen A, written with each round
        self.optimizer = fedavg.ServerOptimizer(fc["server_optimizer"], lr=fc["server_lr"])
        self.history: list[dict[str, Any]] = []
        self.dp, self.poisson = fc["dp_clip"] > 0, uses_poisson(fc)
        self.report: dict[str, Any] = {}  # the last round's aggregation figures, for its record

    def adapter(self, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, adapter_config.json) for round_NNN/global, from the global adapter's `config`: the
        whole adapter (ffa: with its frozen A); fedsa: A alone (each client's B stays with it); stack: the
        stack, a plain LoRA adapter of its own rank with scaling 1 (alpha = r)."""
        if self.aggregation != "stack":
            return {**self.fixed, **self.global_state}, config
        r = next((v.shape[0] for k, v in self.global_state.items() if k.endswith("lora_A.weight")), 0)
        plain = dict(r=r, lora_alpha=r, use_rslora=False, use_dora=False, lora_dropout=0.0)
        return self.global_state, {**config, **plain, "rank_pattern": {}, "alpha_pattern": {}}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Take back the global state from round_NNN/global's tensors (what adapter() wrote)."""
        self.global_state = state if self.aggregation == "stack" else split(state, self.aggregation)[0]

    def tasks(self, rnd: int) -> list[tuple[str, dict[str, Any]]]:
        """(client, task) for each client sampled in round `rnd`. A task carries all that makes the
        client's training reproducible anywhere: the round, its lr and the seeds of data order and dropout."""
        fc, tc = self.cfg["federated"], self.cfg["train"]
        lr = train.lr_at(rnd - 1, fc["rounds"], 0, tc["lr"], tc["min_lr_ratio"])
        if self.poisson:
            sampled = fedavg.poisson_sample(self.clients, rnd, tc["seed"], fc["fraction"])
        else:
            sampled = fedavg.sample_clients(self.clients, rnd, tc["seed"], fraction=fc["fraction"])
        seed = tc["seed"]
        return [
            (
                c,
                {
                    "round": rnd,
                    "lr": lr,
                    "seed_data": seed * 1009 + rnd * 31 + i,
                    "seed_dropout": seed * 1_000_003 + rnd * 1009 + i,
                },
            )
            for i, c in enumerate(sampled)
        ]

    def aggregate(
        self,
        rnd: int,
        sampled: list[str],
        uploads: list[dict[str, torch.Tensor]],
        weights: list[int],
        failed: list[str],
    ) -> bool:
        """The new global adapter from the uploads, weighted by sample counts (FedAvg), through the server
        optimizer; with DP (federated.dp_clip > 0) their equal-weight mean plus noise (fedavg.dp_mean)
        instead; with aggregation stack, the stack with the uploads appended (fedavg.stack_lora). With
        fewer than federated.min_clients uploads it stays as it was. Returns whether it changed hands (the
        round's status). Sets `report`: bytes per upload and per download, and where the uploads hold
        both factors, how far FedAvg of them is from the exact mean of their products (fedavg_error)."""
        fc = self.cfg["federated"]
        ok = len(uploads) >= fc["min_clients"]
        self.report = {
            "bytes_per_upload": fedavg.state_bytes(uploads[0]) if uploads else None,
            "bytes_per_download": fedavg.state_bytes(self.global_state),
        }
        errors = fedavg.fedavg_error(uploads, [1] * len(uploads) if self.dp else weights) if uploads else {}
        if errors:  # 6 digits: the last bits of float64 BLAS sums may differ run to run, a resumed run's too
            self.report["fedavg_error_mean"] = float(f"{sum(errors.values()) / len(errors):.6g}")
            self.report["fedavg_error_max"] = float(f"{max(errors.values()):.6g}")
        if ok and self.aggregation == "stack":
            self.global_state = fedavg.stack_lora(self.global_state, uploads, weights, lora_scale(self.cfg["lora"]))
        elif ok and self.dp:  # equal weights over the expected count: see fedavg.dp_mean (sample counts unused)
            noise = torch.Generator().manual_seed(self.cfg["train"]["seed"] * 1_000_033 + rnd)  # same on resume
            m = fc["fraction"] * len(self.clients)
            average = fedavg.dp_mean(self.global_state, uploads, fc["dp_clip"], fc["dp_noise"], m, noise)
            self.global_state = self.optimizer.step(self.global_state, average)
        elif ok:
            self.global_state = self.optimizer.step(self.global_state, fedavg.weighted_average(uploads, weights))
        self.history.append({"round": rnd, "sampled": sampled, "failed": failed})
        return ok

    def epsilon(self, rounds: int) -> float | None:
        """The client-level privacy spent by `rounds` rounds, at federated.dp_delta; None without DP noise."""
        fc = self.cfg["federated"]
        if not self.dp or fc["dp_noise"] == 0:
            return None
        return fedavg.dp_epsilon(fc["fraction"], fc["dp_noise"], rounds, fc["dp_delta"])

    def over_budget(self, rnd: int) -> str | None:
        """Why round `rnd` must not run (it would take epsilon past federated.dp_max_epsilon), or None."""
        limit = self.cfg["federated"]["dp_max_epsilon"]
        eps = None if limit is None else self.epsilon(rnd)  # no accounting to do without a limit
        if eps is None or eps <= limit:
            return None
        return f"stopped before round {rnd}: epsilon would reach {eps:.3g} > federated.dp_max_epsilon={limit:g}"


def round_summary(
    rnd: int,
    tasks: list[tuple[str, dict[str, Any]]],
    uploads: list[dict[str, torch.Tensor]],
    losses: list[float],
    failed: list[str],
    ok: bool,
    t0: float,
    t_train: float,
    epsilon: float | None = None,
    aggregation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The round's record for metrics.jsonl (report_round adds each view's means); `epsilon`, with DP noise:
    the privacy spent so far; `aggregation`: the server's report of the round (Server.aggregate)."""
    dp = {} if epsilon is None else {"epsilon": epsilon}
    return {
        "round": rnd,
        "clients": [c for c, _ in tasks],
        "succeeded": len(uploads),
        "failed": failed,
        "status": "ok" if ok else "failed" if tasks else "empty",
        "uploaded_bytes": sum(fedavg.state_bytes(u) for u in uploads),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "lr": tasks[0][1]["lr"] if tasks else None,
        "seconds": round(time.time() - t0, 2),
        "seconds_train": round(t_train, 2),
        **(aggregation or {}),
        **dp,
    }


def report_round(
    logger: C.Logger,
    rnd: int,
    rounds: int,
    views: list[str],
    rows: dict[str, dict[str, dict[str, float | None]]],
    summary: dict[str, Any],
    t_train: float,
) -> None:
    """Log and print one round: a line per client and view (of the clients evaluated), and the round's
    summary with each view's mean over them."""
    for client, by_view in rows.items():
        for view, m in by_view.items():
            logger.log(round=rnd, client=client, adapters=view, **m)
    for view in views:
        ems = [r[view]["exact_match"] for r in rows.values()]
        summary[f"exact_match_{view}"] = sum(ems) / len(ems) if ems else None
        conflict = [r[view]["conflict_exact_match"] for r in rows.values() if r[view]["n_conflict"]]
        summary[f"conflict_exact_match_{view}"] = sum(conflict) / len(conflict) if conflict else None
    logger.log(**summary)
    n_ok, n = summary["succeeded"], len(summary["clients"])
    status = {
        "ok": "",
        "failed": f"  FAILED: {n_ok} < federated.min_clients; global adapter unchanged",
        "empty": "  no client sampled; global adapter unchanged",
    }[summary["status"]]
    dp = f", epsilon {summary['epsilon']:.3g}" if "epsilon" in summary else ""
    if "fedavg_error_mean" in summary:
        dp += f", FedAvg error {summary['fedavg_error_mean']:.3g} (max {summary['fedavg_error_max']:.3g})"
    print(
        f"round {rnd}/{rounds}: {n_ok}/{n} clients, uploaded "
        f"{summary['uploaded_bytes'] / 2**20:.2f} MiB, train loss {summary['train_loss'] or math.nan:.3f}{dp}, "
        f"{summary['seconds']:.1f}s ({t_train:.1f}s training){status}"
    )
    print_table(rnd, rows, views)
    if "conflict_exact_match_global+local" in summary and summary["conflict_exact_match_global+local"] is not None:
        print(
            f"  conflicting prompts, exact match: global {summary['conflict_exact_match_global']:.2f}, "
            f"global+local {summary['conflict_exact_match_global+local']:.2f}"
        )


# ----------------------------------------------------------------------------------------------------
# Checkpoints: <output_dir>/round_NNN/{global/, clients/<name>/local/, server.pt}, written atomically


def save_round(
    out_dir: str,
    rnd: int,
    model: nn.Module,
    server: Server,
    local_states: dict[str, dict[str, torch.Tensor]],
    local_optimizers: dict[str, dict[str, Any]],
    kept: dict[str, dict[str, torch.Tensor]],
    cfg: C.Config,
    base_path: str,
    keep: int,
) -> None:
    """Write round_NNN (global adapter, local adapters and optimizers, server.pt, config; with aggregation
    fedsa each client's own global adapter, its B with the shared A, in clients/<name>/global); keep the
    latest `keep`."""

    def write(tmp: str) -> None:
        config = lora.adapter_config(model, "global", base_path)
        lora.write_adapter(os.path.join(tmp, "global"), *server.adapter(config))
        for client, state in kept.items():
            lora.write_adapter(os.path.join(tmp, "clients", client, "global"), {**server.global_state, **state}, config)
        for client, state in local_states.items():
            lora.load_adapter_state_dict(model, state, "local")
            lora.save_adapter(model, os.path.join(tmp, "clients", client, "local"), "local", base_path)
            if client in local_optimizers:
                torch.save(local_optimizers[client], os.path.join(tmp, "clients", client, "local_optimizer.pt"))
        torch.save(
            {"round": rnd, "server_optimizer": server.optimizer.state_dict(), "history": server.history,
             "rng": train.rng_state()},
            os.path.join(tmp, "server.pt"),
        )  # fmt: skip
        C.save_yaml(cfg, os.path.join(tmp, "config.yaml"))

    train.write_atomically(os.path.join(out_dir, f"round_{rnd:03d}"), write)
    train.keep_latest(out_dir, "round_", keep)


def completed_rounds(out_dir: str) -> list[str]:
    """Names of the complete round_* directories in out_dir, oldest first."""
    return train.completed(out_dir, "round_")


def latest_round(out_dir: str) -> str | None:
    """The newest complete round_* directory in out_dir, or None."""
    done = completed_rounds(out_dir)
    return os.path.join(out_dir, done[-1]) if done else None


def load_round(path: str, server: Server, sites: dict[str, Client]) -> int:
    """Give the server and the clients back what save_round wrote in `path`; returns its round."""
    state = torch.load(os.path.join(path, "server.pt"), weights_only=False)
    server.restore(lora.read_adapter(os.path.join(path, "global"))[1])
    server.optimizer.load_state_dict(state["server_optimizer"])
    server.history = state["history"]
    for name, client in sites.items():
        client_dir = os.path.join(path, "clients", name)
        if os.path.isdir(os.path.join(client_dir, "local")):
            client.local = lora.read_adapter(os.path.join(client_dir, "local"))[1]
        if os.path.isfile(os.path.join(client_dir, "local_optimizer.pt")):
            client.local_optimizer = torch.load(os.path.join(client_dir, "local_optimizer.pt"), weights_only=False)
        if os.path.isdir(os.path.join(client_dir, "global")):  # fedsa: its own B
            client.kept = split(lora.read_adapter(os.path.join(client_dir, "global"))[1], client.aggregation)[1]
    train.set_rng_state(state["rng"])
    return state["round"]


# ----------------------------------------------------------------------------------------------------


def check_sampling(cfg: C.Config, n_clients: int) -> None:
    """The sampling and DP settings, for n_clients clients (ConfigError naming the key if bad); warns when
    federated.dp_delta is not well below 1 / n_clients. The simulation and the ServerApp both call it."""
    fc = cfg["federated"]
    dp, poisson = fc["dp_clip"] > 0, uses_poisson(fc)
    check_aggregation(cfg)
    per_round = n_clients if poisson else max(1, round(fc["fraction"] * n_clients))
    if fc["min_clients"] > per_round:
        raise C.ConfigError(
            f"federated.min_clients: {fc['min_clients']} is more than the {per_round} clients "
            + (f"poisson sampling can pick (of {n_clients})" if poisson else
               f"sampled per round (federated.fraction={fc['fraction']} of {n_clients})")
        )  # fmt: skip
    if fc["dp_noise"] > 0 and not dp:
        raise C.ConfigError("federated.dp_noise: noise needs federated.dp_clip > 0 (the bound it is scaled to)")
    if dp and fc["sampling"] == "fixed":
        raise C.ConfigError("federated.sampling: DP needs poisson (or auto): the privacy accountant assumes it")
    if fc["dp_max_epsilon"] is not None and fc["dp_noise"] == 0:
        raise C.ConfigError(
            "federated.dp_max_epsilon: needs federated.dp_noise > 0 (without noise epsilon is unbounded)"
        )
    if dp and fc["dp_noise"] > 0:
        try:
            fedavg.dp_epsilon(fc["fraction"], fc["dp_noise"], 1, fc["dp_delta"])
        except ImportError as e:
            raise C.ConfigError(f"federated.dp_noise: {e}") from None
        if fc["dp_delta"] > 0.1 / n_clients:
            print(f"warning: federated.dp_delta={fc['dp_delta']:g} is not well below 1 / {n_clients} clients: "
                  "a guarantee that may fail for one client in ten", file=sys.stderr)  # fmt: skip
    if dp and fc["dp_noise"] == 0:
        print("warning: federated.dp_clip without federated.dp_noise clips updates but gives no privacy guarantee",
              file=sys.stderr)  # fmt: skip


def check_aggregation(cfg: C.Config) -> None:
    """Refuse, naming federated.aggregation, the combinations stack cannot run (ConfigError)."""
    fc = cfg["federated"]
    if fc["aggregation"] != "stack":
        return
    if fc["server_optimizer"] != "fedavg" or fc["server_lr"] != 1:
        raise C.ConfigError(
            "federated.aggregation: stack adds the clients' products to the stack as they are; it takes no "
            "server optimizer (use federated.server_optimizer=fedavg and federated.server_lr=1)"
        )
    if fc["dp_clip"] > 0:
        raise C.ConfigError(
            "federated.aggregation: stack publishes each client's factors side by side, where noise added to a "
            "sum cannot hide one client; for DP use fedavg, ffa or fedsa"
        )
    if cfg["lora"]["use_dora"]:
        raise C.ConfigError(
            "federated.aggregation: stack needs LoRA (lora.use_dora=false): DoRA's row norm is no sum of products"
        )


def check(cfg: C.Config, clients: dict[str, tuple[list[D.Record], list[D.Record]]]) -> None:
    """The federated settings that depend on the clients."""
    check_sampling(cfg, len(clients))
    for name, (_, eval_recs) in clients.items():
        if not eval_recs:
            raise C.ConfigError(f"client {name}: no eval records (raise data.eval_fraction)")


def main(argv: Sequence[str] | None = None) -> None:
    """The whole federated run: check the config, load the clients and the base, then train round by round."""
    args = C.cli(
        __doc__.splitlines()[0],
        argv,
        lambda ap: ap.add_argument("--resume", action="store_true", help="continue from the last complete round"),
    )
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # N copies would each run every client into one output_dir
        C.fail("federated.py runs its clients one after another in one process; run it with python, not torchrun")
    try:
        cfg = C.load_config(args.config, args.overrides)
        fc, lc, seed = cfg["federated"], cfg["lora"], cfg["train"]["seed"]
        out_dir, mode = fc["output_dir"], fc["mode"]
        previous = train.check_output_dir(
            out_dir,
            args.resume,
            cfg["train"]["overwrite"],
            files=RUN_FILES,
            latest=latest_round,
        )
        clients = load_clients(cfg)
        check(cfg, clients)
        C.quiet_libraries()
        train.seed_everything(seed)
        model, tok, base_path, device, dtype = C.load_base(cfg)
        examples = {}
        for name, (train_recs, eval_recs) in clients.items():
            examples[name] = (train.tokenize(cfg, tok, train_recs, f"{name} train"),
                              train.tokenize(cfg, tok, eval_recs, f"{name} eval"))  # fmt: skip
            if not examples[name][0]:
                raise D.DataError(f"client {name}: no training example fits data.max_seq_len")
        names = ["global"] + ([] if mode == "global_only" else ["local"])
        train.add_adapters(model, lc, names)  # all trainable: the most a client ever trains at once (joint mode)
        everyone = [e for train_ex, _ in examples.values() for e in train_ex]
        L.check_loss(model, everyone[0]["input_ids"][-64:], everyone[0]["labels"][-64:], dtype)
        if cfg["data"]["packing"]:
            train.check_packing(model, everyone[0], device, dtype)
        cfg["train"]["batch_size"] = train.resolve_batch_size(
            cfg["train"],
            model,
            everyone,
            train.collator(cfg, model, tok.pad_token_id),
            device,
            dtype,
            os.path.join(out_dir, "config.yaml") if args.resume else None,
        )
        fedavg.ServerOptimizer(fc["server_optimizer"], lr=fc["server_lr"])  # its settings checked before any work
    except (C.ConfigError, D.DataError, M.ModelError, ValueError) as e:
        C.fail(e)
    train.clear_output_dir(out_dir, previous)
    C.save_yaml(cfg, os.path.join(out_dir, "config.yaml"))
    views = ["global"] if mode == "global_only" else list(VIEWS)
    conflicts = conflicting_prompts(clients)
    sites = {c: Client(c, model, tok, cfg, clients[c], examples[c], device, dtype) for c in clients}
    server = Server(cfg, list(clients), lora.adapter_state_dict(model, "global"))
    start = 1
    if args.resume:
        last = latest_round(out_dir)
        start = load_round(last, server, sites) + 1
        print(f"resumed after {os.path.basename(last)}")
    logger = C.Logger(out_dir)
    print(
        f"{len(clients)} clients ({', '.join(clients)}), mode {mode}, aggregation {fc['aggregation']}, "
        f"{fc['rounds']} rounds; "
        f"{len(conflicts)} conflicting prompts; model {base_path} on {device} in {str(dtype).replace('torch.', '')}"
    )

    t_start = time.time()
    for rnd in range(start, fc["rounds"] + 1):
        if stop := server.over_budget(rnd):
            print(stop)
            break
        t0 = time.time()
        tasks = server.tasks(rnd)
        uploads, weights, losses, failed = [], [], [], []
        for client, task in tasks:  # in Flower, each of these runs at its own site, in parallel
            try:
                upload, n, loss = sites[client].fit(server.global_state, task)
            except Exception as e:  # a failing client must not take the federation down with it
                print(f"  client {client} failed in round {rnd}: {type(e).__name__}: {e}; left out of the average")
                failed.append(client)
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            uploads.append(upload)
            weights.append(n)  # FedAvg weights: sample counts
            losses.append(loss)
        sampled = [c for c, _ in tasks]
        ok = server.aggregate(rnd, sampled, uploads, weights, failed)
        t_train = time.time() - t0
        rows = {c: site.evaluate(server.global_state, conflicts) for c, site in sites.items()}
        summary = round_summary(
            rnd, tasks, uploads, losses, failed, ok, t0, t_train, server.epsilon(rnd), server.report
        )
        report_round(logger, rnd, fc["rounds"], views, rows, summary, t_train)
        local_states = {c: site.local for c, site in sites.items() if site.local is not None}
        local_optimizers = {c: site.local_optimizer for c, site in sites.items() if site.local_optimizer is not None}
        kept = {c: site.kept for c, site in sites.items()} if fc["aggregation"] == "fedsa" else {}
        save_round(
            out_dir, rnd, model, server, local_states, local_optimizers, kept, cfg, base_path,
            cfg["train"]["keep_checkpoints"],
        )  # fmt: skip
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            plot(out_dir, [r for r in map(json.loads, f) if "client" in r], views)
    print(f"done in {time.time() - t_start:.0f}s; checkpoints in {out_dir}")


if __name__ == "__main__":
    main()
