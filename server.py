"""The coordinator of a federation: it samples the clients, combines what they upload, and keeps the
global adapter and the record of every round. It never sees a data file or a local adapter.

    server = Server(cfg, client_names, fresh_global_adapter, declared_examples)
    for rnd in range(1, rounds + 1):
        tasks = server.tasks(rnd)                              # [(client, {round, lr, seeds})]
        ...each client: replies[client] = client.fit(server.global_state, task)  # (upload, n, loss)...
        server.aggregate(rnd, sampled, replies, failed)        # checks every reply, then combines
        save_round(out_dir, rnd, server, adapter_config, cfg)

The serial simulation (federated.py) and the Flower ServerApp (flower_app.py) drive this same Server; the
combining itself (FedAvg, the server optimizers, DP's noise, the stack) is fedavg.py's. Also here: each
round's record and printout, the round checkpoints round_NNN/, and the checks of the federated settings.

The server trusts no reply: a site's upload, sample count and metrics are checked (Server.check,
check_upload, check_metrics) before anything is averaged, and one that fails is left out of the round,
its reason recorded, exactly as if that site had not answered.
"""

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import checkpoints
import config as C
import fedavg
import lora
import trainer

RUN_FILES = ("metrics.jsonl", "config.yaml", "metrics.png", "round_*")  # what a federated run writes in output_dir
Reply = tuple[Any, Any, Any]  # a site's training reply as it came: (upload, sample count, train loss), unchecked
METRICS = ("eval_loss", "exact_match", "n")  # what an evaluation reply holds for each view


def lora_scale(lc: dict[str, Any]) -> float:
    """The LoRA scaling s of the lora section: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return lc["alpha"] / (math.sqrt(lc["r"]) if lc["use_rslora"] else lc["r"])


def uses_poisson(fc: dict[str, Any]) -> bool:
    """Whether clients are Poisson-sampled: federated.sampling poisson, or auto with DP on."""
    return fc["sampling"] == "poisson" or (fc["sampling"] == "auto" and fc["dp_clip"] > 0)


class Server:
    """The coordinator: samples the clients of a round and tells each what to do (lr, seeds), combines
    what they upload (fedavg.weighted_average then the server optimizer, or fedavg.stack_lora), and holds
    the shared part of the global adapter (`global_state`: what every client receives) and the round
    history. `initial` is the fresh global adapter, the same at every client; `declared`, each client's
    number of training examples as it declared when it joined (no reply may claim more)."""

    def __init__(
        self,
        cfg: C.Config,
        clients: list[str],
        initial: dict[str, torch.Tensor],
        declared: dict[str, int] | None = None,
    ) -> None:
        self.cfg, self.clients, self.declared = cfg, clients, declared or {}
        fc = cfg["federated"]
        self.agg = fedavg.AGGREGATIONS[fc["aggregation"]]
        shared, rest = self.agg.split(initial)
        self.global_state = {} if self.agg.stacks else shared  # stack: nothing stacked yet
        self.expected = initial if self.agg.stacks else shared  # what every upload looks like
        self.fresh = initial  # stack: where each client's adapter starts every round
        self.fixed = rest if self.agg.freeze_a else {}  # ffa's frozen A, written with each round
        self.optimizer = fedavg.ServerOptimizer(fc["server_optimizer"], lr=fc["server_lr"])
        self.history: list[dict[str, Any]] = []
        self.dp, self.poisson = fc["dp_clip"] > 0, uses_poisson(fc)
        self.report: dict[str, Any] = {}  # the last round's aggregation figures, for its record

    def join(self, client: str, declared: int) -> None:
        """Add a client that joined after the start (a Flower run with no list of sites), with the number
        of training examples it declared; it is sampled from the next tasks() on."""
        self.clients.append(client)
        self.declared[client] = declared

    def adapter(self, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, adapter_config.json) for round_NNN/global, from the global adapter's `config`: the
        whole adapter (ffa: with its frozen A); fedsa: A alone (each client's B stays with it); stack: the
        stack, a plain LoRA adapter of its own rank with scaling 1 (alpha = r)."""
        if not self.agg.stacks:
            return {**self.fixed, **self.global_state}, config
        r = next((v.shape[0] for k, v in self.global_state.items() if k.endswith("lora_A.weight")), 0)
        plain = dict(r=r, lora_alpha=r, use_rslora=False, use_dora=False, lora_dropout=0.0)
        return self.global_state, {**config, **plain, "rank_pattern": {}, "alpha_pattern": {}}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Take back the global state from round_NNN/global's tensors (what adapter() wrote)."""
        self.global_state = state if self.agg.stacks else self.agg.split(state)[0]

    def tasks(self, rnd: int) -> list[tuple[str, dict[str, Any]]]:
        """(client, task) for each client sampled in round `rnd`. A task carries all that makes the
        client's training reproducible anywhere: the round, its lr and the seeds of data order and dropout."""
        fc, tc = self.cfg["federated"], self.cfg["train"]
        lr = trainer.lr_at(rnd - 1, fc["rounds"], 0, tc["lr"], tc["min_lr_ratio"])
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

    def check(self, client: str, upload: Any, n: Any, loss: Any) -> tuple[str | None, float | None]:
        """(why this training reply must be left out, or None; the norm of its update, where it has one).
        Refused: an upload that check_upload refuses; a sample count that is not a positive integer or is
        more than the client declared when it joined; a loss that is not a number; an update (upload minus
        the global state the client received) longer than federated.max_update_norm, or with DP than
        federated.dp_clip (the client clips it; one that did not would escape the noise)."""
        if why := check_upload(upload, self.expected):
            return why, None
        if type(n) is not int or n < 1:
            return f"sample count {n!r} is not a positive integer", None
        if n > self.declared.get(client, n):
            return f"claims {n} training examples, but declared {self.declared[client]} when it joined", None
        if type(loss) not in (int, float):
            return f"train loss {loss!r} is not a number", None
        norm = fedavg.update_norm(upload, self.fresh if self.agg.stacks else self.global_state)
        fc = self.cfg["federated"]
        if self.dp and norm > fc["dp_clip"] * (1 + 1e-5):  # float slack: a clipped update may land a hair over
            return f"update norm {norm:.4g} > federated.dp_clip={fc['dp_clip']:g}: not clipped", norm
        if fc["max_update_norm"] and norm > fc["max_update_norm"]:
            return f"update norm {norm:.4g} > federated.max_update_norm={fc['max_update_norm']:g}", norm
        return None, norm

    def aggregate(
        self,
        rnd: int,
        sampled: list[str],
        replies: dict[str, Reply],
        failed: list[str],
        malformed: dict[str, str] | None = None,
    ) -> bool:
        """Check every reply (check; `malformed`: replies the driver could not even read, client: reason),
        then the new global adapter from those accepted: their uploads'
        average, weighted by sample counts (federated.weighting examples) or equally (uniform), through the
        server optimizer; with DP (federated.dp_clip > 0) their equal-weight mean plus noise (fedavg.dp_mean)
        instead; with aggregation stack, the stack with the uploads appended (fedavg.stack_lora). With
        fewer than federated.min_clients accepted it stays as it was. Returns whether it changed hands (the
        round's status). Sets `report`: what was accepted, rejected (client: reason) and each update's
        norm, bytes per upload and per download, the training traffic of the run so far (the global adapter
        to each sampled client, the accepted uploads back: communication_bytes), and where the uploads
        hold both factors, how far FedAvg of them is from the exact mean of their products (fedavg_error)."""
        fc = self.cfg["federated"]
        checked = {c: self.check(c, *reply) for c, reply in replies.items()}
        rejected = {**(malformed or {}), **{c: why for c, (why, _) in checked.items() if why}}
        accepted = [reply for c, reply in replies.items() if c not in rejected]
        uploads = [upload for upload, _, _ in accepted]
        weights = [n if fc["weighting"] == "examples" else 1 for _, n, _ in accepted]
        losses = [loss for _, _, loss in accepted if math.isfinite(loss)]
        ok = len(uploads) >= fc["min_clients"]
        self.report = {
            "succeeded": len(uploads),
            "rejected": rejected,
            "update_norms": {c: float(f"{norm:.6g}") for c, (_, norm) in checked.items() if norm is not None},
            "uploaded_bytes": sum(fedavg.state_bytes(u) for u in uploads),
            "train_loss": sum(losses) / len(losses) if losses else None,
            "bytes_per_upload": fedavg.state_bytes(uploads[0]) if uploads else None,
            "bytes_per_download": fedavg.state_bytes(self.global_state),
        }
        errors = fedavg.fedavg_error(uploads, [1] * len(uploads) if self.dp else weights) if uploads else {}
        if errors:  # 6 digits: the last bits of float64 BLAS sums may differ run to run, a resumed run's too
            self.report["fedavg_error_mean"] = float(f"{sum(errors.values()) / len(errors):.6g}")
            self.report["fedavg_error_max"] = float(f"{max(errors.values()):.6g}")
        if ok and self.agg.stacks:
            self.global_state = fedavg.stack_lora(self.global_state, uploads, weights, lora_scale(self.cfg["lora"]))
        elif ok and self.dp:  # equal weights over the expected count: see fedavg.dp_mean (sample counts unused)
            noise = torch.Generator().manual_seed(self.cfg["train"]["seed"] * 1_000_033 + rnd)  # same on resume
            m = fc["fraction"] * len(self.clients)
            average = fedavg.dp_mean(self.global_state, uploads, fc["dp_clip"], fc["dp_noise"], m, noise)
            self.global_state = self.optimizer.step(self.global_state, average)
        elif ok:
            self.global_state = self.optimizer.step(self.global_state, fedavg.weighted_average(uploads, weights))
        sent = self.report["bytes_per_download"] * len(sampled) + self.report["uploaded_bytes"]
        self.history.append({"round": rnd, "sampled": sampled, "failed": failed, "rejected": rejected, "bytes": sent})
        self.report["communication_bytes"] = sum(h.get("bytes", 0) for h in self.history)  # the run's, so far
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


def check_upload(upload: Any, expected: dict[str, torch.Tensor]) -> str | None:
    """Why `upload` cannot be averaged into the global adapter whose tensors `expected` holds, or None:
    not a dict of named tensors, a missing or unexpected key, another dtype or shape, a NaN or Inf."""
    if not isinstance(upload, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in upload.items()
    ):
        return "upload is not a dict of named tensors"
    if missing := sorted(expected.keys() - upload.keys()):
        return f"upload lacks {len(missing)} of the {len(expected)} tensors, e.g. {missing[0]}"
    if extra := sorted(upload.keys() - expected.keys()):
        return f"upload has {len(extra)} tensors this aggregation does not share, e.g. {extra[0]}"
    for key, want in expected.items():
        t = upload[key]
        if t.dtype != want.dtype:
            return f"{key} is {str(t.dtype).removeprefix('torch.')}, not {str(want.dtype).removeprefix('torch.')}"
        if t.shape != want.shape:
            return f"{key} has shape {tuple(t.shape)}, not {tuple(want.shape)}"
        if not torch.isfinite(t).all():
            return f"{key} has NaN or Inf values"
    return None


def check_metrics(rows: Any, views: list[str]) -> str | None:
    """Why an evaluation reply ({view: {eval_loss, exact_match, n, ...}}) cannot be recorded, or None: a
    view or metric missing, a metric that is not a finite number, an exact match outside [0, 1]."""
    for view in views:
        m = rows.get(view) if isinstance(rows, dict) else None
        if not isinstance(m, dict):
            return f"no metrics for view {view}"
        for key in METRICS:
            v = m.get(key)
            if type(v) not in (int, float) or not math.isfinite(v):
                return f"{view} {key} is {v!r}, not a finite number"
        if not 0 <= m["exact_match"] <= 1 or m["n"] < 0:
            return f"{view} metrics out of range (exact_match {m['exact_match']!r}, n {m['n']!r})"
    return None


def round_summary(
    rnd: int,
    tasks: list[tuple[str, dict[str, Any]]],
    failed: list[str],
    ok: bool,
    t0: float,
    t_train: float,
    epsilon: float | None,
    aggregation: dict[str, Any],
    rejected_eval: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The round's record for metrics.jsonl (report_round adds each view's means); `epsilon`, with DP noise:
    the privacy spent so far; `aggregation`: the server's report of the round (Server.aggregate), whose
    rejected replies are joined by the evaluation replies left out (`rejected_eval`, client: reason)."""
    dp = {} if epsilon is None else {"epsilon": epsilon}
    rejected = dict(aggregation["rejected"])
    for c, why in (rejected_eval or {}).items():
        rejected[c] = f"{rejected[c]}; evaluation: {why}" if c in rejected else f"evaluation: {why}"
    return {
        "round": rnd,
        "clients": [c for c, _ in tasks],
        "failed": failed,
        "status": "ok" if ok else "failed" if tasks else "empty",
        "lr": tasks[0][1]["lr"] if tasks else None,
        "seconds": round(time.time() - t0, 2),
        "seconds_train": round(t_train, 2),
        **aggregation,
        "rejected": rejected,
        **dp,
    }


# ----------------------------------------------------------------------------------------------------
# Each round's record: metrics.jsonl, the printed lines, metrics.png


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
    left_out = "".join(f"; left out {c}: {why}" for c, why in summary["rejected"].items())
    print(
        f"round {rnd}/{rounds}: {n_ok}/{n} clients, uploaded "
        f"{summary['uploaded_bytes'] / 2**20:.2f} MiB, train loss {summary['train_loss'] or math.nan:.3f}{dp}, "
        f"{summary['seconds']:.1f}s ({t_train:.1f}s training){status}{left_out}"
    )
    print_table(rnd, rows, views)
    if "benchmark" in summary:  # federated.benchmark, in a round it scores
        name = summary["benchmark"]
        print(f"  {name} accuracy {summary[name]:.4f} on {summary[name + '_n']} questions (global adapter); "
              f"{summary['communication_bytes'] / 1e6:.3g} MB communicated so far")  # fmt: skip
    if "conflict_exact_match_global+local" in summary and summary["conflict_exact_match_global+local"] is not None:
        print(
            f"  conflicting prompts, exact match: global {summary['conflict_exact_match_global']:.2f}, "
            f"global+local {summary['conflict_exact_match_global+local']:.2f}"
        )


def print_table(rnd: int, rows: dict[str, dict[str, dict[str, float | None]]], views: list[str]) -> None:
    """One line per client: exact match and eval loss for each adapter view."""
    print(f"  {'client':<12}" + "".join(f"{v + ' EM/loss':>24}" for v in views))
    for client, by_view in rows.items():
        print(
            f"  {client:<12}"
            + "".join(f"{by_view[v]['exact_match']:>14.2f} {by_view[v]['eval_loss']:>9.3f}" for v in views)
        )


def plot(out_dir: str, records: list[dict[str, Any]], views: list[str]) -> None:
    """metrics.png (if matplotlib) from metrics.jsonl's records: each client's exact match over rounds,
    one panel per adapter view, and with federated.benchmark, its accuracy per round, each point marked
    with the megabytes communicated so far."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    scored = [r for r in records if "benchmark" in r]
    panels = len(views) + bool(scored)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.5), squeeze=False)
    records = [r for r in records if "client" in r]
    for ax, view in zip(axes[0][: len(views)], views, strict=True):
        for client in sorted({r["client"] for r in records}):
            pts = [(r["round"], r["exact_match"]) for r in records if r["client"] == client and r["adapters"] == view]
            ax.plot(*zip(*pts, strict=True), marker="o", label=client)
        ax.set(title=view, xlabel="round", ylabel="exact match", ylim=(-0.02, 1.02))
    axes[0][0].legend()
    if scored:
        ax, benchmark = axes[0][-1], scored[-1]["benchmark"]
        ax.plot([r["round"] for r in scored], [r[benchmark] for r in scored], marker="o", color="black")
        ax.axhline(0.25, linestyle="--", color="gray", linewidth=1)  # chance: one of four letters
        for r in scored:
            ax.annotate(f"{r['communication_bytes'] / 1e6:.3g} MB", (r["round"], r[benchmark]), fontsize=7,
                        textcoords="offset points", xytext=(0, 6), ha="center")  # fmt: skip
        n = scored[-1][f"{benchmark}_n"]
        ax.set(title=f"{benchmark} (global adapter, {n} questions)", xlabel="round", ylabel="accuracy")
    for ax in axes[0]:
        ax.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole numbers
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "metrics.png"), dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: <output_dir>/round_NNN/{global/, server.pt, config.yaml} (+ the simulation's clients/),
# written atomically; the newest train.keep_checkpoints are kept


def save_round(
    out_dir: str,
    rnd: int,
    server: Server,
    adapter_config: dict[str, Any],
    cfg: C.Config,
    extra: Callable[[str], None] | None = None,
    rng: dict[str, Any] | None = None,
) -> None:
    """Write round_NNN: the global adapter (Server.adapter), server.pt (round, server optimizer, history,
    and `rng`, the simulation's generators), the config, and whatever extra(tmp_dir) adds (the simulation:
    its clients' states); keep the newest train.keep_checkpoints."""

    def write(tmp: str) -> None:
        lora.write_adapter(os.path.join(tmp, "global"), *server.adapter(adapter_config))
        if extra is not None:
            extra(tmp)
        state = {"round": rnd, "server_optimizer": server.optimizer.state_dict(), "history": server.history,
                 "clients": server.clients}  # fmt: skip
        torch.save({**state, "rng": rng} if rng is not None else state, os.path.join(tmp, "server.pt"))
        checkpoints.save_yaml(cfg, os.path.join(tmp, "config.yaml"))

    checkpoints.write_atomically(os.path.join(out_dir, f"round_{rnd:03d}"), write)
    checkpoints.keep_latest(out_dir, "round_", cfg["train"]["keep_checkpoints"])


def completed_rounds(out_dir: str) -> list[str]:
    """Names of the complete round_<number> directories in out_dir, in round order (round_999 before
    round_1000)."""
    return checkpoints.completed(out_dir, "round_")


def latest_round(out_dir: str) -> str | None:
    """The complete round_<number> directory in out_dir with the largest number, or None."""
    done = completed_rounds(out_dir)
    return os.path.join(out_dir, done[-1]) if done else None


def load_round(path: str, server: Server) -> dict[str, Any]:
    """Give the server back what save_round wrote in `path`; returns server.pt (its round, rng, ...), read
    with weights_only=True (checkpoints.load_state: a damaged file is a one-line CheckpointError)."""
    state = checkpoints.load_state(os.path.join(path, "server.pt"))
    server.restore(lora.read_adapter(os.path.join(path, "global"))[1])
    server.optimizer.load_state_dict(state["server_optimizer"])
    server.history = state["history"]
    server.clients = list(state.get("clients", server.clients))  # with those that joined, in their order
    return state


# ----------------------------------------------------------------------------------------------------
# The federated settings, checked before any work (the simulation and the ServerApp alike)


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
    if not fedavg.AGGREGATIONS[fc["aggregation"]].stacks:
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
