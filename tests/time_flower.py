"""The serial simulation's wall time against the Flower deployment's, plain SuperNodes (Flower starts a
ClientApp process per message, which loads the base each time) and warm sites (`python flower_app.py
--client ...`: one load per site), one after the other on this machine, over loopback with TLS; the base
loads per site, and whether the three end with the same global adapter.

    python tests/time_flower.py [--threads N] [section.key=value ...]      # e.g. model.name_or_path=smollm2

--threads N: every process of the deployments (SuperLink, ServerApp, each site) runs N torch/OpenMP
threads (OMP_NUM_THREADS): 1 gives each of the two sites one of two cores, as if on a machine of its own.
Without it each site takes all the cores, and two sites on one machine oversubscribe them.

The job is tests/test_flower.py's (sites fr and de, 2 rounds of 2 local and 2 global steps, batch 4); a
deployment's time runs from `flwr run` to its end, with the SuperLink and the sites already up (their
bases load at the run's first message, inside that time). docs/flower.md has the figures.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_flower import CONFIG, ROOT, Deployment, job, make_certificates, tensors  # noqa: E402

SITES = ["fr", "de"]


def simulation(tmp: Path, extra: list[str]) -> tuple[float, Path]:
    out = tmp / "sim"
    t0 = time.time()
    argv = [sys.executable, os.path.join(ROOT, "federated.py"), CONFIG, *job(".cache", out, SITES, 3600), *extra]
    subprocess.run(argv, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.time() - t0, out


def deployment(tmp: Path, extra: list[str], warm: bool, threads: str | None) -> tuple[float, Path, dict[str, int]]:
    d = Deployment(tmp, make_certificates(tmp))
    if threads:
        d.env["OMP_NUM_THREADS"] = threads
    out = tmp / "dep"
    try:
        d.superlink()
        d.supernodes(SITES, tmp / "state", warm=warm)
        t0 = time.time()
        d.start_run([*job(os.path.join(ROOT, ".cache"), out, SITES, 3600), *extra])
        code, output = d.wait_run(timeout=7200)
        seconds = time.time() - t0
        assert code == 0, output
    finally:
        d.stop()
    loads = {s: (tmp / f"supernode_{s}.log").read_text().count(" loaded in ") for s in SITES}
    return seconds, out, loads


def main() -> None:
    extra, threads = sys.argv[1:], None
    if extra[:1] == ["--threads"]:
        threads, extra = extra[1], extra[2:]
    import config as C

    cfg = C.load_config(CONFIG, [f"model.cache_dir={os.path.join(ROOT, '.cache')}", *extra])
    print(f"base: {C.resolve_model_path(cfg)} (fetched or built before the clocks start)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for sub in ("cold", "warm"):
            (tmp / sub).mkdir()
        sim, sim_out = simulation(tmp, extra)
        cold, cold_out, cold_loads = deployment(tmp / "cold", extra, False, threads)
        warm, warm_out, warm_loads = deployment(tmp / "warm", extra, True, threads)
        same = all(
            all(torch.equal(a[k], b[k]) for k in a)
            for rnd in ("round_001", "round_002")
            for a, b in [(tensors(sim_out / rnd / "global"), tensors(o / rnd / "global")) for o in (cold_out, warm_out)]
        )
    setting = f"{' '.join(extra) or 'tiny model'}; deployments: {threads or 'all'} thread(s) per process"
    print(f"| run | wall time | x simulation | base loads per site |  ({setting})")
    print("| --- | --- | --- | --- |")
    print(f"| serial simulation (`federated.py`) | {sim:.0f} s | 1.00 | 1 (one process) |")
    print(f"| deployment, plain SuperNodes | {cold:.0f} s | {cold / sim:.2f} | {cold_loads} |")
    print(f"| deployment, warm sites | {warm:.0f} s | {warm / sim:.2f} | {warm_loads} |")
    print(f"same global adapters, both rounds, all three: {same}")


if __name__ == "__main__":
    main()
