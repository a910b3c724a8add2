# The modules live flat at the repository root; make them importable under plain `pytest` too.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


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
    import train

    return train.resolve_model_path({"model": {"name_or_path": "tiny", "cache_dir": cache_dir}})


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A model.cache_dir holding the tiny default model, built once for the whole session."""
    d = str(tmp_path_factory.mktemp("cache"))
    tiny_dir(d)
    return d
