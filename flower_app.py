"""Federated fine-tuning across machines, on Flower's deployment engine: client.py's Client and server.py's
Server, driven by Flower's Message API instead of federated.py's loop in one process.

    coordinator   flower-superlink ...                    (see the README: "Across machines: Flower")
                  flwr run . <federation> --stream --run-config 'config="config.yaml" overrides="..."'
    each site     python flower_app.py --client fr --data-file /data/fr.json --state-dir /state/fr \
                      --superlink coordinator:9092 --root-certificates ca.crt      (+ any flower-supernode option)

The site command keeps the site warm: one process (the worker) holds the base model, tokenizer and
examples for the whole run and starts the site's SuperNode, whose ClientApps (Flower starts one process
per message) hand each message to it. A plain `flower-supernode ... --node-config "client='fr'
data-file='/data/fr.json' state-dir='/state/fr'"` works too, loading the base for every message.

Per round the ServerApp sends each sampled site a "train" message (the global adapter's tensors and the
task: round, lr, seeds) and every site an "evaluate" message (the new global adapter); a site answers with
its trained global adapter, its sample count and its metrics. That is all that crosses the network: data
files, local adapters and optimizer states stay at the site, in its state-dir, versioned by round.

Run config ([tool.flwr.app.config] in pyproject.toml, or `flwr run --run-config`): `config` (the project's
YAML config, relative to this file's directory unless absolute), `overrides` (section.key=value pairs, as
on the command line), `resume` (continue after the last complete round in federated.output_dir).
"""

import io
import math
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
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


class Site:
    """One site: its name, data file and state-dir, and its Client for the current run, set up by
    prepare.prepare exactly as federated.py sets up each client (same seed, base, adapters in the same
    order, the same checks, train.batch_size resolved), so a site starts from the very adapters the
    simulation starts from. `answer` does what one message asks; the Client is built once per run."""

    def __init__(self, name: str, data_file: str, state_dir: str) -> None:
        self.name, self.data_file, self.state_dir = name, data_file, state_dir
        self.run_id: int | None = None
        self.client: fl_client.Client | None = None
        self.loads, self.answered = 0, 0  # base models loaded by this process; messages of this run answered

    def setup(self, run_id: int, cfg: C.Config) -> fl_client.Client:
        """The Client for run `run_id` (the run's config `cfg`): the one already built, or a new one."""
        if self.client is None or run_id != self.run_id:
            self.client = None  # the previous run's model goes before the next one loads
            t0 = time.time()
            records = prepare.site_records(cfg, self.data_file)
            C.quiet_libraries()
            adapters = ["global"] + ([] if cfg["federated"]["mode"] == "global_only" else ["local"])
            run = prepare.prepare(cfg, {self.name: records}, adapters)
            cfg["train"]["batch_size"] = run.batch_size
            os.makedirs(self.state_dir, exist_ok=True)
            self.client, self.run_id = fl_client.Client(self.name, run, cfg, records), run_id
            self.loads, self.answered = self.loads + 1, 0
            print(f"site {self.name}: run {run_id}: base {run.base_path} loaded in {time.time() - t0:.1f}s", flush=True)
        return self.client

    def answer(
        self, kind: str, run_id: int, cfg: C.Config, global_state: dict[str, torch.Tensor], task: dict[str, Any]
    ) -> dict[str, Any]:
        """What a message of `kind` asks, for run `run_id`: "query" -> the site's name, its number of
        training examples (no training reply may claim more) and its fresh global adapter (which the
        coordinator checks against its own); "train" -> one round's training from `global_state` as `task`
        says (the trained global adapter, sample count, loss); "evaluate" -> each view's metrics on the
        eval split, the local state as of the task's round."""
        client = self.setup(run_id, cfg)
        self.answered += 1
        if kind == "query":
            return {"client": self.name, "num-examples": len(client.examples[0]), "global": client.initial}
        if kind == "train":
            load_local(client, self.state_dir, task["round"] - 1)
            upload, n, loss = client.fit(global_state, task)
            save_local(client, self.state_dir, task["round"], global_state)
            return {"global": upload, "num-examples": n, "train-loss": loss}
        if kind == "evaluate":
            load_local(client, self.state_dir, int(task["round"]))
            return {"metrics": client.evaluate(global_state)}
        raise ValueError(f"unknown message type {kind!r}")


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


# The ClientApp. Flower starts a new process for every message, so on its own a site would load its
# base model for each one. A site started with `python flower_app.py --client ...` (site_command,
# below) keeps one warm process, the worker, holding the Site; its SuperNode's node config names the
# worker's socket, and each ClientApp process only hands the message over and the answer back.

client_app = ClientApp()
_sites: dict[tuple[str, str], Site] = {}  # (name, state-dir) -> Site, without a worker (tests: several)


def site(context: Context) -> Site:
    """The Site a SuperNode's node config describes (client, data-file, state-dir), in this process."""
    nc = context.node_config
    key = (str(nc["client"]), str(nc["state-dir"]))
    if key not in _sites:
        _sites[key] = Site(key[0], str(nc["data-file"]), key[1])
    return _sites[key]


def answer(kind: str, msg: Message, context: Context) -> dict[str, Any]:
    """The site's answer to `msg`: from its worker where the node config names one, else from this process."""
    cfg = load_run_config(context.run_config)
    global_state = received(msg) if "global" in msg.content else {}
    task = dict(msg.content["task"]) if "task" in msg.content else {}
    if "worker" in context.node_config:
        return ask_worker(str(context.node_config["worker"]), (kind, context.run_id, cfg, global_state, task))
    return site(context).answer(kind, context.run_id, cfg, global_state, task)


def received(msg: Message) -> dict[str, torch.Tensor]:
    """The global state a message carries (see packed)."""
    return unpacked(msg.content)


def packed(state: dict[str, torch.Tensor]) -> dict[str, ArrayRecord | ConfigRecord]:
    """A global state as a message carries it: "global", one flat array per dtype, and "global-layout",
    the keys, shapes and dtypes that cut it back into tensors (unpacked). Flower sends every array as an
    object of its own, one request each, hop by hop: an adapter on seven projections is 400 arrays or
    more, which took longer to cross loopback than the site took to train."""
    keys = sorted(state)
    dtypes = [str(state[k].dtype).removeprefix("torch.") for k in keys]
    flats = {
        d: torch.cat([state[k].reshape(-1) for k, kd in zip(keys, dtypes, strict=True) if kd == d])
        for d in dict.fromkeys(dtypes)
    }
    layout = {"keys": keys, "shapes": [",".join(str(n) for n in state[k].shape) for k in keys], "dtypes": dtypes}
    return {"global": ArrayRecord(flats), "global-layout": ConfigRecord(layout)}


def unpacked(content: RecordDict) -> dict[str, torch.Tensor]:
    """The state packed() put in `content` (an empty one: stack's first round). Raises ValueError,
    KeyError or TypeError where the layout and the arrays disagree (a reply that is refused, not read)."""
    layout, record = content["global-layout"], content["global"]
    keys, shapes, dtypes = list(layout["keys"]), list(layout["shapes"]), list(layout["dtypes"])
    if not len(keys) == len(shapes) == len(dtypes):
        raise ValueError(f"a layout of {len(keys)} keys, {len(shapes)} shapes and {len(dtypes)} dtypes")
    flats = record.to_torch_state_dict() if len(record) else {}
    state, used = {}, dict.fromkeys(flats, 0)
    for key, shape, dtype in zip(keys, shapes, dtypes, strict=True):
        dims = [int(n) for n in str(shape).split(",") if n]
        n, flat = math.prod(dims), flats[dtype]
        if used[dtype] + n > flat.numel():
            raise ValueError(f"the {dtype} array is too short for the layout ({key})")
        state[key] = flat[used[dtype] : used[dtype] + n].reshape(dims).clone()
        used[dtype] += n
    if any(used[d] != flats[d].numel() for d in flats):
        raise ValueError("an array is longer than the layout")
    return state


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this site is: its name, training examples and fresh global adapter (Site.answer)."""
    got = answer("query", msg, context)
    info = ConfigRecord({"client": got["client"], "num-examples": got["num-examples"]})
    return Message(content=RecordDict({"site": info, **packed(got["global"])}), reply_to=msg)


@client_app.train()
def fit(msg: Message, context: Context) -> Message:
    """One round's training: the global adapter in, the trained global adapter and the sample count out."""
    got = answer("train", msg, context)
    metrics = MetricRecord({"num-examples": got["num-examples"], "train-loss": got["train-loss"]})
    return Message(content=RecordDict({**packed(got["global"]), "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The views' metrics on this site's eval split, with its local state as of the message's round."""
    rows = answer("evaluate", msg, context)["metrics"]
    content = RecordDict(
        {view: MetricRecord({k: v for k, v in m.items() if v is not None}) for view, m in rows.items()}
    )
    return Message(content=content, reply_to=msg)


# ----------------------------------------------------------------------------------------------------
# The warm site: one process per site that holds the Site for the whole run and answers the ClientApp
# over a Unix socket in its state-dir that only its owner can open; it starts the site's SuperNode and
# stops with it (and the SuperNode with it: a killed worker takes its node down, the site fails that
# round like any site that leaves, and when started again it resumes from its state-dir).

PROTOCOL = 1  # what a request and an answer hold; a ClientApp and a worker of other versions refuse each other


def write_frame(sock: socket.socket, obj: Any) -> None:
    """Send `obj` (tensors, numbers, strings, lists, dicts) as torch.save's bytes, length first."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    sock.sendall(len(buf.getbuffer()).to_bytes(8, "big") + buf.getbuffer())


def read_frame(sock: socket.socket) -> Any:
    """What write_frame sent, read with weights_only=True (tensors and plain containers only)."""

    def exactly(n: int) -> bytes:
        chunks = []
        while n:
            chunk = sock.recv(min(n, 1 << 20))
            if not chunk:
                raise ConnectionError("the other side closed the connection mid-message")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    return torch.load(io.BytesIO(exactly(int.from_bytes(exactly(8), "big"))), weights_only=True)


def ask_worker(path: str, request: tuple) -> dict[str, Any]:
    """The worker's answer to `request` (kind, run id, config, global state, task); raises what it raised."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError as e:
            raise ConnectionError(f"the site's worker at {path} does not answer ({e}): is the site running?") from None
        write_frame(sock, (PROTOCOL, *request))
        status, got = read_frame(sock)
    if status != "ok":
        raise RuntimeError(f"site worker: {got}")
    return got


def serve(site: Site, listener: socket.socket, alive: Callable[[], bool]) -> None:
    """Answer the ClientApp's requests, one at a time, while alive(); a request that fails is answered
    with its error (the site fails that message; the worker goes on)."""
    listener.settimeout(1.0)
    while alive():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(600)  # reading the request and writing the answer; a stuck ClientApp is let go
            t0, kind = time.time(), "?"
            try:
                version, kind, run_id, cfg, global_state, task = read_frame(conn)
                if version != PROTOCOL:
                    raise ValueError(f"the ClientApp speaks protocol {version}, this site {PROTOCOL}: update the site")
                reply = ("ok", site.answer(kind, run_id, cfg, global_state, task))
                what = f"{kind}" + (f", round {task['round']}" if "round" in task else "")
            except Exception as e:  # the message fails, never the site
                reply, what = ("error", f"{type(e).__name__}: {e}"), f"{kind} failed ({type(e).__name__}: {e})"
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
            n = f"{site.answered} message{'s' * (site.answered != 1)}"
            print(f"site {site.name}: {what} in {time.time() - t0:.1f}s (run {site.run_id}: base loaded once, {n} "
                  f"answered; peak memory {peak:.0f} MiB)", flush=True)  # fmt: skip
            try:
                write_frame(conn, reply)
            except OSError:  # the ClientApp is gone (its SuperNode stopped it): nothing to answer
                pass


def listen(path: str) -> socket.socket:
    """A Unix socket at `path` that only this user can open (mode 0600); ConfigError if another worker
    answers there or the path is too long for a socket."""
    if len(os.fsencode(path)) > 100:
        raise C.ConfigError(f"--state-dir: {path} is too long a path for a Unix socket: use a shorter state-dir")
    if os.path.exists(path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
                raise C.ConfigError(f"--state-dir: a site is already running there (its worker answers at {path})")
            except OSError:
                os.unlink(path)  # left by a worker that was killed
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)  # created 0600: no window in which another user could connect
    try:
        listener.bind(path)
    finally:
        os.umask(umask)
    listener.listen(8)
    return listener


def site_command(argv: list[str] | None = None) -> None:
    """`python flower_app.py --client fr --data-file F --state-dir D [flower-supernode options]`: a warm
    site. Starts the worker (this process) and the site's SuperNode with the node config that points
    its ClientApp at the worker; runs until the SuperNode stops (or this process gets SIGTERM/SIGINT)."""
    import argparse

    ap = argparse.ArgumentParser(
        description="A Flower site that loads its base model once per run. Every option not listed here "
        "goes to flower-supernode (--superlink, --root-certificates or --insecure, --auth-... ).",
    )
    ap.add_argument("--client", required=True, help="the site's name, e.g. fr (a name in data.clients)")
    ap.add_argument("--data-file", required=True, help="the site's data, e.g. /data/fr.json")
    ap.add_argument("--state-dir", required=True, help="where the site keeps its local adapter, round by round")
    args, supernode_args = ap.parse_known_args(argv)
    if any(a.startswith("--node-config") for a in supernode_args):
        C.fail("--node-config: set by this command (client, data-file, state-dir and the worker's socket)")
    if not os.path.isfile(args.data_file):
        C.fail(f"--data-file: {args.data_file}: no such file")
    state_dir = os.path.abspath(args.state_dir)
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, "site.sock")
    try:
        listener = listen(path)
    except C.ConfigError as e:
        C.fail(e)
    data_file = os.path.abspath(args.data_file)
    node_config = f"client='{args.client}' data-file='{data_file}' state-dir='{state_dir}' worker='{path}'"
    exe = os.path.join(os.path.dirname(sys.executable), "flower-supernode")
    argv = [exe if os.path.isfile(exe) else "flower-supernode", *supernode_args, "--node-config", node_config]
    supernode = subprocess.Popen(argv, preexec_fn=die_with_parent if sys.platform == "linux" else None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the finally below stops the SuperNode
    print(f"site {args.client}: worker {os.getpid()} on {path}, SuperNode {supernode.pid}; the base model "
          "loads at the run's first message and stays loaded for the run", flush=True)  # fmt: skip
    try:
        serve(Site(args.client, data_file, state_dir), listener, lambda: supernode.poll() is None)
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        if os.path.exists(path):
            os.unlink(path)
        if supernode.poll() is None:
            supernode.terminate()
            try:
                supernode.wait(timeout=30)
            except subprocess.TimeoutExpired:
                supernode.kill()
    sys.exit(supernode.returncode if supernode.returncode and supernode.returncode > 0 else 0)


def die_with_parent() -> None:
    """In the SuperNode's process, before it starts (Linux): SIGTERM it when the worker dies, even killed."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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
    where two claim one name. A site that restarts comes back as a new node and takes its place again.
    With no list of sites (`names` None: neither data.clients nor federated.sites), the run's sites are
    whoever answers: those at the start, and any that joins later, added to `names` as it is admitted."""

    def __init__(
        self, cfg: C.Config, fresh: Callable[[], tuple[dict[str, torch.Tensor], dict]], names: list[str] | None = None
    ) -> None:
        self.fresh, self.listed = fresh, names is not None  # fresh(): (the initial global adapter, its config)
        self.initial: dict[str, torch.Tensor] = {}
        self.adapter_config: dict[str, Any] = {}
        self.names = list(names or [])  # the run's sites: as listed, or in the order they were admitted
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
        replies = {r.metadata.src_node_id: r for r in exchange(grid, ask, timeout, self.build)}
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
            if name not in self.names:
                self.names.append(name)

    def build(self) -> None:
        """The initial global adapter, built once, here, from the config (no site's word), while the sites
        asked first load their bases."""
        if not self.initial:
            self.initial, self.adapter_config = self.fresh()

    def identify(self, content: RecordDict, key: bytes) -> tuple[str, int, str | None]:
        """(the site name a query answer claims, the training examples it declares, why the node cannot be
        that site or None)."""
        name, n = str(content["site"]["client"]), content["site"]["num-examples"]
        if self.listed and name not in self.names:
            return name, n, f"not a site of this run ({', '.join(self.names)})"
        if self.keys and self.keys.get(key) != name:
            owner = self.keys.get(key)
            return name, n, f"its key is {owner}'s in federated.sites" if owner else "its key is not in federated.sites"
        if type(n) is not int or n < 1:
            return name, n, f"declares {n!r} training examples, not a positive integer"
        if n != self.declared.get(name, n):
            return name, n, f"declares {n} training examples, {self.declared[name]} when it first joined"
        fresh = unpacked(content)
        why = fl_server.check_upload(fresh, self.initial)
        if why is None and not all(torch.allclose(fresh[k], v, rtol=1e-5, atol=1e-7) for k, v in self.initial.items()):
            why = "other values"
        if why:
            return name, n, f"its fresh global adapter is not the coordinator's ({why}): same base, lora, train.seed?"
        return name, n, None

    def gather(self, grid: Grid, timeout: float) -> None:
        """Ask until every listed site is admitted (with no list, until one is), for at most `timeout`
        seconds; then the run starts with the sites there, and a listed site still absent is named (it
        fails each round it is sampled in until it connects). ConfigError if no site is admitted."""
        deadline = time.time() + timeout
        while not self.nodes or (self.listed and not set(self.names) <= set(self.nodes)):
            if time.time() > deadline:
                break
            self.ask(grid, timeout)
            time.sleep(1)
        if not self.nodes:
            raise C.ConfigError(f"no site connected within federated.round_timeout ({timeout:.0f}s)")
        if missing := [c for c in self.names if c not in self.nodes]:
            print(f"  not connected after {timeout:.0f}s: {', '.join(missing)}; asked again every round, they "
                  "fail each round they are sampled in until then")  # fmt: skip
        if not self.listed:
            self.names.sort()


def exchange(
    grid: Grid, messages: list[Message], timeout: float, meanwhile: Callable[[], None] | None = None
) -> list[Message]:
    """Send `messages` (each to a node of its own) and return the replies that arrive within `timeout`
    seconds: Grid.send_and_receive, but asking for replies every half second rather than every 3 s, and
    running meanwhile() while the sites work."""
    if not messages:
        if meanwhile is not None:
            meanwhile()
        return []
    pending = dict(zip(grid.push_messages(messages), (m.metadata.dst_node_id for m in messages), strict=True))
    deadline = time.time() + timeout  # from the sending, as in send_and_receive
    if meanwhile is not None:
        meanwhile()
    replies: dict[int, Message] = {}
    while pending and time.time() < deadline:
        for reply in grid.pull_messages(list(pending)):
            replies.setdefault(reply.metadata.src_node_id, reply)
        pending = {i: node for i, node in pending.items() if node not in replies}
        if pending:
            time.sleep(0.5)
    return list(replies.values())


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
    if fc["benchmark"]:  # the coordinator holds no model; the simulation's clients do
        raise C.ConfigError(
            "federated.benchmark is scored in the simulation (federated.py); in a deployment, score a round's "
            "global adapter with: python infer.py config.yaml --benchmark mmlu --adapter <output_dir>/round_NNN/global"
        )
    out_dir, timeout = fc["output_dir"], float(fc["round_timeout"])
    resume = bool(context.run_config.get("resume", False))
    previous = checkpoints.check_output_dir(
        out_dir, resume, cfg["train"]["overwrite"], fl_server.RUN_FILES, fl_server.latest_round
    )
    if resume:  # a changed lr, aggregation, DP setting, client set...: refused in one line
        C.check_resume_config(os.path.join(fl_server.latest_round(out_dir), "config.yaml"), cfg)
    C.quiet_libraries()
    names = prepare.client_names(cfg["data"]["clients"] or []) or list(fc["sites"] or []) or None
    sites = Sites(cfg, lambda: prepare.fresh_adapter(cfg, "global"), names)
    sites.gather(grid, timeout)
    initial, adapter_cfg = sites.initial, sites.adapter_config
    nodes = sites.nodes
    fl_server.check_sampling(cfg, len(sites.names))
    checkpoints.clear_output_dir(out_dir, previous)
    checkpoints.save_yaml(cfg, os.path.join(out_dir, "config.yaml"))
    server = fl_server.Server(cfg, list(sites.names), initial, dict(sites.declared))
    start = 1
    if resume:
        last = fl_server.latest_round(out_dir)
        start = fl_server.load_round(last, server)["round"] + 1  # tensors, numbers, names only: weights_only
        print(f"resumed after {os.path.basename(last)}")
    logger = C.Logger(out_dir)
    print(f"{len(sites.names)} sites ({', '.join(sites.names)}), mode {fc['mode']}, aggregation {fc['aggregation']}, "
          f"{fc['rounds']} rounds")  # fmt: skip
    views = ["global"] if fc["mode"] == "global_only" else list(fl_client.VIEWS)
    for rnd in range(start, fc["rounds"] + 1):
        if stop := server.over_budget(rnd):
            print(stop)
            break
        t0 = time.time()
        sites.ask(grid, timeout)  # a site back after a restart, or (no list of sites) a new one
        for name, n in sites.declared.items():  # the sites admitted so far
            if name not in server.clients:
                server.join(name, n)
                print(f"  site {name} joined: sampled from round {rnd} on")
            server.declared.setdefault(name, n)  # a site of a resumed run, back
        tasks = server.tasks(rnd)
        msgs = [
            Message(
                RecordDict({**packed(server.global_state), "task": ConfigRecord(task)}),
                dst_node_id=nodes[c],
                message_type="train",
            )
            for c, task in tasks
            if c in nodes
        ]
        got = {r.metadata.src_node_id: r for r in exchange(grid, msgs, timeout)}
        replies, failed, malformed = {}, [], {}
        for client, _ in tasks:
            reply = got.get(nodes[client]) if client in nodes else None
            if reply is None or reply.has_error():
                why = "no answer within federated.round_timeout" if reply is None else reply.error.reason
                why = why if client in nodes else "not connected"
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
        silent = {c for c, _ in tasks if c in nodes and nodes[c] not in got}  # gone, likely: asked again once back
        rows, rejected = evaluate_sites(
            grid, {c: n for c, n in nodes.items() if c not in silent}, server.global_state, rnd, timeout, views
        )
        summary = fl_server.round_summary(
            rnd, tasks, failed, ok, t0, t_train, server.epsilon(rnd), server.report, rejected
        )
        fl_server.report_round(logger, rnd, fc["rounds"], views, rows, summary, t_train)
        fl_server.save_round(out_dir, rnd, server, adapter_cfg, cfg)
        records = C.read_jsonl(os.path.join(out_dir, "metrics.jsonl"))  # a torn last line: skipped
        fl_server.plot(out_dir, records, views)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"done; checkpoints in {out_dir}; the coordinator's peak memory {peak:.0f} MiB")


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
            RecordDict({**packed(global_state), "task": ConfigRecord({"round": rnd})}),
            dst_node_id=i,
            message_type="evaluate",
        )
        for i in nodes.values()
    ]
    replies = {r.metadata.src_node_id: r for r in exchange(grid, msgs, timeout)}
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


if __name__ == "__main__":
    site_command()
