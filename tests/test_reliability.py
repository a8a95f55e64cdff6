"""Fault injection: nothing finished is lost under kills, signals, full disks, damaged and
hostile files, and concurrent writers; nothing half-written is ever shown as complete.

Real processes are killed here, as users' jobs are: forked from a server that has already
imported torch and wandacli (tests/faults/forked.py) for the many kills and signals, fresh
`python -m wandacli` processes where the interpreter's start matters (HDF5's file-locking
variable, resource limits).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import interrupt_after
from tests.faults import forked
from tests.test_score_cli import assert_one_line_error
from wandacli.config.score import ScoreConfig
from wandacli.config.settings import ModelSpec
from wandacli.core.errors import NonFiniteScoresError
from wandacli.methods import wanda, wandg
from wandacli.models.loader import load_model
from wandacli.scoring.run import run_score
from wandacli.store.files import ScoreSet
from wandacli.store.lock import writer_lock

KILLS_PER_METHOD = 15  # 30 SIGKILLs in all across wanda and wandg


# ---------------------------------------------------------------------------------------------
# Helpers


def run_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "WANDACLI_QUIET": "1", **extra}


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "wandacli", *map(str, args)]


def score_command(model_dir, data, store, method, name="set", nsamples=12) -> list[str]:
    """A fresh `python -m wandacli score` process."""
    return cli_command(*score_args(model_dir, data, store, method, name, nsamples))


def score_args(model_dir, data, store, method, name="set", nsamples=12) -> list[str]:
    """The arguments of a quick resumable `score` run, checkpointing after every sample."""
    args = [
        "score",
        "--method",
        method,
        "--model",
        model_dir,
        "--data",
        data,
        "--nsamples",
        nsamples,
        "--seqlen",
        "128",
        "--store",
        store,
        "--name",
        name,
        "--checkpoint-every",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]
    if method == "wandg":
        args += ["--layers-per-pass", "1"]
    return [str(a) for a in args]


def arrays(path: Path) -> dict[str, np.ndarray]:
    with ScoreSet(path) as score_set:
        return {key: score_set.read(key) for key in score_set.keys}


def assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def leftovers(store: Path) -> list[Path]:
    """Temporary files, and parts of sets that are finished."""
    found = [p for p in store.rglob("*") if ".tmp-" in p.name]
    found += [p for p in (store / "scores").glob("*.parts")] if (store / "scores").is_dir() else []
    return found


def wait_for_lock(store: Path, process: Any, timeout: float = 120) -> bool:
    """True once the process holds a writer lock in the store (it is scoring), False if it
    ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any((store / ".locks").glob("*.json")):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("the process never took the store's lock")


def start(args: list[str], store: Path | None = None) -> forked.ForkedProcess:
    """`wandacli ARGS` in a process forked from the preloaded server (tests/faults/forked.py)."""
    if store is not None:
        for stale in (store / ".locks").glob("*.json"):  # a killed run's stale holder notes
            stale.unlink(missing_ok=True)
    return forked.ForkedProcess(args, run_env())


def run_forked(*args: Any, fault: str | None = None) -> subprocess.CompletedProcess:
    return forked.run([str(a) for a in args], run_env(), fault=fault)


def subprocess_magnitude_store(model_dir: Path, store: Path) -> None:
    """magnitude.h5 written by a real wandacli process (forked)."""
    args = [
        "score",
        "--method",
        "magnitude",
        "--model",
        model_dir,
        "--store",
        store,
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert run_forked(*args).returncode == 0


def magnitude_store(cli, model_dir: Path, store: Path) -> None:
    """A store holding one quick score set, magnitude.h5."""
    result = cli(
        "score",
        "--method",
        "magnitude",
        "--model",
        str(model_dir),
        "--store",
        str(store),
        "--no-progress",
    )
    assert result.exit_code == 0, result.stderr


def tree_digest(root: Path) -> str:
    """A checksum of every file's name and content under root, but the lock files in
    .locks/ (empty flock targets a refused writer may leave; never data)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and ".locks" not in path.relative_to(root).parts:
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# 1. SIGKILL at many moments, then the same command again


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wanda", "wandg"])
def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(
    method, tiny_llama_dir, pairs_csv, tmp_path
):
    clean_store = tmp_path / "clean"
    clean_store.mkdir()
    process = start(score_args(tiny_llama_dir, pairs_csv, clean_store, method), clean_store)
    assert wait_for_lock(clean_store, process)
    began = time.monotonic()
    assert process.wait() == 0, process.output()[1]
    work = time.monotonic() - began  # from taking the lock to the end: where kills should land
    clean = arrays(clean_store / "scores" / "set.h5")

    rng = random.Random(f"sigkill-{method}")  # kill moments sampled reproducibly
    store = tmp_path / "killed"
    store.mkdir()
    kills = attempts = 0
    while kills < KILLS_PER_METHOD:
        attempts += 1
        assert attempts < KILLS_PER_METHOD * 4, "runs kept finishing before the kill"
        process = start(score_args(tiny_llama_dir, pairs_csv, store, method), store)
        if wait_for_lock(store, process):
            time.sleep(rng.uniform(0, work * 1.1))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
        else:
            process.wait()
        final = store / "scores" / "set.h5"
        if final.exists():  # never a half-written set: it opens complete, and equals the clean one
            assert_identical(arrays(final), clean)
            if process.returncode != 0:  # killed after the rename, while cleaning up: rerun
                again = run_forked(*score_args(tiny_llama_dir, pairs_csv, store, method))
                assert again.returncode == 0, again.stderr
                assert "already complete, nothing to do" in again.stdout, again.stdout
            assert not leftovers(store), leftovers(store)
            # Finished: start the next chain of kills from scratch.
            shutil.rmtree(store)
            store.mkdir()
    resumed = run_forked(*score_args(tiny_llama_dir, pairs_csv, store, method))
    final = store / "scores" / "set.h5"
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(arrays(final), clean)
    assert not leftovers(store), leftovers(store)


# ---------------------------------------------------------------------------------------------
# 2. SIGINT and SIGTERM


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signal_number", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_sigint_and_sigterm_keep_work_and_say_how_to_resume(
    signal_number, code, word, tiny_llama_dir, tmp_path
):
    store = tmp_path / "store"
    store.mkdir()
    # 40 samples in two layer groups, a checkpoint after each sample: the signal goes out as
    # soon as the first checkpoint is written, with ~79 steps of work still to do.
    command = score_args(tiny_llama_dir, "align_short", store, "wandg", nsamples=40)
    process = start(command, store)
    assert wait_for_lock(store, process)
    parts = store / "scores" / "set.parts"
    deadline = time.monotonic() + 120
    while not list(parts.glob("accum-*.h5")) and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint was ever written"
        time.sleep(0.002)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived on this machine")
    assert process.returncode == code, stderr
    # One error line (align_short's long samples also give a warning that they were cut).
    lines = [
        line
        for line in stderr.strip().splitlines()
        if line.strip() and not line.startswith("warning:")
    ]
    assert len(lines) == 1 and lines[0].startswith(f"error: {word}: "), stderr
    assert "run the same command again" in lines[0]
    assert not [p for p in store.rglob("*") if ".tmp-" in p.name]
    assert run_forked(*command).returncode == 0
    clean = tmp_path / "clean"
    clean_run = run_forked(*score_args(tiny_llama_dir, "align_short", clean, "wandg", nsamples=40))
    assert clean_run.returncode == 0, clean_run.stderr
    assert_identical(arrays(store / "scores" / "set.h5"), arrays(clean / "scores" / "set.h5"))


# ---------------------------------------------------------------------------------------------
# 3. Kills during assembly and saving


def faulty(spec: str, *args) -> subprocess.CompletedProcess:
    """`wandacli ARGS`, SIGKILLed at the moment `spec` names (tests/faults/run_cli.py)."""
    return run_forked(*args, fault=spec)


@pytest.mark.slow
def test_kill_during_score_set_assembly_keeps_the_previous_set(tiny_llama_dir, tmp_path):
    store = tmp_path / "store"
    args = [
        "score",
        "--method",
        "random",
        "--model",
        tiny_llama_dir,
        "--store",
        store,
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert run_forked(*args).returncode == 0
    previous = arrays(store / "scores" / "random-seed0.h5")
    killed = faulty(
        "wandacli.store.assemble:set_root_attrs:1",
        *args,
        "--seed",
        "0",
        "--overwrite",
        "--name",
        "random-seed0",
    )
    assert killed.returncode == -signal.SIGKILL
    assert_identical(arrays(store / "scores" / "random-seed0.h5"), previous)  # intact
    fresh = faulty("wandacli.store.assemble:set_root_attrs:1", *args, "--name", "other")
    assert (
        fresh.returncode == -signal.SIGKILL and not (store / "scores" / "other.h5").exists()
    )  # none
    assert run_forked(*args, "--name", "other").returncode == 0
    assert not leftovers(store)


@pytest.mark.slow
def test_kill_during_mask_assembly_keeps_the_previous_mask(tiny_llama_dir, tmp_path):
    store = tmp_path / "store"
    subprocess_magnitude_store(tiny_llama_dir, store)
    prune = ["prune", "--store", store, "--scores", "magnitude", "--name", "m", "--no-progress"]
    assert run_forked(*prune, "-r", "0.5").returncode == 0
    before = (store / "masks" / "m.h5").read_bytes()
    killed = faulty("wandacli.removal.prune:set_root_attrs:1", *prune, "-r", "0.3", "--overwrite")
    assert killed.returncode == -signal.SIGKILL
    assert (store / "masks" / "m.h5").read_bytes() == before
    assert run_forked(*prune, "-r", "0.3", "--overwrite").returncode == 0
    assert not leftovers(store)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        ("wandacli.core.durable:replace_directory_atomically:1", "old"),  # killed before the swap
        ("wandacli.core.durable:_exchange:1:after", "new"),  # killed right after the swap
    ],
)
def test_kill_during_save_model_leaves_a_whole_model(spec, expect, tiny_llama_dir, tmp_path):
    store, out = tmp_path / "store", tmp_path / "pruned"
    subprocess_magnitude_store(tiny_llama_dir, store)
    prune = [
        "prune",
        "--store",
        store,
        "--scores",
        "magnitude",
        "--model",
        tiny_llama_dir,
        "--save-model",
        out,
        "--device",
        "cpu",
        "--no-progress",
        "--overwrite",
    ]
    assert run_forked(*prune, "-r", "0.2", "--name", "a").returncode == 0
    killed = faulty(spec, *prune, "-r", "0.6", "--name", "b")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    zeros = _zero_fraction(out)  # the directory at OUT loads as a whole model
    assert zeros == pytest.approx(0.2 if expect == "old" else 0.6, abs=0.02)
    assert run_forked(*prune, "-r", "0.6", "--name", "b").returncode == 0
    assert _zero_fraction(out) == pytest.approx(0.6, abs=0.02)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]


def _zero_fraction(directory: Path) -> float:
    loaded = load_model(ModelSpec(model=str(directory), device="cpu"))
    zeros = sum(int((lin.weight == 0).sum()) for lin in loaded.linear_layers)
    return zeros / sum(lin.weight.numel() for lin in loaded.linear_layers)


# ---------------------------------------------------------------------------------------------
# 4-5. Resuming with other settings; damaged parts and sets (in-process: fast)


@pytest.fixture()
def interrupted_wanda(cli, monkeypatch, tiny_llama_dir, pairs_csv, tmp_path):
    """A store holding an unfinished wanda set (5 of 8 samples, checkpoints every sample)."""
    store = tmp_path / "store"
    args = [
        "score",
        "--method",
        "wanda",
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(pairs_csv),
        "--nsamples",
        "8",
        "--seqlen",
        "128",
        "--store",
        str(store),
        "--name",
        "s",
        "--checkpoint-every",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]
    with monkeypatch.context() as patch:
        interrupt_after(patch, wanda.ActivationStatistics, 5)
        assert cli(*args).exit_code == 130
    return store, args


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--nsamples", "9"], "nsamples: 8 → 9"),
        (["--seed", "1"], "seed: 0 → 1"),
        (["--method", "wandg"], "method: wanda → wandg"),
        (["--data", "align_short"], "data: pairs → align_short"),
    ],
)
def test_resume_with_other_settings_is_refused(cli, interrupted_wanda, change, named):
    store, args = interrupted_wanda
    changed = list(args)
    flag, value = change
    if flag in changed:
        changed[changed.index(flag) + 1] = value
    else:
        changed += [flag, value]
    result = cli(*changed)
    # Other settings may warn first (align_short's samples are cut at --seqlen 128); the
    # error is one line, last.
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "other settings" in last and named in last, last
    assert (store / "scores" / "s.parts").is_dir()


def test_resume_with_another_model_is_refused(cli, interrupted_wanda, tiny_llama_wide_dir):
    store, args = interrupted_wanda
    changed = list(args)
    changed[changed.index("--model") + 1] = str(tiny_llama_wide_dir)
    assert_one_line_error(cli(*changed), "other settings", "model")


def test_truncated_checkpoint_is_named_and_recomputed(cli, interrupted_wanda, tmp_path):
    store, args = interrupted_wanda
    newest = sorted((store / "scores" / "s.parts").glob("stats-*.h5"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert f"damaged part file {newest}" in result.stderr.replace("\n", "")
    clean_args = list(args)
    clean_args[clean_args.index("--store") + 1] = str(tmp_path / "clean")
    assert cli(*clean_args).exit_code == 0
    assert_identical(
        arrays(store / "scores" / "s.h5"), arrays(tmp_path / "clean" / "scores" / "s.h5")
    )


def test_only_the_damaged_wandg_group_is_recomputed(
    cli, monkeypatch, tiny_llama_dir, pairs_csv, tmp_path
):
    store = tmp_path / "store"
    args = [
        "score",
        "--method",
        "wandg",
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(pairs_csv),
        "--nsamples",
        "4",
        "--seqlen",
        "128",
        "--store",
        str(store),
        "--name",
        "g",
        "--layers-per-pass",
        "1",
        "--checkpoint-every",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ]
    with monkeypatch.context() as patch:
        interrupt_after(patch, wandg.GradientAccumulator, 6)  # group 0 done (4), 2 of group 1
        assert cli(*args).exit_code == 130
    group = store / "scores" / "g.parts" / "group-0000.h5"
    group.write_bytes(group.read_bytes()[:64])
    calls = {"n": 0}
    original = wandg.GradientAccumulator.observe

    def counting(self, *a, **k):
        calls["n"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(wandg.GradientAccumulator, "observe", counting)
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert "damaged part file" in result.stderr and "group-0000.h5" in result.stderr.replace(
        "\n", ""
    )
    assert calls["n"] == 8  # group 0 again (4) and group 1 (4): nothing else


def test_truncated_score_set_is_named(cli, tiny_llama_dir, tmp_path):
    store = tmp_path / "store"
    magnitude_store(cli, tiny_llama_dir, store)
    path = store / "scores" / "magnitude.h5"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = cli(
        "prune", "--store", str(store), "--scores", "magnitude", "-r", "0.5", "--no-progress"
    )
    assert_one_line_error(result, str(path), "truncated or damaged")


# ---------------------------------------------------------------------------------------------
# 6-7. Checksums and orphans through the CLI


def flip_a_byte(path: Path, key: str) -> None:
    """One byte of `key`'s first chunk flipped in place, as a failing disk would."""
    with h5py.File(path) as handle:
        offset = handle[key].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 5] ^= 0x55
    path.write_bytes(bytes(data))


def test_flipped_byte_is_a_checksum_mismatch_in_prune(cli, tiny_llama_dir, tmp_path):
    store = tmp_path / "store"
    magnitude_store(cli, tiny_llama_dir, store)
    path = store / "scores" / "magnitude.h5"
    flip_a_byte(path, "1/mlp.down_proj")
    result = cli(
        "prune", "--store", str(store), "--scores", "magnitude", "-r", "0.5", "--no-progress"
    )
    assert_one_line_error(result, f"checksum mismatch in {path}:/1/mlp.down_proj")
    assert not (store / "masks").exists() or not list((store / "masks").glob("*.h5"))


def test_orphan_temporaries_of_a_dead_process_are_cleaned(cli, tiny_llama_dir, tmp_path):
    store = tmp_path / "store"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process that has ended: its temporaries are orphans
    orphans = [
        store / "scores" / f".x.h5.tmp-{dead.pid}",
        store / "masks" / f".m.h5.tmp-{dead.pid}",
        store / "scores" / "s.parts" / f".stats-000001.h5.tmp-{dead.pid}",
    ]
    for orphan in orphans:
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(b"half")
    magnitude_store(cli, tiny_llama_dir, store)
    assert not any(o.exists() for o in orphans)


# ---------------------------------------------------------------------------------------------
# 8-9. Concurrent writers and readers


@pytest.mark.slow
@pytest.mark.parametrize("hdf5_locking", ["TRUE", "FALSE"])
def test_a_second_writer_of_a_set_exits_at_once_and_other_files_go_on(
    hdf5_locking, cli, tiny_llama_dir, pairs_csv, tmp_path
):
    store = tmp_path / "store"
    store.mkdir()
    env = run_env(HDF5_USE_FILE_LOCKING=hdf5_locking)
    # Long enough (~10 s) to still be running when the second writer has started Python.
    first = subprocess.Popen(
        score_command(tiny_llama_dir, "align_short", store, "wandg", name="first", nsamples=300),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert wait_for_lock(store, first)
    deadline = time.monotonic() + 120
    while not (store / "scores" / "first.parts").is_dir() and time.monotonic() < deadline:
        time.sleep(0.01)  # the model is loading; the set's parts appear when work starts
    # 9. Readers see only finished sets while the writer works.
    listing = json.loads(cli("inspect", str(store), "--json").stdout)
    assert all(not s["complete"] for s in listing["score_sets"])
    assert not (store / "scores" / "first.h5").exists()
    assert_one_line_error(
        cli("prune", "--store", str(store), "--scores", "first", "-r", "0.5", "--no-progress"),
        "unfinished",
    )
    same = subprocess.run(
        score_command(tiny_llama_dir, "align_short", store, "wandg", name="first", nsamples=300),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert same.returncode == 2
    assert f"pid {first.pid}" in same.stderr and "being written" in same.stderr
    assert "set 'first'" in same.stderr
    # Another set of the same store is written meanwhile, and a finished one is pruned.
    other = subprocess.run(
        score_command(tiny_llama_dir, pairs_csv, store, "wanda", name="second"),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert other.returncode == 0, other.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read() if first.stderr else ""
    arrays(store / "scores" / "first.h5")  # complete and valid
    arrays(store / "scores" / "second.h5")
    # Without a race against the scorer's speed: while a set's lock is held, a prune of a
    # finished set goes on.
    with writer_lock(store, "scores/being-written", "a long score"):
        pruned = cli("prune", "--store", str(store), "--scores", "second", "-r", "0.5",
                     "--no-progress")  # fmt: skip
        assert pruned.exit_code == 0, pruned.stderr


# ---------------------------------------------------------------------------------------------
# 10. Read-only store


@pytest.mark.slow
def test_read_only_store_is_refused_before_any_computation(tiny_llama_dir, pairs_csv, tmp_path):
    store = tmp_path / "readonly"
    store.mkdir()
    command = score_command(tiny_llama_dir, pairs_csv, store, "wanda")
    if os.geteuid() != 0:
        store.chmod(0o555)
        done = subprocess.run(command, capture_output=True, text=True, env=run_env())
        store.chmod(0o755)
    else:
        # Root ignores permission bits: mount a read-only filesystem there, in a private
        # mount namespace so nothing outside this process sees it.
        if shutil.which("unshare") is None:
            pytest.skip(
                "running as root without unshare: cannot make a directory read-only for root"
            )
        script = f"mount -t tmpfs -o ro,size=1m tmpfs {store} && exec " + " ".join(
            map(shlex_quote, command)
        )
        probe = subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {store} && true"],
            capture_output=True,
        )
        if probe.returncode != 0:
            pytest.skip(
                f"running as root and mounts are not permitted here ({probe.stderr.decode().strip()})"
            )
        done = subprocess.run(
            ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=run_env()
        )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "not writable" in lines[0] and "--store" in lines[0]


def shlex_quote(value: str) -> str:
    import shlex

    return shlex.quote(str(value))


# ---------------------------------------------------------------------------------------------
# 11. Disk full


def test_free_space_is_checked_before_computation(
    cli, monkeypatch, tiny_llama_dir, pairs_csv, tmp_path
):
    import wandacli.core.durable as store_module

    real = shutil.disk_usage
    monkeypatch.setattr(
        store_module.shutil, "disk_usage", lambda path: real(path)._replace(free=1024)
    )
    calls = {"n": 0}
    monkeypatch.setattr(
        wanda.ActivationStatistics,
        "observe",
        lambda *a, **k: calls.__setitem__("n", calls["n"] + 1),
    )
    result = cli(
        "score",
        "--method",
        "wanda",
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(pairs_csv),
        "--nsamples",
        "4",
        "--store",
        str(tmp_path / "store"),
        "--no-progress",
    )
    assert_one_line_error(result, "not enough free space", "needs about")
    assert calls["n"] == 0


def test_free_space_for_the_set_but_not_its_checkpoints_is_refused(
    cli, monkeypatch, tiny_llama_dir, pairs_csv, tmp_path
):
    """actsvd keeps float64 sums: three checkpoints of them (two kept, one being written) can
    exist beside the parts and the set. Room for twice the float32 set is not enough."""
    import h5py

    import wandacli.core.durable as durable_module

    args = ["score", "--method", "actsvd", "--model", str(tiny_llama_dir), "--device", "cpu"]
    args += ["--data", str(pairs_csv), "--nsamples", "4", "--seqlen", "64", "--no-progress"]
    args += ["--checkpoint-every", "2"]
    done = cli(*args, "--store", str(tmp_path / "measure"))
    assert done.exit_code == 0, done.stderr
    with h5py.File(next((tmp_path / "measure" / "scores").glob("*.h5"))) as handle:
        stored: dict[int, int] = {}  # hard-linked datasets counted once
        handle.visititems(
            lambda name, obj: (
                stored.setdefault(obj.id.__hash__(), obj.nbytes)
                if isinstance(obj, h5py.Dataset) and obj.ndim == 2
                else None
            )
        )
    set_bytes = sum(stored.values())
    # Room for the set twice, with check_free_space's slack, and half the checkpoints' need.
    free = int((2 * set_bytes + 3 * set_bytes) * 1.05 + (16 << 20))
    real = shutil.disk_usage
    monkeypatch.setattr(
        durable_module.shutil, "disk_usage", lambda path: real(path)._replace(free=free)
    )
    store = tmp_path / "store"
    result = cli(*args, "--store", str(store))
    assert_one_line_error(result, "not enough free space", "its parts and checkpoints")
    assert not list(store.glob("scores/*.h5"))


@pytest.mark.slow
def test_file_size_limit_mid_write_keeps_earlier_parts(tiny_llama_dir, pairs_csv, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    command = score_command(tiny_llama_dir, pairs_csv, store, "wanda", nsamples=6)
    limit = 120_000  # checkpoints (~43 KB: HDF5 headers dominate) fit, the finished set does not

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(
        command, capture_output=True, text=True, env=run_env(), preexec_fn=limited
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "writing" in lines[0] and "File too large" in lines[0], done.stderr
    assert not (store / "scores" / "set.h5").exists()
    assert not [p for p in store.rglob("*") if ".tmp-" in p.name]
    kept = sorted((store / "scores" / "set.parts").glob("stats-*.h5"))
    assert kept and kept[-1].name == "stats-000006.h5"  # every sample's statistics kept
    assert subprocess.run(command, capture_output=True, env=run_env()).returncode == 0
    clean = tmp_path / "clean"
    assert (
        subprocess.run(
            score_command(tiny_llama_dir, pairs_csv, clean, "wanda", nsamples=6), env=run_env()
        ).returncode
        == 0
    )
    assert_identical(arrays(store / "scores" / "set.h5"), arrays(clean / "scores" / "set.h5"))


# ---------------------------------------------------------------------------------------------
# 12. NaN and Inf


def test_nan_injected_through_a_hook_is_refused_with_counts(tiny_llama_dir, pairs_csv, tmp_path):
    loaded = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
    target = loaded.linear_layers[8]  # layer 1 self_attn.k_proj

    def poison(module, args):
        x = args[0].clone()
        x[..., 0] = float("nan")
        return (x,)

    handle = target.module.register_forward_pre_hook(poison)
    config = ScoreConfig(
        method="wanda",
        model=ModelSpec(model=str(tiny_llama_dir), device="cpu"),
        data=str(pairs_csv),
        nsamples=3,
        seqlen=128,
        store=tmp_path / "store",
    )
    with pytest.raises(
        NonFiniteScoresError,
        match=r"non-finite scores in \d+ modules .*layer 1 self_attn.k_proj: \d+ NaN",
    ):
        run_score(config, loaded=loaded)
    handle.remove()
    assert not (tmp_path / "store" / "scores" / "wanda-pairs.h5").exists()
    assert (tmp_path / "store" / "scores" / "wanda-pairs.parts").is_dir()  # statistics kept


def test_float16_overflow_is_refused(cli, tiny_llama_dir, tokenizer, tmp_path):
    loaded = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
    with torch.no_grad():
        loaded.linear_layers[3].weight[0, 0] = 1e5
    big = tmp_path / "big"
    loaded.model.save_pretrained(big)
    tokenizer.save_pretrained(big)
    result = cli(
        "score",
        "--method",
        "magnitude",
        "--model",
        str(big),
        "--store",
        str(tmp_path / "s"),
        "--score-dtype",
        "float16",
        "--no-progress",
    )
    assert_one_line_error(result, "layer 0 self_attn.o_proj", "exceeds float16's maximum")


def test_store_with_inf_is_refused_on_read(cli, tiny_llama_dir, tmp_path):
    store = tmp_path / "store"
    magnitude_store(cli, tiny_llama_dir, store)
    with h5py.File(store / "scores" / "magnitude.h5", "a") as handle:
        data = handle["0/mlp.up_proj"][()]
        data[2, 2] = np.inf
        del handle["0/mlp.up_proj"]
        handle.create_dataset("0/mlp.up_proj", data=data, fletcher32=True)
    result = cli(
        "prune", "--store", str(store), "--scores", "magnitude", "-r", "0.5", "--no-progress"
    )
    assert_one_line_error(result, "0/mlp.up_proj contains 0 NaN and 1 Inf")


# ---------------------------------------------------------------------------------------------
# 13-15. Hostile and foreign stores


def test_store_for_another_model_names_the_layer_and_shapes(
    cli, tiny_llama_dir, tiny_llama_wide_dir, tmp_path
):
    store = tmp_path / "store"
    magnitude_store(cli, tiny_llama_dir, store)
    result = cli(
        "prune",
        "--store",
        str(store),
        "--scores",
        "magnitude",
        "-r",
        "0.5",
        "--model",
        str(tiny_llama_wide_dir),
        "--save-model",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--no-progress",
    )
    assert_one_line_error(result, "layer 0 mlp.gate_proj: stored (48, 32) ≠ model (64, 32)")


def test_mask_from_an_incomplete_score_set_is_refused(cli, tiny_llama_dir, tmp_path):
    store = tmp_path / "store"
    magnitude_store(cli, tiny_llama_dir, store)
    with h5py.File(store / "scores" / "magnitude.h5", "a") as handle:
        del handle["1/mlp.down_proj"]
    result = cli(
        "prune", "--store", str(store), "--scores", "magnitude", "-r", "0.5", "--no-progress"
    )
    assert_one_line_error(result, "incomplete: missing layer 1 mlp.down_proj")


def _hostile(tmp_path: Path, build) -> Path:
    path = tmp_path / "hostile.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["format"] = "wandacli-scores"
        handle.attrs["format_version"] = 1
        handle.attrs["meta"] = "{}"
        build(handle)
    return path


def _external_storage(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 64)
    return lambda h: h.create_dataset(
        "0/a", shape=(4, 4), dtype="f4", external=[(str(secret), 0, 64)]
    )


def _virtual(tmp_path):
    source = tmp_path / "src.h5"
    with h5py.File(source, "w") as handle:
        handle["d"] = np.zeros((2, 2), "f4")

    def build(handle):
        layout = h5py.VirtualLayout(shape=(2, 2), dtype="f4")
        layout[:] = h5py.VirtualSource(str(source), "d", shape=(2, 2))
        handle.create_group("0").create_virtual_dataset("a", layout)

    return build


HOSTILE = {
    "external link": lambda tmp: (
        lambda h: h.__setitem__("0", h5py.ExternalLink("/etc/passwd", "/"))
    ),
    "external storage": _external_storage,
    "virtual dataset": _virtual,
    "unknown HDF5 filter": lambda tmp: (
        lambda h: h.create_dataset(
            "0/a",
            data=np.ones((2, 2), "f4"),
            chunks=(1, 2),
            compression=32015,
            allow_unknown_filter=True,
        )
    ),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
@pytest.mark.parametrize("command", ["prune", "compare"])
def test_malicious_hdf5_is_rejected_before_reading(cli, tmp_path, kind, command):
    path = _hostile(tmp_path, HOSTILE[kind](tmp_path))
    if command == "prune":
        result = cli(
            "prune",
            "--scores",
            str(path),
            "--store",
            str(tmp_path / "s"),
            "-r",
            "0.5",
            "--no-progress",
        )
    else:
        result = cli("compare", str(path), str(path), "--no-progress")
    assert_one_line_error(result, kind)


@pytest.mark.parametrize(
    ("attrs", "fragment"),
    [
        ({"format": "wandacli-scores", "format_version": 7, "meta": "{}"}, "format_version 7"),
        ({"format": "wandacli-scores", "format_version": 1, "meta": "{nope"}, "not JSON"),
        (
            {"format": "wandacli-scores", "format_version": 1, "meta": "x" * (2 << 20)},
            "oversized meta",
        ),
    ],
)
def test_bad_format_version_and_meta_are_rejected(cli, tmp_path, attrs, fragment):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs.update(attrs)
    result = cli(
        "prune", "--scores", str(path), "--store", str(tmp_path / "s"), "-r", "0.5", "--no-progress"
    )
    assert_one_line_error(result, fragment)


# ---------------------------------------------------------------------------------------------
# 17. A corpus of bad command lines: one line each, nothing changed in the store


@pytest.fixture(scope="module")
def populated_store(tmp_path_factory, tiny_llama_dir, pairs_csv) -> Path:
    from typer.testing import CliRunner

    from wandacli.cli import app

    store = tmp_path_factory.mktemp("corpus") / "store"
    runner = CliRunner()
    for args in (
        [
            "score",
            "--method",
            "wanda",
            "--data",
            str(pairs_csv),
            "--nsamples",
            "4",
            "--name",
            "safety",
        ],
        ["score", "--method", "magnitude", "--name", "utility"],
    ):
        result = runner.invoke(
            app,
            [
                *args,
                "--model",
                str(tiny_llama_dir),
                "--store",
                str(store),
                "--seqlen",
                "128",
                "--no-progress",
            ]
            if "wanda" in args
            else [*args, "--model", str(tiny_llama_dir), "--store", str(store), "--no-progress"],
        )
        assert result.exit_code == 0, result.stderr
    assert (
        runner.invoke(
            app,
            [
                "prune",
                "--store",
                str(store),
                "--scores",
                "safety",
                "-r",
                "0.5",
                "--name",
                "m",
                "--no-progress",
            ],
        ).exit_code
        == 0
    )
    return store


def bad_command_lines(
    store: Path, model: Path, data: Path, tmp: Path
) -> list[tuple[list[str], str]]:
    s, m, d = str(store), str(model), str(data)
    safety = str(store / "scores" / "safety.h5")
    return [
        (["score", "--store", s, "--model", m], "--method is required"),
        (["score", "--method", "wanda", "--store", s, "--model", m], "needs calibration data"),
        (["score", "--method", "sparsegpt", "--store", s], "--method"),
        (
            [
                "score",
                "--method",
                "wanda",
                "--data",
                d,
                "--nsamples",
                "0",
                "--store",
                s,
                "--model",
                m,
            ],
            "--nsamples must be at least 1",
        ),
        (
            [
                "score",
                "--method",
                "wanda",
                "--data",
                d,
                "--nsamples",
                "many",
                "--store",
                s,
                "--model",
                m,
            ],
            "--nsamples",
        ),
        (
            [
                "score",
                "--method",
                "wanda",
                "--data",
                d,
                "--nsamples",
                "500",
                "--store",
                s,
                "--model",
                m,
            ],
            "has only 12 rows",
        ),
        (
            [
                "score",
                "--method",
                "wanda",
                "--data",
                d,
                "--seqlen",
                "-5",
                "--store",
                s,
                "--model",
                m,
            ],
            "--seqlen must be positive",
        ),
        (
            ["score", "--method", "wanda", "--data", str(tmp), "--store", s, "--model", m],
            "is a directory",
        ),
        (
            [
                "score",
                "--method",
                "wanda",
                "--data",
                str(tmp / "none.csv"),
                "--store",
                s,
                "--model",
                m,
            ],
            "unknown data set",
        ),
        (
            [
                "score",
                "--method",
                "wanda",
                "--data",
                d,
                "--prompt-column",
                "q",
                "--store",
                s,
                "--model",
                m,
            ],
            "--prompt-column",
        ),
        (
            ["score", "--method", "magnitude", "--store", s, "--model", str(tmp / "nomodel")],
            "not found",
        ),
        (
            ["score", "--method", "magnitude", "--store", s, "--model", m, "--dtype", "float8"],
            "--dtype",
        ),
        (
            ["score", "--method", "magnitude", "--store", s, "--model", m, "--device", "tpu"],
            "--device",
        ),
        (
            ["score", "--method", "magnitude", "--store", s, "--model", m, "--use-diff"],
            "--base-model",
        ),
        (
            ["score", "--method", "magnitude", "--store", s, "--model", m, "--base-model", m],
            "--use-diff",
        ),
        (
            ["score", "--method", "random", "--store", s, "--model", m, "--name", "utility"],
            "already exists",
        ),
        (
            ["score", "--method", "magnitude", "--store", s, "--model", m, "--name", "../escape"],
            "invalid score set name",
        ),
        (
            [
                "score",
                "--method",
                "magnitude",
                "--store",
                s,
                "--model",
                m,
                "--layers-per-pass",
                "-1",
            ],
            "--layers-per-pass",
        ),
        (
            ["score", "--method", "magnitude", "--store", s, "--model", m, "--template", "fancy"],
            "--template",
        ),
        (["score", "--method", "magnitude", "--store", safety, "--model", m], "is a file"),
        (["prune", "--store", s, "--scores", "safety"], "--sparsity-ratio is required"),
        (["prune", "--store", s, "--scores", "safety", "-r", "1.0"], "(0, 1)"),
        (["prune", "--store", s, "--scores", "safety", "-r", "abc"], "--sparsity-ratio"),
        (["prune", "--store", s, "--scores", "nothere", "-r", "0.5"], "no score set 'nothere'"),
        (
            ["prune", "--store", s, "--scores", "safety", "-r", "0.4", "--name", "m"],
            "already exists",
        ),
        (["prune", "--store", s, "--scores", "safety", "--sparsity-type", "3:2"], "less than M"),
        (
            ["prune", "--store", s, "--scores", "safety", "--sparsity-type", "2:4", "-r", "0.1"],
            "contradicts",
        ),
        (
            [
                "prune",
                "--store",
                s,
                "--scores",
                "safety",
                "--utility-scores",
                "utility",
                "--p",
                "0.1",
            ],
            "--p and --q",
        ),
        (
            [
                "prune",
                "--store",
                s,
                "--scores",
                "safety",
                "--utility-scores",
                "utility",
                "--p",
                "2",
                "--q",
                "0.1",
            ],
            "(0, 1]",
        ),
        (
            ["prune", "--store", s, "--scores", "safety", "-r", "0.5", "--layers", "7"],
            "does not exist",
        ),
        (["prune", "--store", s, "--scores", "safety", "-r", "0.5", "--layers", "x-y"], "--layers"),
        (
            ["prune", "--store", s, "--scores", "safety", "-r", "0.5", "--modules", "nothing.*"],
            "matches no module",
        ),
        (
            [
                "prune",
                "--store",
                s,
                "--scores",
                "safety",
                "-r",
                "0.5",
                "--save-model",
                str(tmp / "o"),
            ],
            "--save-model needs --model",
        ),
        (
            ["prune", "--store", s, "--scores", "safety", "-r", "0.5", "--recover-from-base", m],
            "--recover-from-base",
        ),
        (
            ["prune", "--store", s, "--scores", "safety", "-r", "0.5", "--export-mask", str(tmp)],
            "is a directory",
        ),
        (["prune", "--store", s, "--scores", str(tmp), "-r", "0.5"], "is a directory"),
        (["compare", safety], "at least two inputs"),
        (["compare", safety, safety, "--top", "0"], "--top must be in (0, 1]"),
        (["compare", safety, str(tmp / "missing.h5")], "does not exist"),
        (["compare", safety, safety, "--sample", "1"], "--sample"),
        (["eval-attack", "--model", m, "--limit", "0"], "--limit must be at least 1"),
        (["eval-attack", "--model", m, "--configs", "everything"], "unknown --configs"),
        (["eval-attack", "--model", m, "--judge", "gpt"], "--judge"),
        (["eval-attack", "--model", m, "--mask", "nope", "--store", s], "no mask or edit 'nope'"),
        (["eval-attack", "--model", m, "--prompts", "align_short"], "not attack prompts"),
        (["eval-utility", "--model", m, "--data", "none"], "nothing to evaluate"),
        (["eval-utility", "--model", m, "--seqlen", "1"], "--seqlen must be at least 2"),
        (["eval-utility", "--model", m, "--limit-windows", "0"], "--limit-windows"),
        (["inspect", str(tmp / "nostore")], "does not exist"),
        (["import-legacy", str(tmp / "nodumps"), "--model", m, "--store", s], "not a directory"),
        (["report", str(tmp / "noresults")], "does not exist"),
        (["check-config", str(tmp / "none.toml")], "does not exist"),
        (["score", "--config", str(tmp / "none.toml")], "does not exist"),
        (["frobnicate"], "No such command"),
    ]


@pytest.mark.slow
def test_bad_command_lines_fail_in_one_line_and_change_nothing(
    cli, populated_store, tiny_llama_dir, pairs_csv, tmp_path
):
    corpus = bad_command_lines(populated_store, tiny_llama_dir, pairs_csv, tmp_path)
    assert len(corpus) >= 40
    before = tree_digest(populated_store)
    for args, fragment in corpus:
        result = cli(*args)
        assert result.exit_code != 0, args
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("error: ") and "Traceback" not in result.stderr, (
            args,
            result.stderr,
        )
        assert fragment in lines[0], (args, fragment, lines[0])
        assert tree_digest(populated_store) == before, args


def test_inspect_verify_finds_a_flipped_byte_a_plain_inspect_does_not_read(
    cli, tiny_llama_dir, tmp_path
):
    store = tmp_path / "store"
    magnitude_store(cli, tiny_llama_dir, store)
    path = store / "scores" / "magnitude.h5"
    flip_a_byte(path, "1/mlp.down_proj")
    quick = cli("inspect", str(store), "--json")
    assert quick.exit_code == 0, quick.stderr
    assert "magnitude" in quick.stdout
    verified = cli("inspect", str(store), "--verify", "--json")
    assert verified.exit_code == 0, verified.stderr
    found = json.loads(verified.stdout)
    listed = json.dumps(found)
    assert f"checksum mismatch in {path}:/1/mlp.down_proj" in listed


def test_inspect_of_a_file_says_it_is_a_file(cli, tmp_path):
    afile = tmp_path / "passwd"
    afile.write_text("root:x:0:0\n")
    assert_one_line_error(cli("inspect", str(afile)), "is a file, not a directory")
