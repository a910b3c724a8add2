"""A federated site: its data, its local adapter, and what it does with the global adapter each round.

    client = Client(name, run, cfg, records)                 # run: prepare.prepare()'s model, examples, ...
    upload, n_examples, loss = client.fit(global_state, task)   # only this ever leaves the site
    rows = client.evaluate(global_state)                      # {view: metrics}, views global/local/global+local

The model carries two adapters on one frozen 4-bit base (FedDPA, Yang et al., NeurIPS 2024):

    global: trained by every client, combined by the server (server.py)
    local:  one per client, trained on that client alone; it never leaves the client

How a client trains them is federated.mode: `alternating` (FedDPA-T: the local adapter with the global
one on but frozen, then the global one alone), `joint` (both at once), `global_only` (plain FedAvg-LoRA,
FedIT: no local adapter). What of the global adapter it sends and keeps is federated.aggregation, looked
up once in fedavg.AGGREGATIONS. The serial simulation (federated.py) lends every Client the one model in
memory, in turn; a Flower site (flower_app.py) has one Client and its own model.
"""

import json
import os
from typing import Any

import torch
from torch import nn

import benchmark as B
import checkpoints
import config as C
import data as D
import evaluation
import fedavg
import lora
import prepare
import trainer

VIEWS = {"global": ["global"], "local": ["local"], "global+local": ["global", "local"]}  # view -> active adapters
STACKED = "stacked"  # aggregation stack: the frozen adapter holding the sum of the rounds so far


class Client:
    """One site: its data, its local adapter and that adapter's AdamW state, and the part of the global
    adapter it does not send (`kept`: nothing for fedavg, the frozen A for ffa, its own B for fedsa)."""

    def __init__(
        self,
        name: str,
        run: prepare.Run,
        cfg: C.Config,
        records: prepare.Records,
    ) -> None:
        self.name, self.run, self.model, self.cfg = name, run, run.model, cfg
        self.records, self.examples = records, run.examples[name]  # (train, eval), tokenized by prepare()
        self.agg = fedavg.AGGREGATIONS[cfg["federated"]["aggregation"]]
        self.has_local = cfg["federated"]["mode"] != "global_only"
        self.local = lora.adapter_state_dict(self.model, "local") if self.has_local else None  # the fresh adapter
        self.local_optimizer: dict[str, Any] | None = None
        self.initial = fresh = lora.adapter_state_dict(self.model, "global")  # the same everywhere: same seed
        self.kept = fresh if self.agg.stacks else self.agg.split(fresh)[1]  # stack: the fresh start of each round
        self.fresh = (self.local, self.local_optimizer, self.kept)

    def load(self, received: dict[str, torch.Tensor]) -> list[str]:
        """Load the global adapter from what the server sent and what this client keeps, and the local
        adapter; returns the frozen adapters that go with the global one (stack's sum, once there is one)."""
        frozen = []
        if self.agg.stacks:
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
            self.run,
            self.cfg,
            self.examples[0],
            task["lr"],
            task["seed_data"],
            self.local_optimizer,
            frozen,
            frozen_global=("lora_A.global",) if self.agg.freeze_a else (),
        )
        trained = {k: v.cpu() for k, v in lora.adapter_state_dict(self.model, "global").items()}
        if not all(torch.isfinite(t).all() for t in trained.values()):
            raise FloatingPointError("its global adapter has NaN/inf values")
        upload, kept = (trained, self.kept) if self.agg.stacks else self.agg.split(trained)
        if self.cfg["federated"]["dp_clip"] > 0:  # client-level DP: clipped here, so no server sees more
            upload = fedavg.clip_update(upload, global_state, self.cfg["federated"]["dp_clip"])[0]
        if self.agg.own_rest:  # its own B, trained on
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
            rows[view] = evaluate_client(self.run, self.cfg, self.records[1], self.examples[1], conflicts)
        return rows

    def benchmark(self, global_state: dict[str, torch.Tensor], questions: list[B.Question]) -> dict[str, Any]:
        """benchmark.mmlu's accuracies for the global adapter as this client holds it (with fedsa, its own B)."""
        lora.set_active(self.model, self.load(global_state) + ["global"])
        return B.mmlu(self.model, self.run.tok, questions, self.run.device, self.run.dtype)[0]

    # What a client keeps between rounds, in a folder: round_NNN/clients/<name>/ in the simulation, the
    # site's state-dir/round_NNN/ in a Flower deployment

    def save_state(self, path: str, shared: dict[str, torch.Tensor], base_path: str | None = None) -> None:
        """Write local/ (the local adapter), local_optimizer.pt and, where the client keeps its own part of
        the global adapter (fedsa's B), global/: that part with the `shared` one, a whole adapter."""
        if self.has_local:
            config = lora.adapter_config(self.model, "local", base_path)
            lora.write_adapter(os.path.join(path, "local"), self.local, config)
        if self.local_optimizer is not None:
            torch.save(self.local_optimizer, os.path.join(path, "local_optimizer.pt"))
        if self.agg.own_rest:
            config = lora.adapter_config(self.model, "global", base_path)
            lora.write_adapter(os.path.join(path, "global"), {**shared, **self.kept}, config)

    def load_state(self, path: str | None) -> None:
        """Take back what save_state wrote in `path`; None: the fresh state of round 0."""
        self.local, self.local_optimizer, self.kept = self.fresh
        if path is None:
            return
        if os.path.isdir(os.path.join(path, "local")):
            self.local = lora.read_adapter(os.path.join(path, "local"))[1]
        if os.path.isfile(os.path.join(path, "local_optimizer.pt")):
            self.local_optimizer = checkpoints.load_state(os.path.join(path, "local_optimizer.pt"))
        if os.path.isdir(os.path.join(path, "global")):  # fedsa: its own B
            self.kept = self.agg.split(lora.read_adapter(os.path.join(path, "global"))[1])[1]


# ----------------------------------------------------------------------------------------------------
# Training one client


def client_update(
    run: prepare.Run,
    cfg: C.Config,
    examples: list[D.Example],
    lr: float,
    seed: int,
    local_optimizer: dict[str, Any] | None = None,
    frozen: list[str] = (),
    frozen_global: tuple[str, ...] = (),
) -> tuple[float, dict[str, Any] | None]:
    """Train one client (run.model, its global and local states loaded) as federated.mode says; the adapters
    `frozen` (stack's sum of past rounds) are on wherever the global one is, and never train; nor do the
    global adapter's parameters named in `frozen_global` (ffa: its A).

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
    mode = fc["mode"]
    if mode == "alternating":
        _, local_optimizer = train_adapter(
            run,
            cfg,
            [*frozen, "global", "local"],
            ["local"],
            examples,
            fc["local_steps"],
            lr,
            seed + 1,
            local_optimizer,
            fc["local_weight_decay"],
        )
    active, trainable = {
        "alternating": ([*frozen, "global"], ["global"]),
        "joint": ([*frozen, "global", "local"], ["global", "local"]),
        "global_only": ([*frozen, "global"], ["global"]),
    }[mode]
    loss = train_adapter(
        run, cfg, active, trainable, examples, fc["global_steps"], lr, seed, frozen_params=frozen_global
    )[0]
    return loss, local_optimizer if mode == "alternating" else None


def train_adapter(
    run: prepare.Run,
    cfg: C.Config,
    active: list[str],
    trainable: list[str],
    examples: list[D.Example],
    steps: int,
    lr: float,
    seed: int,
    optimizer_state: dict[str, Any] | None = None,
    weight_decay: float | None = None,
    frozen_params: tuple[str, ...] = (),
) -> tuple[float, dict[str, Any]]:
    """trainer.train_step, `steps` times, on the `trainable` adapters with the `active` ones on.

    A fresh AdamW each call unless optimizer_state (from an earlier call) is given; its weight decay is
    train.weight_decay unless weight_decay is given. Parameters whose names end with one of
    `frozen_params` stay frozen. Returns (mean loss, optimizer state on the CPU).
    """
    model, device, dtype, tc = run.model, run.device, run.dtype, cfg["train"]
    weight_decay = tc["weight_decay"] if weight_decay is None else weight_decay
    lora.set_active(model, active)
    lora.mark_trainable(model, trainable)
    for name, p in model.named_parameters():
        if frozen_params and name.endswith(frozen_params):
            p.requires_grad_(False)
    params = [p for p in lora.adapter_parameters(model, trainable) if p.requires_grad]
    optimizer = trainer.make_optimizer(params, lr, weight_decay, device)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = lr, weight_decay  # this round's, not the saved ones
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batches = trainer.batch_stream(examples, tc["batch_size"], seed, cfg["data"]["group_by_length"], run.collate)
    model.train()
    losses = []
    for _ in range(steps):
        micro = [next(batches) for _ in range(tc["grad_accum"])]
        loss, _, _ = trainer.train_step(model, params, optimizer, scaler, micro, device, dtype, tc["max_grad_norm"])
        if loss is not None:
            losses.append(loss)
    return sum(losses) / len(losses) if losses else float("nan"), to_cpu(optimizer.state_dict())


def to_cpu(obj: Any) -> Any:
    """A copy of a (nested) optimizer state with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------
# Evaluation: eval loss and exact match of greedy generations, for the active adapters


@torch.no_grad()
def evaluate_client(
    run: prepare.Run,
    cfg: C.Config,
    records: list[D.Record],
    examples: list[D.Example],
    conflicts: set[str],
) -> dict[str, float | None]:
    """{eval_loss, exact_match, n, conflict_exact_match, n_conflict} for the active adapters."""
    model, tok, device, dtype = run.model, run.tok, run.device, run.dtype
    metrics = evaluation.evaluate(model, examples, cfg["train"]["batch_size"], run.collate, device, dtype)
    greedy = dict(max_new_tokens=cfg["federated"]["max_new_tokens"], temperature=0.0, top_p=1.0)
    answers = evaluation.predict(model, tok, records, cfg["data"]["system_prompt"], device, dtype, greedy, False)
    hits = [evaluation.exact_match(a, D.reference(r)) for a, r in zip(answers, records, strict=True)]
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


def conflicting_prompts(clients: dict[str, prepare.Records]) -> set[str]:
    """The prompts (prompt_key) that two clients answer differently: one averaged adapter cannot serve
    them all (the demo's "translate" task), so they are reported apart."""
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
# aggregation stack: the frozen sum of past rounds under the fresh adapter


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
