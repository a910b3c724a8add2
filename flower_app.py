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
_sites: dict[tuple[int, str], tuple[fl_client.Client, str]] = {}  # (run, site name) -> its Client, state-dir


def site(context: Context) -> tuple[fl_client.Client, str]:
    """(this site's Client, its state-dir), set up by prepare.prepare exactly as federated.py sets up each
    client: same seed, base, adapters in the same order, the same checks, so a site starts from the very
    adapters the simulation starts from."""
    nc = context.node_config
    name, data_file, state_dir = str(nc["client"]), str(nc["data-file"]), str(nc["state-dir"])
    if (context.run_id, name) not in _sites:  # set up once per run (and site: tests host several in one process)
        cfg = load_run_config(context.run_config)
        records = prepare.site_records(cfg, data_file)
        C.quiet_libraries()
        mode = cfg["federated"]["mode"]
        run = prepare.prepare(cfg, {name: records}, ["global"] + ([] if mode == "global_only" else ["local"]))
        cfg["train"]["batch_size"] = run.batch_size
        os.makedirs(state_dir, exist_ok=True)
        _sites[context.run_id, name] = fl_client.Client(name, run, cfg, records), state_dir
    return _sites[context.run_id, name]


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
    """The site's name, its number of training examples (no training reply may claim more) and its fresh
    global adapter (which the coordinator checks against its own: same base, lora section and seed)."""
    site_client, _ = site(context)
    info = ConfigRecord({"client": site_client.name, "num-examples": len(site_client.examples[0])})
    global_state = ArrayRecord(site_client.initial)
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
# local adapters (at the sites) and the conflicting-prompt report (it needs every site's data). It trusts
# no site: who a node is, what it declares and every reply are checked, and a bad one is left out.

server_app = ServerApp()


class Sites:
    """Which node is which site. A node says who it is when asked (its query answer: name, number of
    training examples, fresh global adapter); it is admitted as that site unless its name is not one of
    the run's sites, another live node holds the name, its key is not the name's in federated.sites, its
    example count differs from the one the site first declared, or its fresh adapter is not the
    coordinator's `initial` (another base, lora section or seed). Each refusal is printed, naming both nodes
    where two claim one name. A site that restarts comes back as a new node and takes its place again."""

    def __init__(self, cfg: C.Config, initial: dict[str, torch.Tensor], names: list[str] | None = None) -> None:
        self.initial, self.names = initial, names  # names: the run's sites; None: whoever answers first
        self.keys = {pem_key(path): name for name, path in (cfg["federated"]["sites"] or {}).items()}
        self.nodes: dict[str, int] = {}  # site name -> node id
        self.declared: dict[str, int] = {}  # site name -> training examples, as first declared
        self.seen: set[int] = set()  # node ids asked once (a dead node is never asked again)

    def ask(self, grid: Grid, timeout: float) -> None:
        """Ask every node not asked yet who it is, and admit or refuse each."""
        live = {n.node_id: n for n in grid.get_nodes()}
        ids = [i for i in live if i not in self.seen]
        self.seen.update(ids)
        ask = [Message(RecordDict(), dst_node_id=i, message_type="query") for i in ids]
        replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(ask, timeout=timeout)} if ask else {}
        for node in ids:
            reply = replies.get(node)
            if reply is None or reply.has_error():
                continue
            try:
                name, n, why = self.identify(reply.content, live[node].public_key)
            except Exception as e:  # a malformed answer: whatever it lacks, it is refused, never raised
                name, n, why = "?", 0, f"malformed answer ({type(e).__name__}: {e})"
            holder = self.nodes.get(name)
            if not why and holder not in (None, node) and holder in live:
                why = f"site {name} is held by node {holder}, which is still connected"
                self.seen.discard(node)  # asked again next round: the holder may be a dead node not yet dropped
            if why:
                print(f"  node {node} refused as site {name}: {why}")
                continue
            if holder is not None and holder != node:
                print(f"  site {name} reconnected (node {node})")
            self.nodes[name] = node
            self.declared.setdefault(name, n)

    def identify(self, content: RecordDict, key: bytes) -> tuple[str, int, str | None]:
        """(the site name a query answer claims, the training examples it declares, why the node cannot be
        that site or None)."""
        name, n = str(content["site"]["client"]), content["site"]["num-examples"]
        if self.names is not None and name not in self.names:
            return name, n, f"not a site of this run ({', '.join(self.names)})"
        if self.keys and self.keys.get(key) != name:
            owner = self.keys.get(key)
            return name, n, f"its key is {owner}'s in federated.sites" if owner else "its key is not in federated.sites"
        if type(n) is not int or n < 1:
            return name, n, f"declares {n!r} training examples, not a positive integer"
        if n != self.declared.get(name, n):
            return name, n, f"declares {n} training examples, {self.declared[name]} when it first joined"
        fresh = content["global"].to_torch_state_dict()
        why = fl_server.check_upload(fresh, self.initial)
        if why is None and not all(torch.allclose(fresh[k], v, rtol=1e-5, atol=1e-7) for k, v in self.initial.items()):
            why = "other values"
        if why:
            return name, n, f"its fresh global adapter is not the coordinator's ({why}): same base, lora, train.seed?"
        return name, n, None

    def wait_for_all(self, grid: Grid, timeout: float) -> None:
        """Ask until every site of the run is admitted (or, with no list of sites, any), or `timeout` passed."""
        deadline = time.time() + timeout
        while not ((self.names and set(self.names) <= set(self.nodes)) or (not self.names and self.nodes)):
            if time.time() > deadline:
                missing = [c for c in self.names or [] if c not in self.nodes]
                raise C.ConfigError(f"sites not connected after {timeout:.0f}s: {', '.join(missing) or 'any'}")
            self.ask(grid, timeout)
            time.sleep(1)
        self.names = self.names or sorted(self.nodes)  # from now on, the run's sites


def pem_key(path: str) -> bytes:
    """A SuperNode's public key file (OpenSSH, as `flwr supernode register` takes it) as the PEM bytes
    the SuperLink reports for the node (grid.get_nodes()); ConfigError naming the file if unreadable."""
    from cryptography.exceptions import UnsupportedAlgorithm  # flwr's own dependency
    from cryptography.hazmat.primitives import serialization

    try:
        with open(path, "rb") as f:
            key = serialization.load_ssh_public_key(f.read())
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise C.ConfigError(f"federated.sites: {path}: not a readable OpenSSH public key ({e})") from None
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation; a bad run config, config or output directory ends in one line (streamed to
    `flwr run`), with nothing written."""
    try:
        run(grid, context)
    except ValueError as e:  # ConfigError, DataError, ModelError: the project's one-line errors
        C.fail(e)


def run(grid: Grid, context: Context) -> None:
    """The rounds: sample, send the tasks, aggregate what comes back in time and passes the checks,
    evaluate, checkpoint."""
    cfg = load_run_config(context.run_config)
    fc = cfg["federated"]
    out_dir, timeout = fc["output_dir"], float(fc["round_timeout"])
    resume = bool(context.run_config.get("resume", False))
    previous = checkpoints.check_output_dir(
        out_dir, resume, cfg["train"]["overwrite"], fl_server.RUN_FILES, fl_server.latest_round
    )
    if resume:  # a changed lr, aggregation, DP setting, client set...: refused in one line
        C.check_resume_config(os.path.join(fl_server.latest_round(out_dir), "config.yaml"), cfg)
    C.quiet_libraries()
    initial, adapter_cfg = prepare.fresh_adapter(cfg, "global")  # built here, from the config: no site's word
    names = prepare.client_names(cfg["data"]["clients"] or []) or list(fc["sites"] or []) or None
    sites = Sites(cfg, initial, names)
    sites.wait_for_all(grid, timeout)
    nodes = sites.nodes
    fl_server.check_sampling(cfg, len(sites.names))
    checkpoints.clear_output_dir(out_dir, previous)
    checkpoints.save_yaml(cfg, os.path.join(out_dir, "config.yaml"))
    server = fl_server.Server(cfg, list(sites.names), initial, sites.declared)
    start = 1
    if resume:
        last = fl_server.latest_round(out_dir)
        start = fl_server.load_round(last, server)["round"] + 1  # tensors, numbers, names only: weights_only
        print(f"resumed after {os.path.basename(last)}")
    logger = C.Logger(out_dir)
    print(f"{len(nodes)} sites ({', '.join(sites.names)}), mode {fc['mode']}, aggregation {fc['aggregation']}, "
          f"{fc['rounds']} rounds")  # fmt: skip
    views = ["global"] if fc["mode"] == "global_only" else list(fl_client.VIEWS)
    for rnd in range(start, fc["rounds"] + 1):
        if stop := server.over_budget(rnd):
            print(stop)
            break
        t0 = time.time()
        sites.ask(grid, timeout)  # a site back after a restart
        tasks = server.tasks(rnd)
        msgs = [
            Message(
                RecordDict({"global": ArrayRecord(server.global_state), "task": ConfigRecord(task)}),
                dst_node_id=nodes[c],
                message_type="train",
            )
            for c, task in tasks
        ]
        got = {r.metadata.src_node_id: r for r in grid.send_and_receive(msgs, timeout=timeout)}
        replies, failed, malformed = {}, [], {}
        for client, _ in tasks:
            reply = got.get(nodes[client])
            if reply is None or reply.has_error():
                why = "no answer within federated.round_timeout" if reply is None else reply.error.reason
                print(f"  client {client} failed in round {rnd}: {why}; left out of the average")
                failed.append(client)
                continue
            try:
                metrics = reply.content["metrics"]
                replies[client] = received(reply), metrics["num-examples"], metrics["train-loss"]
            except Exception as e:  # checked by the server, but first it has to be read
                malformed[client] = f"malformed reply ({type(e).__name__}: {e})"
        ok = server.aggregate(rnd, [c for c, _ in tasks], replies, failed, malformed)
        t_train = time.time() - t0
        silent = {c for c, _ in tasks if nodes[c] not in got}  # gone, most likely: not asked again until back
        rows, rejected = evaluate_sites(
            grid, {c: n for c, n in nodes.items() if c not in silent}, server.global_state, rnd, timeout, views
        )
        summary = fl_server.round_summary(
            rnd, tasks, failed, ok, t0, t_train, server.epsilon(rnd), server.report, rejected
        )
        fl_server.report_round(logger, rnd, fc["rounds"], views, rows, summary, t_train)
        fl_server.save_round(out_dir, rnd, server, adapter_cfg, cfg)
        records = C.read_jsonl(os.path.join(out_dir, "metrics.jsonl"))  # a torn last line: skipped
        fl_server.plot(out_dir, [r for r in records if "client" in r], views)
    print(f"done; checkpoints in {out_dir}")


def evaluate_sites(
    grid: Grid,
    nodes: dict[str, int],
    global_state: dict[str, torch.Tensor],
    rnd: int,
    timeout: float,
    views: list[str],
) -> tuple[dict[str, dict[str, dict[str, float | None]]], dict[str, str]]:
    """({site: {view: metrics}} from every site that answers in time with a sound reply (conflict metrics:
    None, 0), {site: why its reply was left out})."""
    msgs = [
        Message(
            RecordDict({"global": ArrayRecord(global_state), "task": ConfigRecord({"round": rnd})}),
            dst_node_id=i,
            message_type="evaluate",
        )
        for i in nodes.values()
    ]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(msgs, timeout=timeout)}
    rows, rejected = {}, {}
    for client, node in nodes.items():
        reply = replies.get(node)
        if reply is None or reply.has_error():
            continue
        try:
            got = {view: dict(m) for view, m in reply.content.metric_records.items()}
            why = fl_server.check_metrics(got, views)
        except Exception as e:
            why = f"malformed reply ({type(e).__name__}: {e})"
        if why:
            rejected[client] = why
            continue
        rows[client] = {
            view: {"eval_loss": float(got[view]["eval_loss"]), "exact_match": float(got[view]["exact_match"]),
                   "n": int(got[view]["n"]), "conflict_exact_match": None, "n_conflict": 0}
            for view in views
        }  # fmt: skip
    return rows, rejected
