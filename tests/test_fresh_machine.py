"""A user's first hour: the installed CLI, run from an empty folder with an empty HOME and
caches and no data directory, reads every named set from the copies shipped in the package, and
the wheel carries those copies."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import pytest

from wandacli.data.sources import NAMED_SETS, shipped_data_dir

REPO = Path(__file__).resolve().parents[1]


def installed_cli() -> list[str]:
    """The `wandacli` script installed beside this interpreter (what a user runs)."""
    script = Path(sys.executable).parent / "wandacli"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "wandacli"]


@pytest.fixture()
def fresh_user(tmp_path):
    """An empty working folder and an environment with empty HOME and caches, no data
    directory, and the hub switched off (tests never reach the network)."""
    home, cache, workdir = tmp_path / "home", tmp_path / "cache", tmp_path / "work"
    for folder in (home, cache, workdir):
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDACLI_")}
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(cache),
        HF_HOME=str(cache / "huggingface"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*installed_cli(), *args], cwd=workdir, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done

    return run, workdir


def shipped(name: str) -> tuple[str, str]:
    entry = next(e for e in NAMED_SETS if e.name == name)
    assert entry.shipped is not None
    path = shipped_data_dir() / entry.shipped
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_named_sets_come_from_the_shipped_files(fresh_user, tiny_llama_dir):
    run, workdir = fresh_user
    model = str(tiny_llama_dir)
    run(
        "score",
        "--method",
        "wanda",
        "--data",
        "align_short",
        "--nsamples",
        "2",
        "--model",
        model,
        "--store",
        "store",
        "--no-progress",
    )
    with h5py.File(workdir / "store" / "scores" / "wanda-align_short.h5", "r") as handle:
        data = json.loads(handle.attrs["meta"])["data"]
    assert (data["source"], data["sha256"]) == shipped("align_short")

    run(
        "eval-attack",
        "--model",
        model,
        "--prompts",
        "advbench",
        "--limit",
        "2",
        "--configs",
        "basic_nosys",
        "--max-new-tokens",
        "4",
        "--out",
        "attack",
        "--no-progress",
    )
    results = json.loads((workdir / "attack" / "results.json").read_text())
    settings = json.loads((workdir / "attack" / "settings.json").read_text())
    assert results["model_under_test"]["prompts"] == shipped("advbench")[0]
    assert settings["prompts_sha256"] == shipped("advbench")[1]

    run(
        "eval-utility",
        "--model",
        model,
        "--data",
        "wikitext",
        "--seqlen",
        "32",
        "--limit-windows",
        "2",
        "--out",
        "utility",
        "--no-progress",
    )
    utility = json.loads((workdir / "utility" / "utility.json").read_text())
    assert (utility["data"]["source"], utility["data"]["sha256"]) == shipped("wikitext")

    # Nothing was written outside the working folder's own outputs but caches.
    assert sorted(p.name for p in workdir.iterdir()) == ["attack", "store", "utility"]


@pytest.mark.slow
def test_the_wheel_carries_the_data_and_its_notices(tmp_path):
    """Build the wheel from a copy of the source tree (offline: no build isolation) and list
    it: every shipped file, its README and the licence notices are inside."""
    source = tmp_path / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "demo",
            "bench",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            "wandacli-store",
        ),
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("wandacli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"wandacli/datasets/{e.shipped}" for e in NAMED_SETS if e.shipped}
    expected |= {"wandacli/datasets/README.md", "wandacli/datasets/LICENSES.md"}
    assert expected <= names, expected - names
    for name in expected - {"wandacli/datasets/README.md", "wandacli/datasets/LICENSES.md"}:
        inside = zipfile.ZipFile(wheel).read(name)
        assert inside == (shipped_data_dir() / Path(name).name).read_bytes(), name
