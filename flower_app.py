"""Federated fine-tuning across machines, on Flower's deployment engine: client.py's Client and server.py's
Server, driven by Flower's Message API instead of federated.py's loop in one process.

    coordinator   flower-superlink ...                    (see the README: "Run across machines")
                  flwr run . <federation> --stream --run-config 'config="config.yaml" overrides="..."'
    each site     flower-supernode ... --node-config "client='fr' data-file='/data/fr.json' state-dir='/state/fr'"

Per round the ServerApp sends each sampled site a "train" message (the global adapter's tensors and the
task: round, lr, seeds) and every site an "evaluate" message (the new global adapter); a site answers with
its trained global adapter, its sample count and its metrics. That is all that crosses the network: data
files, local adapters and optimizer states stay at the site, in its state-dir, versioned by round.

Run config ([tool.flwr.app.config] in pyproject.toml, or `flwr run --run-config`): `config` (the project's
YAML config, relative to this file's directory unless absolute), `overrides` (section.key=value pairs, as
on the command line), `resume` (continue after the last complete round in federated.output_dir).
"""

import json
import os
import shlex
import time
from typing import Any

import torch

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError:  # the simulation and every other entry point run without flwr
    raise SystemExit("error: flower_app.py needs flwr: pip install -r requirements-flower.txt") from None

import checkpoints
import client as fl_client
import config as C
import lora
import prepare
import server as fl_server

HERE = os.path.dirname(os.path.abspath(__file__))


def load_run_config(run_config: dict[str, Any]) -> C.Config:
    """The project config named by the run config's `config` and `overrides` keys (ConfigError if bad)."""
    path = str(run_config.get("config", "config.yaml"))
    path = path if os.path.isabs(path) else os.path.join(HERE, path)
    try:
        overrides = shlex.split(str(run_config.get("overrides", "")))
    except ValueError as e:
        raise C.ConfigError(f"run config overrides: {e}") from None
    return C.load_config(path, overrides)


# ----------------------------------------------------------------------------------------------------
# The site: one client.Client, its local state kept in state-dir/round_NNN/ (the round it ends)

client_app = ClientApp()
_site: dict[str, Any] = {}  # this process's Client, set up once per run


def site(context: Context) -> tuple[fl_client.Client, str]:
    """(this site's Client, its state-dir), set up by prepare.prepare exactly as federated.py sets up each
    client: same seed, base, adapters in the same order, the same checks, so a site starts from the very
    adapters the simulation starts from."""
    key = f"{context.run_id}"
    if _site.get("key") != key:
        cfg = load_run_config(context.run_config)
        nc = context.node_config
        name, data_file, state_dir = str(nc["client"]), str(nc["data-file"]), str(nc["state-dir"])
        records = prepare.site_records(cfg, data_file)
        C.quiet_libraries()
        mode = cfg["federated"]["mode"]
        run = prepare.prepare(cfg, {name: records}, ["global"] + ([] if mode == "global_only" else ["local"]))
        cfg["train"]["batch_size"] = run.batch_size
        client = fl_client.Client(name, run, cfg, records)
        os.makedirs(state_dir, exist_ok=True)
        _site.update(key=key, client=client, state_dir=state_dir)
    return _site["client"], _site["state_dir"]


def load_local(client: fl_client.Client, state_dir: str, upto: int) -> None:
    """Give the client its local state as it was at the end of round `upto` (the newest saved round <= upto;
    the fresh state if none): a round the server redoes never starts from a state one step ahead."""
    done = [d for d in checkpoints.completed(state_dir, "round_") if int(d[len("round_") :]) <= upto]
    client.load_state(os.path.join(state_dir, done[-1]) if done else None)


def save_local(client: fl_client.Client, state_dir: str, rnd: int, received: dict[str, torch.Tensor]) -> None:
    """state-dir/round_NNN/ (Client.save_state: local/, local_optimizer.pt; with aggregation fedsa global/,
    its own B with the A it `received` and trained from), written atomically; the two newest are kept."""
    if not (client.has_local or client.agg.own_rest):
        return
    checkpoints.write_atomically(
        os.path.join(state_dir, f"round_{rnd:03d}"), lambda tmp: client.save_state(tmp, received)
    )
    checkpoints.keep_latest(state_dir, "round_", 2)


def received(msg: Message) -> dict[str, torch.Tensor]:
    """The message's global state (an empty record, stack's first round, is an empty dict)."""
    record = msg.content["global"]
    return record.to_torch_state_dict() if len(record) else {}


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """The site's name, its fresh global adapter and the adapter's config (the server's starting point)."""
    site_client, _ = site(context)
    info = ConfigRecord(
        {"client": site_client.name, "adapter_config": json.dumps(lora.adapter_config(site_client.model, "global"))}
    )
    global_state = ArrayRecord(lora.adapter_state_dict(site_client.model, "global"))
    return Message(content=RecordDict({"site": info, "global": global_state}), reply_to=msg)


@client_app.train()
def fit(msg: Message, context: Context) -> Message:
    """One round's training: the global adapter in, the trained global adapter and the sample count out."""
    client, state_dir = site(context)
    task = dict(msg.content["task"])
    load_local(client, state_dir, task["round"] - 1)
    global_state = received(msg)
    upload, n, loss = client.fit(global_state, task)
    save_local(client, state_dir, task["round"], global_state)
    metrics = MetricRecord({"num-examples": n, "train-loss": loss})
    return Message(content=RecordDict({"global": ArrayRecord(upload), "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The views' metrics on this site's eval split, with its local state as of the message's round."""
    client, state_dir = site(context)
    load_local(client, state_dir, int(msg.content["task"]["round"]))
    rows = client.evaluate(received(msg))
    content = RecordDict(
        {view: MetricRecord({k: v for k, v in m.items() if v is not None}) for view, m in rows.items()}
    )
    return Message(content=content, reply_to=msg)


# ----------------------------------------------------------------------------------------------------
# The coordinator: one server.Server; writes <federated.output_dir> as the simulation does, minus the
# local adapters (at the sites) and the conflicting-prompt report (it needs every site's data)

server_app = ServerApp()


def discover(grid: Grid, seen: set[int], timeout: float) -> dict[str, tuple[int, RecordDict]]:
    """{site name: (node id, its query answer)} from the connected nodes whose ids are not in `seen` (which grows):
    a site that restarts connects with a new node id; a dead node's old id is never asked again."""
    ids = [i for i in grid.get_node_ids() if i not in seen]
    seen.update(ids)
    ask = [Message(RecordDict(), dst_node_id=i, message_type="query") for i in ids]
    answers = {}
    for reply in grid.send_and_receive(ask, timeout=timeout) if ask else []:
        if not reply.has_error():
            answers[str(reply.content["site"]["client"])] = reply.metadata.src_node_id, reply.content
    return answers


def roster(
    grid: Grid, cfg: C.Config, seen: set[int], timeout: float
) -> tuple[dict[str, int], dict[str, torch.Tensor], dict]:
    """({site name: node id}, the fresh global adapter, its adapter config), once every expected site is
    connected: data.clients' names if set (in that order), else whoever answers. Every site builds the
    same fresh adapters (same seed), so the first site's serves as the initial global adapter."""
    expected = prepare.client_names(cfg["data"]["clients"] or [])
    deadline, answers = time.time() + timeout, {}
    while not ((expected and set(expected) <= set(answers)) or (not expected and answers)):
        if time.time() > deadline:
            missing = [c for c in expected if c not in answers]
            raise C.ConfigError(f"sites not connected after {timeout:.0f}s: {', '.join(missing) or 'any'}")
        answers.update(discover(grid, seen, timeout))
        time.sleep(1)
    order = expected or sorted(answers)
    first = answers[order[0]][1]
    nodes = {c: answers[c][0] for c in order}
    return nodes, first["global"].to_torch_state_dict(), json.loads(str(first["site"]["adapter_config"]))


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation; a bad run config, config or output directory ends in one line (streamed to
    `flwr run`), with nothing written."""
    try:
        run(grid, context)
    except ValueError as e:  # ConfigError, DataError, ModelError: the project's one-line errors
        C.fail(e)


def run(grid: Grid, context: Context) -> None:
    """The rounds: sample, send the tasks, aggregate what comes back in time, evaluate, checkpoint."""
    cfg = load_run_config(context.run_config)
    fc = cfg["federated"]
    out_dir, timeout = fc["output_dir"], float(fc["round_timeout"])
    resume = bool(context.run_config.get("resume", False))
    previous = checkpoints.check_output_dir(
        out_dir, resume, cfg["train"]["overwrite"], fl_server.RUN_FILES, fl_server.latest_round
    )
    seen: set[int] = set()
    nodes, initial, adapter_cfg = roster(grid, cfg, seen, timeout)
    fl_server.check_sampling(cfg, len(nodes))
    checkpoints.clear_output_dir(out_dir, previous)
    checkpoints.save_yaml(cfg, os.path.join(out_dir, "config.yaml"))
    server = fl_server.Server(cfg, list(nodes), initial)
    start = 1
    if resume:
        last = fl_server.latest_round(out_dir)
        start = fl_server.load_round(last, server)["round"] + 1  # tensors, numbers, names only: weights_only
        print(f"resumed after {os.path.basename(last)}")
    logger = C.Logger(out_dir)
    print(f"{len(nodes)} sites ({', '.join(nodes)}), mode {fc['mode']}, aggregation {fc['aggregation']}, "
          f"{fc['rounds']} rounds")  # fmt: skip
    for rnd in range(start, fc["rounds"] + 1):
        if stop := server.over_budget(rnd):
            print(stop)
            break
        t0 = time.time()
        for name, (node, _) in discover(grid, seen, timeout).items():  # a site back after a restart
            if name in nodes:
                nodes[name] = node
                print(f"  site {name} reconnected (node {nodes[name]})")
        tasks = server.tasks(rnd)
        msgs = [
            Message(
                RecordDict({"global": ArrayRecord(server.global_state), "task": ConfigRecord(task)}),
                dst_node_id=nodes[c],
                message_type="train",
            )
            for c, task in tasks
        ]
        replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(msgs, timeout=timeout)}
        uploads, weights, losses, failed = [], [], [], []
        for client, _ in tasks:
            reply = replies.get(nodes[client])
            if reply is None or reply.has_error():
                why = "no answer within federated.round_timeout" if reply is None else reply.error.reason
                print(f"  client {client} failed in round {rnd}: {why}; left out of the average")
                failed.append(client)
                continue
            uploads.append(received(reply))
            weights.append(int(reply.content["metrics"]["num-examples"]))
            losses.append(float(reply.content["metrics"]["train-loss"]))
        sampled = [c for c, _ in tasks]
        ok = server.aggregate(rnd, sampled, uploads, weights, failed)
        t_train = time.time() - t0
        silent = {c for c, _ in tasks if nodes[c] not in replies}  # gone, most likely: not asked again until back
        rows = evaluate_sites(
            grid, {c: n for c, n in nodes.items() if c not in silent}, server.global_state, rnd, timeout
        )
        summary = fl_server.round_summary(
            rnd, tasks, uploads, losses, failed, ok, t0, t_train, server.epsilon(rnd), server.report
        )
        views = ["global"] if fc["mode"] == "global_only" else list(fl_client.VIEWS)
        fl_server.report_round(logger, rnd, fc["rounds"], views, rows, summary, t_train)
        fl_server.save_round(out_dir, rnd, server, adapter_cfg, cfg)
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            fl_server.plot(out_dir, [r for r in map(json.loads, f) if "client" in r], views)
    print(f"done; checkpoints in {out_dir}")


def evaluate_sites(
    grid: Grid, nodes: dict[str, int], global_state: dict[str, torch.Tensor], rnd: int, timeout: float
) -> dict[str, dict[str, dict[str, float | None]]]:
    """{site: {view: metrics}} from every site that answers in time (conflict metrics: None, 0)."""
    msgs = [
        Message(
            RecordDict({"global": ArrayRecord(global_state), "task": ConfigRecord({"round": rnd})}),
            dst_node_id=i,
            message_type="evaluate",
        )
        for i in nodes.values()
    ]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(msgs, timeout=timeout)}
    rows = {}
    for client, node in nodes.items():
        reply = replies.get(node)
        if reply is None or reply.has_error():
            continue
        rows[client] = {
            view: {"eval_loss": float(m["eval_loss"]), "exact_match": float(m["exact_match"]), "n": int(m["n"]),
                   "conflict_exact_match": None, "n_conflict": 0}
            for view, m in reply.content.metric_records.items()
        }  # fmt: skip
    return rows
