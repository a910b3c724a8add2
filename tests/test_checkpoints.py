"""checkpoints.py and the run records: numeric order, safe loading, RNG round trips, crash leftovers."""

import glob
import os
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

import checkpoints
import config as C
import lora
import server as fl_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")


def put(name, text):
    """A write(tmp_dir) for write_atomically: one file."""
    return lambda d: open(os.path.join(d, name), "w").write(text)


# ---------------------------------------------------------------- order by number


def test_completed_orders_by_number_and_ignores_other_names(tmp_path):
    for name in ("round_1001", "round_999", "round_1000", "round_1000.old", "round_1002.tmp", "round_x", "round_"):
        (tmp_path / name).mkdir()
    assert checkpoints.completed(str(tmp_path), "round_") == ["round_999", "round_1000", "round_1001"]
    assert checkpoints.completed(str(tmp_path / "missing"), "round_") == []


def test_rounds_999_1000_1001_keep_the_two_newest(tmp_path):
    out = str(tmp_path)
    for rnd in (999, 1000, 1001):  # as save_round names them: round_{rnd:03d}
        checkpoints.write_atomically(os.path.join(out, f"round_{rnd:03d}"), put("n", str(rnd)))
        checkpoints.keep_latest(out, "round_", 2)
    assert fl_server.completed_rounds(out) == ["round_1000", "round_1001"]
    assert fl_server.latest_round(out) == os.path.join(out, "round_1001")


def test_step_999999_then_1000000_is_the_latest_checkpoint(tmp_path):
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(8, 4))
    lora.inject(model, ["q_proj"], r=2)
    lora.mark_trainable(model, ["default"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in (999_999, 1_000_000):
        checkpoints.save_checkpoint(str(tmp_path), step, model, optimizer, scaler, {}, "base", keep=1)
    assert os.listdir(tmp_path / "checkpoints") == ["step_1000000"]  # keep=1 kept the newer one
    ckpt, state = checkpoints.read_checkpoint(str(tmp_path), 1)
    assert ckpt == str(tmp_path / "checkpoints/step_1000000") and state["step"] == 1_000_000


# ---------------------------------------------------------------- nothing unpickled


def test_every_call_of_torch_load_in_the_project_reads_weights_only():
    """Regex over the source of every module and test: each call of torch's load passes weights_only=True
    (the call may span lines), the function is never passed around uncalled, and no line turns it off."""
    bad = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py"))):
        text = open(path).read()
        for m in re.finditer(r"\btorch\.load\b\s*", text):
            call = text[m.start() : closing_paren(text, m.end())]
            if not re.search(r"\bweights_only\s*=\s*True\b", call):
                bad.append(f"{os.path.relpath(path, ROOT)}:{text.count(chr(10), 0, m.start()) + 1}")
        for m in re.finditer(r"\bweights_only\s*=\s*False\b", text):
            bad.append(f"{os.path.relpath(path, ROOT)}:{text.count(chr(10), 0, m.start()) + 1}")
    assert not bad, f"loads that may unpickle objects at {', '.join(bad)}"


def closing_paren(text, i):
    """The index after the parenthesis that closes the one at text[i] (i itself if text[i] is no "(")."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return j + 1
    return len(text)


def draws():
    return torch.rand(4), np.random.standard_normal(3), [random.gauss(0, 1) for _ in range(3)], random.random()


def test_rng_state_is_plain_and_restores_every_generator_exactly(tmp_path):
    np.random.standard_normal(1), random.gauss(0, 1)  # both cache a second normal: part of the state too
    path = str(tmp_path / "rng.pt")
    torch.save(checkpoints.rng_state(), path)
    before = draws()
    checkpoints.set_rng_state(checkpoints.load_state(path))  # weights_only: tensors, numbers, strings only
    after = draws()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2:] == after[2:]


class NotATensor:
    pass


REFUSED = r"which a weights-only load refuses \(written by an older version\?\)"
TODO = "; delete the checkpoint directory that holds it to resume from the one before, or start over with "


@pytest.mark.parametrize(
    "case, what",  # what: a regex
    [
        ("truncated", r"unreadable \(truncated or corrupt\)"),
        ("garbage", r"unreadable \(truncated or corrupt\)"),
        ("empty", r"unreadable \(truncated or corrupt\)"),
        ("object", rf"holds test_checkpoints\.NotATensor, {REFUSED}"),
        ("numpy", rf"holds numpy\.(_)?core\.multiarray\._reconstruct, {REFUSED}"),  # numpy 2 says _core
        ("missing", "missing"),
    ],
)
def test_load_state_turns_any_failure_into_one_line(tmp_path, case, what):
    path = tmp_path / "state.pt"
    torch.save({"step": 3, "w": torch.ones(64)}, path)
    good = path.read_bytes()
    if case == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif case == "garbage":
        path.write_bytes(b"not a checkpoint " * 8)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "object":
        torch.save({"step": 3, "x": NotATensor()}, path)
    elif case == "numpy":
        torch.save({"rng": np.random.get_state()}, path)  # what state.pt held before rng_state was plain
    else:
        path.unlink()
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.load_state(str(path))
    expected = re.escape(f"{path}: ") + what + re.escape(TODO + "train.overwrite=true")
    assert re.fullmatch(expected, str(e.value)), str(e.value)


# ---------------------------------------------------------------- resume with the same math


def test_check_resume_config_lists_every_changed_key_and_defaults_missing_ones(tmp_path):
    cfg = C.load_config(CONFIG)
    saved = tmp_path / "config.yaml"
    checkpoints.save_yaml(cfg, str(saved))
    C.check_resume_config(str(saved), C.load_config(CONFIG, ["train.max_steps=1000", "federated.rounds=50"]))
    changed = C.load_config(CONFIG, ["train.lr=5e-4", "federated.aggregation=ffa", "lora.use_dora=true"])
    with pytest.raises(C.ConfigError) as e:
        C.check_resume_config(str(saved), changed)
    assert str(e.value) == (
        "--resume: the config changed in keys that change the math: train.lr 0.001 -> 0.0005, lora.use_dora "
        "false -> true, federated.aggregation fedavg -> ffa; resume with the saved values "
        f"({saved}) or start over with train.overwrite=true"
    )
    del cfg["federated"]["weighting"]  # an older version's config, written before the key existed
    checkpoints.save_yaml(cfg, str(saved))
    C.check_resume_config(str(saved), C.load_config(CONFIG))  # compared to the default: unchanged
    with pytest.raises(C.ConfigError, match=r"federated.weighting examples -> uniform; resume"):
        C.check_resume_config(str(saved), C.load_config(CONFIG, ["federated.weighting=uniform"]))


# ---------------------------------------------------------------- crash leftovers


def test_write_atomically_after_a_crash_between_its_renames(tmp_path):
    """A crash after final -> final.old but before tmp -> final: .old is the previous complete version, put
    back before the next write; with final in place, a leftover .old is stale and deleted."""
    final = tmp_path / "adapter"
    checkpoints.write_atomically(str(final), put("a", "v1"))
    final.rename(tmp_path / "adapter.old")  # the crash: no adapter/, only adapter.old/

    def crash(d):
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoints.write_atomically(str(final), crash)
    assert (final / "a").read_text() == "v1"  # the previous version is back under its name
    (tmp_path / "adapter.old").mkdir()  # a crash in the middle of deleting .old: a stale half copy
    checkpoints.write_atomically(str(final), put("a", "v2"))
    assert (final / "a").read_text() == "v2" and sorted(os.listdir(tmp_path)) == ["adapter"]


def test_a_torn_last_line_of_metrics_is_skipped_then_cut(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1, "loss": 0.5}\n{"round": 2, "lo')  # the crash came mid-write
    assert C.read_jsonl(str(path)) == [{"round": 1, "loss": 0.5}]
    logger = C.Logger(str(tmp_path))  # the resumed run
    logger.log(round=2, loss=0.25)
    logger.file.close()
    assert path.read_text() == '{"round": 1, "loss": 0.5}\n{"round": 2, "loss": 0.25}\n'
    assert C.read_jsonl(str(path)) == [{"round": 1, "loss": 0.5}, {"round": 2, "loss": 0.25}]
    path.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')  # not the last line: not a crash of ours
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: invalid JSON"):
        C.read_jsonl(str(path))
