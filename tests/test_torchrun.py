"""`torchrun --nproc_per_node 2 train.py` on the CPU (gloo, loopback): two processes train the adapter that one
process trains with grad_accum doubled; only rank 0 writes or prints; a killed run resumes exactly; a resume
with another number of processes is refused."""

import json
import math
import os
import signal
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import checkpoints
import distributed
import lora
import model as M
import train
from conftest import run_main, seconds
from test_train import small_run as train_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs train.main() as torchrun's worker, with two test hooks. On ranks other than 0 an audit hook notes
# every file this process creates, opens for writing, renames or deletes under the output directory, and the
# worker fails at the end if there was one. CRASH_AT_STEP=N SIGKILLs rank 1 as it begins step N, as a lost
# machine would: its peer, blocked in the step's all-reduce, is stopped by torchrun.
WORKER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
import trainer

out_dir, rank, written = {out_dir!r}, int(os.environ["RANK"]), []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def audit(event, args):
    if event == "open":
        path, mode, flags = args
        writes = set(mode or "") & set("wax+") if mode is not None else flags & WRITE_FLAGS
    else:
        path, writes = args[0], event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree")
    if writes and isinstance(path, (str, bytes, os.PathLike)):
        if os.path.abspath(os.fsdecode(path)).startswith(out_dir):
            written.append(f"{{event}} {{os.fsdecode(path)}}")

if rank != 0:
    sys.addaudithook(audit)
crash_at, calls, real_step = int(os.environ.get("CRASH_AT_STEP", 0)), [], trainer.train_step

def train_step(*args, **kwargs):
    calls.append(1)
    if rank == 1 and len(calls) == crash_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(*args, **kwargs)

trainer.train_step = train_step
train.main(sys.argv[1:])
if written:
    sys.exit(f"rank {{rank}} wrote under the output directory: {{written}}")
"""


def small_run(cache_dir, out_dir, *extra):
    """test_train's run of 6 steps (checkpoints at 3 and 6), all checkpoints kept, short eval answers."""
    return train_run(cache_dir, out_dir, "train.keep_checkpoints=5", "train.eval_max_new_tokens=4", *extra)


def torchrun(tmp_path, name, argv, crash_at_step=0, timeout=300):
    """torchrun --nproc_per_node 2 of WORKER (train.main) on argv; returns (exit code, rank 0's output,
    rank 1's output, torchrun's own stderr). The launcher and its workers form one process group,
    killed whatever happens."""
    out_dir = argv[2].split("=", 1)[1]
    worker = tmp_path / f"{name}_worker.py"
    worker.write_text(WORKER.format(root=ROOT, out_dir=os.path.abspath(out_dir)))
    logs = tmp_path / f"{name}_logs"
    cmd = [sys.executable, os.path.join(ROOT, "tests", "torchrun_local.py"), "--nproc_per_node", "2"]
    cmd += ["--max-restarts", "0", "--log-dir", str(logs), "--redirects", "3", str(worker), *argv]
    env = {**os.environ, "CRASH_AT_STEP": str(crash_at_step)}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=seconds(timeout))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    [attempt] = list(logs.glob("*/attempt_0"))

    def output(rank):
        return "".join((attempt / str(rank) / f).read_text() for f in ("stdout.log", "stderr.log"))

    return proc.returncode, output(0), output(1), err


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def adapter(path):
    return lora.read_adapter(str(path))[1]


@pytest.mark.parametrize("packing", [False, True])
def test_two_processes_train_what_one_trains_with_grad_accum_doubled(packing, cache_dir, tmp_path, capsys):
    """fp32, dropout 0: rank r takes micro-batches r, r + 2, ... of the shared order, so each step sees the
    same 8 sequences as one process taking 2 micro-batches of 4. A missing all-reduce (each rank stepping on
    its half) changes the adapters; a gradient counted twice leaves AdamW's step nearly unchanged (it is
    scale-free) but doubles the gradient norm logged at each step, compared here too. Packed, each rank
    packs the micro-batches it is dealt, as one process packs each of its own."""
    fp32 = (
        "model.compute_dtype=float32",
        "lora.dropout=0",
        f"data.packing={str(packing).lower()}",
        "data.max_seq_len=64",
    )
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_main(train.main, small_run(cache_dir, one, *fp32, "train.grad_accum=2"), capsys)[0] == 0
    code, rank0, rank1, err = torchrun(tmp_path, "two", small_run(cache_dir, two, *fp32, "train.grad_accum=1"))
    assert code == 0, err + rank0 + rank1

    for sub in ("adapter", "checkpoints/step_000003/adapter"):
        a, b = adapter(two / sub), adapter(one / sub)
        assert a.keys() == b.keys()
        for k in a:
            rel = ((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item()
            assert rel <= 1e-5, (sub, k, rel)
    steps_two, steps_one = metrics(two), metrics(one)
    assert [e.keys() for e in steps_two] == [e.keys() for e in steps_one]
    for e2, e1 in zip(steps_two, steps_one, strict=True):
        for k in ("loss", "grad_norm", "lr", "eval_loss", "exact_match"):
            if k in e1:
                assert abs(e2[k] - e1[k]) <= 1e-5 * max(abs(e1[k]), 1e-3), (e1["step"], k, e2[k], e1[k])
    assert sum("loss" in e for e in steps_two) == 6 and sum("eval_loss" in e for e in steps_two) == 3

    # rank 0 speaks for both; rank 1 printed nothing and (WORKER's audit) wrote nothing
    assert "batch: 8 sequences per optimizer step = 4 (train.batch_size) x 1 (train.grad_accum) x 2 processes" in rank0
    assert "step 6: eval_loss" in rank0 and "adapter saved to" in rank0
    assert rank1 == ""
    assert sorted(os.listdir(two)) == ["adapter", "checkpoints", "config.yaml", "metrics.jsonl"]


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(cache_dir, tmp_path, capsys):
    """Dropout on (each rank draws its own masks, restored from the checkpoint) and grad_accum 2 (two
    micro-batches per rank per step). Rank 1 dies as step 5 begins; step 3 was the last checkpoint."""
    extra = ("train.grad_accum=2", "lora.use_dora=true")
    full, cut = tmp_path / "full", tmp_path / "cut"
    code, _, _, err = torchrun(tmp_path, "full", small_run(cache_dir, full, *extra))
    assert code == 0, err
    code, rank0, _, err = torchrun(tmp_path, "cut", small_run(cache_dir, cut, *extra), crash_at_step=5)
    assert code != 0 and "step 4: loss" in rank0 and "step 5: loss" not in rank0, err
    assert sorted(os.listdir(cut / "checkpoints")) == ["step_000003"] and not (cut / "adapter").exists()

    # one process cannot continue what two began: refused in one line, nothing written
    before = sorted(str(p.relative_to(cut)) for p in cut.rglob("*"))
    code, out, err = run_main(train.main, small_run(cache_dir, cut, *extra) + ["--resume"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "step_000003 was written by 2 processes and this run has 1" in err
    assert "torchrun --nproc_per_node 2" in err
    assert sorted(str(p.relative_to(cut)) for p in cut.rglob("*")) == before

    code, rank0, rank1, err = torchrun(tmp_path, "resume", small_run(cache_dir, cut, *extra) + ["--resume"])
    assert code == 0 and "resumed from" in rank0 and rank1 == "", err
    for sub in ("adapter", "checkpoints/step_000006/adapter"):
        a, b = adapter(full / sub), adapter(cut / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    losses = {e["step"]: e["loss"] for e in metrics(full) if "loss" in e}
    assert {e["step"]: e["loss"] for e in metrics(cut) if "loss" in e and e["step"] > 3} == {
        s: v for s, v in losses.items() if s > 3
    }


def grads_of(rank):
    """Rank r's gradients for two parameters; rank 0 has none for the second (as a layer that got no input)."""
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(3, 2, generator=g), torch.randn(4, generator=g) if rank else None]


def collectives(rank, store, out):
    """One of two gloo processes (rendezvous through a file, no listening port): the data-parallel helpers."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = f"file://{store}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(rank)
        params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
        for p, g in zip(params, grads_of(rank), strict=True):
            p.grad = g
        loss = distributed.sync_gradients(params, 0.25 + rank)
        grads = [p.grad.clone() for p in params]
        nan_step = distributed.sync_gradients(params, math.inf if rank else 0.5)  # rank 1 met a NaN/inf loss
        result = {
            "grads": grads,
            "loss": loss,
            "nan_step": nan_step,
            "sum": distributed.all_sum([1.5, rank]),
            "min": distributed.all_min(7 - 3 * rank),
            "rank_and_world": distributed.rank_and_world(),
            "rng": distributed.all_gather(checkpoints.rng_state()),
            "own_rng": torch.get_rng_state(),
        }
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_the_collectives_sum_gradients_share_a_nan_and_agree_on_the_batch_size(tmp_path):
    """sync_gradients against the plain sum of both ranks' gradients (a missing one counts as zeros), its loss
    summed and an inf on one rank seen by both (so both skip the step); all_sum, all_min, all_gather of RNGs."""
    mp.start_processes(collectives, (str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    (a, _), (b, c) = grads_of(0), grads_of(1)
    want = [a + b, c]
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for rank, r in enumerate(results):
        assert all(torch.equal(g, w) for g, w in zip(r["grads"], want, strict=True))
        assert r["loss"] == 1.5 and r["nan_step"] == math.inf
        assert r["sum"] == [3.0, 1.0] and r["min"] == 4 and r["rank_and_world"] == (rank, 2)
        assert [s["torch"].tolist() for s in r["rng"]] == [q["own_rng"].tolist() for q in results]
    assert results[0]["own_rng"].tolist() != results[1]["own_rng"].tolist()


def test_a_device_the_processes_cannot_share_is_refused(monkeypatch):
    """Only reachable with GPUs, so the device is faked: a pinned GPU or mps for every process, or more
    processes on a machine than it has GPUs."""
    monkeypatch.setattr(distributed.M, "resolve_device", torch.device)
    for name in ("cuda:1", "mps"):
        with pytest.raises(M.ModelError, match=f"model.device: {name} cannot be shared by torchrun's processes"):
            distributed.start_data_parallel(name)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(M.ModelError, match="local rank 2 but this machine has 2 GPUs; lower --nproc_per_node"):
        distributed.start_data_parallel("cuda")
    assert not dist.is_initialized()
