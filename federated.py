"""Federated fine-tuning with dual adapters, simulated serially on one GPU or CPU.

    python federated.py config.yaml [section.key=value ...] [--resume]

Every client holds private data (data.clients: a file each; or data.train_file partitioned). The model
carries two adapters on one frozen 4-bit base: a global one, trained by every client and combined by the
server, and a local one per client that never leaves it (client.py explains both, and federated.mode).
Each round, main() below does what a real federation does across machines:

    server.tasks(rnd)                  which clients train, with what lr and seeds       (server.py)
    client.fit(global_state, task)     each of them trains and uploads its shared part   (client.py)
    server.aggregate(...)              the new global adapter: federated.aggregation     (fedavg.py)
    client.evaluate(global_state)      every client scores the views global, local, global+local
    save_round(...)                    round_NNN/: global adapter, clients' states, server state

With federated.dp_clip > 0 the global adapter is released under client-level differential privacy
(DP-FedAvg): each client clips its update, clients are Poisson-sampled, the server adds Gaussian noise to
an equal-weight mean and reports the epsilon spent (fedavg.py has the formulas). flower_app.py runs the
same Client and Server on Flower's deployment engine, one site per machine.
"""

import os
import time
from collections.abc import Sequence

import torch

import benchmark as B
import checkpoints
import client as fl_client
import config as C
import data as D
import fedavg
import lora
import model as M
import prepare
import server as fl_server


def check(cfg: C.Config, clients: dict[str, prepare.Records]) -> None:
    """The federated settings that depend on the clients (ConfigError naming the key)."""
    fl_server.check_sampling(cfg, len(clients))
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
        fc = cfg["federated"]
        out_dir, mode = fc["output_dir"], fc["mode"]
        previous = checkpoints.check_output_dir(
            out_dir, args.resume, cfg["train"]["overwrite"], files=fl_server.RUN_FILES, latest=fl_server.latest_round
        )
        if args.resume:  # a changed lr, aggregation, DP setting, client set...: refused in one line
            C.check_resume_config(os.path.join(fl_server.latest_round(out_dir), "config.yaml"), cfg)
        clients = prepare.client_records(cfg)
        check(cfg, clients)
        questions = B.questions_for(fc["benchmark"], fc["benchmark_limit"], cfg["model"]["cache_dir"])
        C.quiet_libraries()
        saved_config = os.path.join(out_dir, "config.yaml") if args.resume else None
        adapters = ["global"] + ([] if mode == "global_only" else ["local"])  # the most a client trains at once
        run = prepare.prepare(cfg, clients, adapters, saved_config)
        fedavg.ServerOptimizer(fc["server_optimizer"], lr=fc["server_lr"])  # its settings checked before any work
    except (C.ConfigError, D.DataError, M.ModelError, ValueError) as e:
        C.fail(e)
    cfg["train"]["batch_size"] = run.batch_size
    checkpoints.clear_output_dir(out_dir, previous)
    checkpoints.save_yaml(cfg, os.path.join(out_dir, "config.yaml"))
    views = ["global"] if mode == "global_only" else list(fl_client.VIEWS)
    conflicts = fl_client.conflicting_prompts(clients)
    # the simulation lends every client the one model in memory, in turn
    sites = {c: fl_client.Client(c, run, cfg, clients[c]) for c in clients}
    declared = {c: len(run.examples[c][0]) for c in clients}  # training examples: the most a reply may claim
    server = fl_server.Server(cfg, list(clients), lora.adapter_state_dict(run.model, "global"), declared)
    start = 1
    if args.resume:
        last = fl_server.latest_round(out_dir)
        state = fl_server.load_round(last, server)
        for name, site in sites.items():
            site.load_state(os.path.join(last, "clients", name))
        checkpoints.set_rng_state(state["rng"])
        start = state["round"] + 1
        print(f"resumed after {os.path.basename(last)}")
    logger = C.Logger(out_dir)
    print(
        f"{len(clients)} clients ({', '.join(clients)}), mode {mode}, aggregation {fc['aggregation']}, "
        f"{fc['rounds']} rounds; {len(conflicts)} conflicting prompts; "
        f"model {run.base_path} on {run.device} in {str(run.dtype).replace('torch.', '')}"
    )

    def benchmark(rnd: int) -> dict[str, float]:  # federated.benchmark: the global adapter as the first client holds it
        if not questions or not B.due(rnd, fc["rounds"], fc["benchmark_every"]):
            return {}
        return B.record(fc["benchmark"], sites[next(iter(sites))].benchmark(server.global_state, questions))

    if start == 1 and (before := benchmark(0)):
        logger.log(round=0, **before, communication_bytes=0)
        print(
            f"{fc['benchmark']} accuracy {before[fc['benchmark']]:.4f} on {before[fc['benchmark'] + '_n']} "
            "questions before round 1 (the base: a fresh adapter changes nothing)"
        )
    t_start = time.time()
    for rnd in range(start, fc["rounds"] + 1):
        if stop := server.over_budget(rnd):
            print(stop)
            break
        t0 = time.time()
        tasks = server.tasks(rnd)
        replies, failed = {}, []
        for name, task in tasks:  # in Flower, each of these runs at its own site, in parallel
            try:
                replies[name] = sites[name].fit(server.global_state, task)  # (upload, n, loss)
            except Exception as e:  # a failing client must not take the federation down with it
                print(f"  client {name} failed in round {rnd}: {type(e).__name__}: {e}; left out of the average")
                failed.append(name)
            finally:
                if run.device.type == "cuda":
                    torch.cuda.empty_cache()
        ok = server.aggregate(rnd, [c for c, _ in tasks], replies, failed)  # checks each reply first
        t_train = time.time() - t0
        rows, rejected = {}, {}
        for name, site in sites.items():
            try:
                rows[name] = site.evaluate(server.global_state, conflicts)
                why = fl_server.check_metrics(rows[name], views)
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
            if why:  # left out of the round's means, with its reason
                rejected[name] = why
                rows.pop(name, None)
        summary = fl_server.round_summary(
            rnd, tasks, failed, ok, t0, t_train, server.epsilon(rnd), server.report, rejected
        )
        fl_server.report_round(logger, rnd, fc["rounds"], views, rows, summary | benchmark(rnd), t_train)

        def save_clients(tmp: str) -> None:  # what each client keeps, in round_NNN/clients/<name>/
            for name, site in sites.items():
                site.save_state(os.path.join(tmp, "clients", name), server.global_state, run.base_path)

        fl_server.save_round(
            out_dir,
            rnd,
            server,
            lora.adapter_config(run.model, "global", run.base_path),
            cfg,
            save_clients,
            checkpoints.rng_state(),
        )
        records = C.read_jsonl(os.path.join(out_dir, "metrics.jsonl"))  # a torn last line: skipped
        fl_server.plot(out_dir, records, views)
    print(f"done in {time.time() - t_start:.0f}s; checkpoints in {out_dir}")


if __name__ == "__main__":
    main()
