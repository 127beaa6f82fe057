"""Installs that reproduce, checked without building anything: the hash-pinned locks agree with
requirements.txt, setup.cfg's extras give exactly one TensorFlow, the Dockerfile's stages (a
builder with compilers, a non-root runtime without them), the .dockerignore, and, where the
package index answers, pip itself resolving the locks and the extras."""
from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCKS = REPO / "requirements"
# what pip reads here besides the lock: nothing (no site mirror or local wheel folder, whose
# rebuilt wheels would not match PyPI's hashes)
PYPI_ONLY = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "",
             "PIP_INDEX_URL": "https://pypi.org/simple"}


def name(text: str) -> str:
    """PEP 503 normalised name, extras dropped."""
    return re.sub(r"[-_.]+", "-", text.split("[", 1)[0]).lower()


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-\[\],]+)==([^\s;\\]+)", line)
        if match:
            found[name(match.group(1))] = match.group(2)
    return found


def lock_entries(path: Path) -> dict[str, list[str]]:
    """name -> its sha256 hashes, for every 'name==version \\ --hash=...' block of a lock."""
    text = path.read_text()
    entries = {}
    for block in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)((?: \\\n\s+--hash=sha256:[0-9a-f]{64})*)", text, re.M):
        entries[name(block.group(1))] = re.findall(r"sha256:([0-9a-f]{64})", block.group(3))
    return entries


def stack_value(variable: str) -> str:
    result = subprocess.run(["sh", "-c", f". scripts/stack-choice.sh && echo ${variable}"], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    return result.stdout.strip()


def test_the_locks_pin_every_requirement_at_its_version_with_hashes():
    wanted = pins(REPO / "requirements.txt")
    tf = stack_value("TF_VERSION")
    for variant in ("cpu", "gpu"):
        path = LOCKS / f"{variant}.lock"
        text = path.read_text()
        assert "made by scripts/lock.sh" in text.splitlines()[0], variant
        locked = pins(path)
        entries = lock_entries(path)
        assert set(entries) == set(locked), variant  # every pinned line is a hashed block
        assert all(entries.values()), [n for n, hashes in entries.items() if not hashes]
        expected = dict(wanted)
        if variant == "gpu":  # the one difference: tensorflow (CUDA wheels) for tensorflow-cpu
            del expected["tensorflow-cpu"]
            expected["tensorflow"] = tf
            assert "tensorflow-cpu" not in locked and locked.get("nvidia-cudnn-cu12")
        else:
            assert "tensorflow" not in locked
        disagree = {n: (v, locked.get(n)) for n, v in expected.items() if locked.get(n) != v}
        assert disagree == {}, f"{variant}.lock vs requirements.txt (run scripts/lock.sh): {disagree}"
        assert "horovod" not in locked  # built from source against the local MPI
    horovod = lock_entries(LOCKS / "horovod.lock")
    assert list(horovod) == ["horovod"] and pins(LOCKS / "horovod.lock")["horovod"] == stack_value("HOROVOD_VERSION")
    assert len(horovod["horovod"]) == 1  # its source distribution


def test_setup_and_the_image_install_the_locks_with_require_hashes():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert 'LOCK="requirements/$VARIANT.lock"' in setup and '--require-hashes -r "$LOCK"' in setup
    assert "--require-hashes --no-deps --no-binary horovod" in setup
    dockerfile = (REPO / "Dockerfile").read_text()
    assert '--require-hashes --no-deps -r "requirements/$variant.lock"' in dockerfile
    assert "--require-hashes --no-deps --no-binary horovod" in dockerfile


def test_the_extras_give_exactly_one_tensorflow():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    base = [line for line in config["options"]["install_requires"].splitlines() if line.strip()]
    assert not [line for line in base if name(line.split("=")[0].split("<")[0].split(";")[0]).startswith("tensorflow")]
    extras = config["options.extras_require"]
    tf = stack_value("TF_VERSION")
    one = {variant: [line.strip() for line in extras[variant].splitlines() if "tensorflow" in line]
           for variant in ("cpu", "gpu")}
    assert one == {"cpu": [f"tensorflow-cpu=={tf}"], "gpu": [f"tensorflow[and-cuda]=={tf}"]}


# ---------------------------------------------------------------- the Dockerfile and .dockerignore

def stages(text: str) -> dict[str, str]:
    parts = re.split(r"^FROM\s+", text, flags=re.M)
    found = {}
    for part in parts[1:]:
        header = part.splitlines()[0]
        found[header.split(" AS ")[-1].strip() if " AS " in header else header] = part
    return found


def test_the_dockerfile_builds_horovod_apart_and_runs_without_compilers_as_a_user():
    text = (REPO / "Dockerfile").read_text()
    head = text[:text.index("\nFROM ")]
    assert re.search(r"^ARG BASE_IMAGE=\S+", head, re.M)  # before the first FROM: usable in FROM lines
    built = stages(text)
    assert list(built) == ["builder", "runtime"]  # the last stage is the image
    builder, runtime = built["builder"], built["runtime"]
    assert built and "${BASE_IMAGE}" in builder.splitlines()[0]
    assert "build-essential" in builder and "pip wheel --no-build-isolation" in builder
    installs = " ".join(re.findall(r"apt-get install[^\n]*(?:\\\n[^\n]*)*", runtime))
    for compiler in ("build-essential", "cmake", "gcc", "g++", "clang", "-dev"):
        assert compiler not in installs, compiler
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert users and users[-1] not in ("root", "0")
    from launcher.kubeflow import USER_ID
    assert f"--uid {USER_ID}" in runtime and users[-1] in ("mpiuser", str(USER_ID))
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in text  # nothing runs as root any more
    for source in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", text, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"the Dockerfile copies {path}, which is not in the repository"


def test_the_dockerignore_keeps_the_venv_data_runs_and_secrets_out():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for entry in (".git", ".venv", "data", "runs", ".unet-train-cluster.token", "**/__pycache__"):
        assert entry in ignored, entry
    text = (REPO / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", text, re.M):
        for path in source.split():
            top = path.rstrip("/").split("/")[0]
            assert top not in ignored, f"{path} is copied but .dockerignore leaves it out"


# ---------------------------------------------------------------- pip itself, where the index answers

def _index_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10) as answer:
            return answer.status == 200
    except OSError:
        return False


needs_index = pytest.mark.skipif(not _index_reachable(), reason="https://pypi.org is not reachable from here")


@needs_index
def test_pip_accepts_lock_entries_with_require_hashes(tmp_path):
    """A few small entries of cpu.lock, exactly as written there, resolved and downloaded by pip in
    --require-hashes mode (hash mismatches fail here, as they would in setup.sh or the image)."""
    text = (LOCKS / "cpu.lock").read_text()
    blocks = [m.group(0) for m in re.finditer(
        r"^(?:pyyaml|tqdm|annotated-types)==\S+(?: \\\n\s+--hash=sha256:[0-9a-f]{64})+", text, re.M)]
    assert len(blocks) == 3
    subset = tmp_path / "subset.lock"
    subset.write_text("\n".join(blocks) + "\n")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
                             "--require-hashes", "-r", str(subset)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **PYPI_ONLY})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Would install" in result.stdout and "PyYAML-" in result.stdout


@pytest.mark.slow
@needs_index
@pytest.mark.parametrize("variant, tensorflow", [("gpu", "tensorflow"), ("cpu", "tensorflow-cpu")])
def test_pip_installs_one_tensorflow_per_extra(tmp_path, variant, tensorflow):
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--report", str(report), f".[{variant}]"], cwd=REPO, capture_output=True, text=True,
                            timeout=900, env={**os.environ, **PYPI_ONLY})
    assert result.returncode == 0, result.stderr[-3000:]
    names = [name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]]
    assert [n for n in names if n in ("tensorflow", "tensorflow-cpu", "tensorflow-intel")] == [tensorflow]
