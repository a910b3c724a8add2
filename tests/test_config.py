"""config.py: defaults, overrides, the one-line errors, and config.yaml / README kept in step with DEFAULTS."""

import os
import re

import pytest
import yaml

import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")


def test_config_defaults_file_and_overrides(tmp_path):
    assert C.load_config(CONFIG, ["train.lr=1e-4"])["train"]["lr"] == 1e-4  # YAML reads 1e-4 as a str
    cfg = C.load_config(
        CONFIG,
        [
            "train.lr=1",
            "lora.target_modules=[q_proj, v_proj]",
            "data.eval_file=null",
            "lora.use_dora=true",
            "data.system_prompt=Be brief.",
        ],
    )
    assert cfg["train"]["lr"] == 1.0 and isinstance(cfg["train"]["lr"], float)
    assert cfg["lora"]["target_modules"] == ["q_proj", "v_proj"] and cfg["lora"]["use_dora"] is True
    assert cfg["data"]["system_prompt"] == "Be brief." and cfg["data"]["eval_file"] is None
    assert cfg["model"]["name_or_path"] == "tiny"
    assert C.load_config(CONFIG, ["lora.target_modules=all-linear"])["lora"]["target_modules"] == "all-linear"
    partial = tmp_path / "partial.yaml"
    partial.write_text("lora:\n  r: 4\n")
    cfg = C.load_config(str(partial))
    assert cfg["lora"]["r"] == 4 and cfg["train"] == C.DEFAULTS["train"]  # the rest are defaults


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key train.lrr; did you mean train.lr?"),
        ("lora.rank=4", "unknown key lora.rank; did you mean lora.r?"),
        ("lora.r=0", "lora.r: must be >= 1, got 0"),
        ("lora.dropout=1.0", r"lora.dropout: must be in \[0, 1\), got 1.0"),
        ("train.lr=0", "train.lr: must be > 0, got 0"),
        ("train.lr=fast", "train.lr: expected float, got str 'fast'"),
        ("lora.use_dora=3", "lora.use_dora: expected bool, got int 3"),
        ("model.quantization=int3", "model.quantization: 'int3' is not one of nf4, fp4, none"),
        ("federated.mode=solo", "federated.mode: 'solo' is not one of alternating, joint, global_only"),
        ("train.lr", "override 'train.lr': expected section.key=value"),
        ("train.batch_size=big", "train.batch_size: expected int or auto, got str 'big'"),
        ("lora.target_modules=q_proj", "lora.target_modules: expected list or all-linear, got str 'q_proj'"),
        ("lora.target_modules=[]", r"lora.target_modules: must be a non-empty list or all-linear, got \[\]"),
        ("train.grad_accum=auto", "train.grad_accum: expected int, got str 'auto'"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(CONFIG, [override])


def test_config_file_errors(tmp_path):
    with pytest.raises(C.ConfigError, match="nope.yaml: config file not found"):
        C.load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  lr: 1\n")
    with pytest.raises(C.ConfigError, match="'trian' is not a section .*did you mean train"):
        C.load_config(str(bad))
    bad.write_text("train: [1, 2\n")
    with pytest.raises(C.ConfigError, match="invalid YAML"):
        C.load_config(str(bad))


# ---------------------------------------------------------------- the documentation agrees with DEFAULTS


def readme_config_keys():
    """The `section.key` names in the first column of the README's config reference table."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Config reference\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [key for row in rows for key in re.findall(r"`([a-z_]+\.[a-z_0-9]+)`", row.split("|")[1])]


def test_config_yaml_sets_every_key_to_its_default():
    with open(CONFIG) as f:
        raw = yaml.safe_load(f)
    in_file = [f"{section}.{name}" for section, values in raw.items() for name in values]
    assert in_file == C.keys()  # every key, once, in DEFAULTS' order
    differ = {
        key
        for key in C.keys()
        if raw[key.split(".")[0]][key.split(".")[1]] != C.DEFAULTS[key.split(".")[0]][key.split(".")[1]]
    }
    assert differ == {"data.clients"}  # the demo's client files; the built-in default is null (split train_file)


def test_readme_documents_every_key_once():
    documented = readme_config_keys()
    assert sorted(documented) == sorted(C.keys()), (
        f"missing from the README: {sorted(set(C.keys()) - set(documented))}; "
        f"not a key: {sorted(set(documented) - set(C.keys()))}"
    )


def test_every_checked_key_exists():
    """CHOICES, RULES, WORDS and NULLABLE name real keys (a typo there would silently check nothing)."""
    for table in (C.CHOICES, C.RULES, C.WORDS, C.NULLABLE):
        assert set(table) <= set(C.keys())
