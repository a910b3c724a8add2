# The modules live flat at the repository root; make them importable under plain `pytest` too.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

import config  # noqa: E402
import lora  # noqa: E402
import model as M  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several pytest-xdist workers on this machine's cores:
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread each (and in the processes it starts), or their
    torch.set_num_threads(1)  # spinning OpenMP threads fight over the cores and everything runs slower


def pytest_addoption(parser):
    parser.addoption(
        "--superlink-delay", type=float, default=0.0, metavar="SECONDS",
        help="tests/test_flower.py: start each SuperLink this much later, as a slow machine would",
    )  # fmt: skip
    parser.addoption(
        "--time-scale", type=float, default=1.0, metavar="FACTOR",
        help="multiply the deadline of every process a test starts (and Flower's round timeouts) by this, on "
        "a machine (or an emulator) that many times slower",
    )  # fmt: skip


TIME_SCALE = 1.0  # pytest --time-scale


def pytest_configure(config):
    global TIME_SCALE
    TIME_SCALE = config.getoption("time_scale")


def seconds(s):
    """A deadline of s seconds on the machines the suite was written on, on this one (pytest --time-scale)."""
    return round(s * TIME_SCALE)


def pytest_collection_modifyitems(items):
    """The Flower deployments first: they spend minutes mostly waiting on the network, so with
    `pytest -n 3` (pytest-xdist) each gets a worker at once while the others run the rest beside them. Then
    the real model's tests (tests/test_real_model.py, the slowest to compute), then the rest."""
    items.sort(key=lambda item: ("deployment" not in item.fixturenames, "smollm2" not in item.fixturenames))


def run_main(main, argv, capsys):
    """An entry point's main(argv) in-process; returns (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def tiny_dir(cache_dir):
    """The tiny model's directory under a model.cache_dir, as train.py resolves model.name_or_path=tiny
    (built there on first use)."""
    return config.resolve_model_path({"model": {"name_or_path": "tiny", "cache_dir": cache_dir}})


@pytest.fixture(scope="module")
def client_files(tmp_path_factory):
    """The demo's client files fr, de and es cut to 40 records each (tests/test_bad_sites.py and
    test_sites.py): seconds per federated run."""
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = tmp_path_factory.mktemp("clients")
    for name in ("fr", "de", "es"):
        with open(os.path.join(root, "data/clients", f"{name}.json")) as f:
            (d / f"{name}.json").write_text(json.dumps(json.load(f)[:40]))
    return {name: str(d / f"{name}.json") for name in ("fr", "de", "es")}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A model.cache_dir holding the tiny default model, built once for the whole session."""
    d = str(tmp_path_factory.mktemp("cache"))
    tiny_dir(d)
    return d


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DORA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]  # fewer layers: PEFT's DoRA is slow to generate with


@pytest.fixture(scope="session")
def adapters(cache_dir, tmp_path_factory):
    """Adapter directories on the tiny base: lora, lora2, dora, lora_qv (q_proj and v_proj only) and
    other_base (made for a smaller Qwen2, whose layer names match but whose shapes do not)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("adapters")
    tiny = tiny_dir(cache_dir)
    out = {
        name: make_adapter(tiny, d / name, seed=seed, **kw)
        for name, seed, kw in [
            ("lora", 1, {}),
            ("lora2", 2, {}),
            ("dora", 3, {"use_dora": True, "targets": DORA_TARGETS}),
            ("lora_qv", 4, {"targets": ["q_proj", "v_proj"]}),
        ]
    }
    other = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    lora.inject(other, TARGETS, r=4, alpha=8)
    lora.save_adapter(other, d / "other_base")
    out["other_base"] = str(d / "other_base")
    return out


def make_adapter(base_path, out_dir, seed=1, use_dora=False, targets=TARGETS):
    """A random (as if trained) adapter on the base, saved in PEFT's format: quicker than training one."""
    model, _ = M.load_model(base_path, "none", torch.float32, "cpu", "auto", gradient_checkpointing=False)
    torch.manual_seed(seed)  # A's init: the same adapter in every session, whatever ran before
    lora.inject(model, targets, r=4, alpha=8, use_dora=use_dora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    lora.save_adapter(model, out_dir, base_model_name_or_path=base_path)
    return str(out_dir)
