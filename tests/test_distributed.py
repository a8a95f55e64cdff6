"""Scaling out: data-parallel scoring with torchrun (gloo on the CPU) equals a single process,
only rank 0 writes, a failing rank fails the run; device maps give the same scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from wandacli.store.files import open_finished_scores

RANK_RUNNER = REPO / "tests" / "faults" / "run_rank.py"


def arrays(path: Path) -> dict[str, np.ndarray]:
    with open_finished_scores(path) as score_set:
        return {key: score_set.read(key) for key in score_set.keys}


def score_args(model_dir, data, store, method, *extra) -> list[str]:
    return [
        "score",
        "--method",
        method,
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--nsamples",
        "7",
        "--seqlen",
        "128",
        "--store",
        str(store),
        "--device",
        "cpu",
        "--no-progress",
        "--name",
        "s",
        *extra,
    ]


def torchrun(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(RANK_RUNNER),
        *args,
    ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDACLI_QUIET": "1", **(env or {})},
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("wanda", ["--checkpoint-every", "2"]),
        ("wandg", ["--layers-per-pass", "1", "--checkpoint-every", "2"]),
        ("actsvd", ["--layers-per-pass", "1", "--checkpoint-every", "2"]),
    ],
)
def test_two_processes_equal_one_and_only_rank_0_writes(
    cli, method, extra, tiny_llama_dir, pairs_csv, tmp_path
):
    single = tmp_path / "single"
    assert cli(*score_args(tiny_llama_dir, pairs_csv, single, method, *extra)).exit_code == 0
    parallel = tmp_path / "parallel"
    log = tmp_path / "writes.log"
    done = torchrun(
        [*score_args(tiny_llama_dir, pairs_csv, parallel, method, *extra), "--json"],
        {"WANDACLI_TEST_WRITE_LOG": str(log)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        json.loads(done.stdout[done.stdout.index("{") :])["world_size"] == 2
    )  # one report, rank 0's
    a, b = arrays(single / "scores" / "s.h5"), arrays(parallel / "scores" / "s.h5")
    for key in a:
        # The summation order differs. Second moments (actsvd) sum products of both signs:
        # compare them on the matrix's scale, float32 rounding of their block sums.
        atol = 1e-6 * float(np.abs(a[key]).max()) if method == "actsvd" else 0
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=atol, err_msg=key)
    writers = {line.split()[0] for line in log.read_text().splitlines()}
    assert writers == {"0"}
    assert len(log.read_text().splitlines()) > 2  # checkpoints and the set itself
    with open_finished_scores(parallel / "scores" / "s.h5") as finished:
        assert finished.meta["world_size"] == 2


@pytest.mark.slow
def test_a_failing_rank_fails_the_run_and_nothing_is_marked_complete(
    tiny_llama_dir, pairs_csv, tmp_path
):
    store = tmp_path / "store"
    done = torchrun(
        score_args(tiny_llama_dir, pairs_csv, store, "wandg"),
        {"WANDACLI_TEST_FAIL_RANK": "1", "WANDACLI_TEST_FAIL_AFTER": "2"},
    )
    assert done.returncode != 0
    assert "error: rank 1: internal error: RuntimeError: injected failure on rank 1" in done.stderr
    assert not (store / "scores" / "s.h5").exists()


@pytest.mark.slow
def test_resuming_with_another_world_size_is_refused(
    cli, monkeypatch, tiny_llama_dir, pairs_csv, tmp_path
):
    from tests.conftest import interrupt_after
    from wandacli.methods import wanda

    store = tmp_path / "store"
    args = score_args(tiny_llama_dir, pairs_csv, store, "wanda", "--checkpoint-every", "1")
    with monkeypatch.context() as patch:
        interrupt_after(patch, wanda.ActivationStatistics, 3)
        assert cli(*args).exit_code == 130
    done = torchrun(args)
    assert done.returncode != 0
    assert "world_size" in done.stderr and "other settings" in done.stderr


def test_device_map_gives_the_same_scores(cli, tiny_llama_dir, pairs_csv, tmp_path):
    """A manual map placing every module by name: the path a multi-GPU map takes (here every
    device is the CPU, the only one a CPU machine has)."""
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    plain, mapped = tmp_path / "plain", tmp_path / "mapped"
    for method in ("wanda", "wandg"):
        assert (
            cli(*score_args(tiny_llama_dir, pairs_csv, plain, method, "--name", method)).exit_code
            == 0
        )
        result = cli(
            *score_args(
                tiny_llama_dir,
                pairs_csv,
                mapped,
                method,
                "--name",
                method,
                "--device-map",
                json.dumps(device_map),
            )
        )
        assert result.exit_code == 0, result.stderr
        a, b = arrays(plain / "scores" / f"{method}.h5"), arrays(mapped / "scores" / f"{method}.h5")
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_offloaded_accumulators_give_the_same_scores(cli, tiny_llama_dir, pairs_csv, tmp_path):
    a_store, b_store = tmp_path / "a", tmp_path / "b"
    assert cli(*score_args(tiny_llama_dir, pairs_csv, a_store, "wandg")).exit_code == 0
    assert (
        cli(
            *score_args(tiny_llama_dir, pairs_csv, b_store, "wandg", "--offload-accumulators")
        ).exit_code
        == 0
    )
    a, b = arrays(a_store / "scores" / "s.h5"), arrays(b_store / "scores" / "s.h5")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_max_memory_is_parsed_for_accelerate():
    from wandacli.core.errors import ModelError
    from wandacli.models.sources import parse_max_memory

    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {
        0: "20GiB",
        1: "20GiB",
        "cpu": "64GiB",
    }
    with pytest.raises(ModelError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")


def test_offloaded_weights_are_refused(tiny_llama_dir):
    """accelerate leaves offloaded weights on the meta device: say so instead of failing later."""
    import torch

    from wandacli.config.settings import ModelSpec
    from wandacli.core.errors import ModelError
    from wandacli.models.loader import load_model
    from wandacli.models.pretrained import check_weights_resident

    loaded = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
    layer = loaded.linear_layers[9]
    layer.module.weight = torch.nn.Parameter(torch.empty(layer.module.weight.shape, device="meta"))
    with pytest.raises(ModelError, match="offloaded 1 linear layers .*layer 1 self_attn.v_proj"):
        check_weights_resident(loaded.linear_layers, ModelSpec(device_map="auto"))


# ---------------------------------------------------------------------------------------------
# Collectives on the group's device, checkpoints without a second copy (a recording stand-in
# for the process group: no torch.distributed, no GPU)


def recording_group(rank: int = 0, device: str = "cuda:0"):
    """A two-rank group whose collectives run on `device`: every tensor handed to a collective
    must be on it, or be a staging copy made for it (a CPU machine cannot make a CUDA tensor,
    so the stand-in's staging is a marked CPU copy). The other rank is emulated as holding the
    same values: a sum doubles them."""
    import torch

    from wandacli.core.distributed import Distributed

    class RecordingGroup(Distributed):
        def _to_group(self, tensor):
            copy = tensor.clone()
            self.staged.add(id(copy))
            return copy

        def _all_reduce(self, tensor) -> None:
            assert tensor.device == torch.device(self.device) or id(tensor) in self.staged, (
                f"a {tensor.device} tensor handed to a collective on {self.device}"
            )
            self.reduced.append(tensor.data_ptr())
            tensor.mul_(2)

    group = RecordingGroup(rank=rank, world_size=2, device=device)
    object.__setattr__(group, "reduced", [])  # the data pointers reduced, in order
    object.__setattr__(group, "staged", set())
    return group


def test_tensors_off_the_groups_device_go_through_it_in_chunks(monkeypatch):
    import torch

    from wandacli.core import distributed

    monkeypatch.setattr(distributed, "STAGING_ELEMENTS", 4)
    group = recording_group(device="cuda:0")
    counter = torch.ones(1, dtype=torch.float64)  # actsvd's token counter lives on the CPU
    offloaded = torch.arange(10, dtype=torch.float32)  # --offload-accumulators' sums
    group.all_reduce_sum([counter, offloaded])
    assert counter.item() == 2.0
    assert torch.equal(offloaded, 2 * torch.arange(10, dtype=torch.float32))
    assert len(group.reduced) == 1 + 3  # the counter, then the sums in chunks of 4


def test_a_checkpoint_reduces_the_sums_in_place_and_rank_0_keeps_the_total(tmp_path):
    import torch

    from wandacli.config.score import ScoreConfig
    from wandacli.scoring.run import ScoreRun
    from wandacli.store.parts import read_part

    for rank in (0, 1):
        run = ScoreRun(ScoreConfig(method="magnitude", store=tmp_path / "store"))
        run.dist = recording_group(rank=rank, device="cpu")
        run.parts_dir = tmp_path / f"parts-{rank}"
        run.parts_dir.mkdir()
        sums = {"0/mlp.up_proj": torch.full((3, 4), 1.5)}
        pointer = sums["0/mlp.up_proj"].data_ptr()
        run.checkpoint(sums, "accum-g0000-000002.h5", "accum-g0000-*.h5", {"samples": 2})
        assert run.dist.reduced == [pointer]  # the sum itself: no copy of it was made
        if rank == 0:
            assert torch.equal(sums["0/mlp.up_proj"], torch.full((3, 4), 3.0))
            part = read_part(run.parts_dir / "accum-g0000-000002.h5")
            assert part is not None and np.array_equal(
                part[0]["0/mlp.up_proj"], np.full((3, 4), 3.0)
            )
        else:
            # The total is rank 0's now; this rank sums on from zero, as after a resume.
            assert torch.equal(sums["0/mlp.up_proj"], torch.zeros(3, 4))
            assert not list(run.parts_dir.iterdir())


class _OnAnotherDevice(torch.Tensor):
    """A CPU tensor that says it lives on a second GPU: what a device map's input tensors are
    (on the first device) to the last device that holds the head. `.cpu()` gives a plain tensor
    on the CPU; every other operation keeps the disguise."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 1)

    def cpu(self, *args, **kwargs):  # type: ignore[override]
        return torch.Tensor(super().cpu(*args, **kwargs)).as_subclass(torch.Tensor)


class _HeadOnLastDevice(torch.nn.Module):
    """The tiny model, with the check transformers' head makes of the index it takes: it must
    be on the CPU or on the hidden states' device (here the last device, `cuda:0`)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.seen: list[torch.device] = []

    def forward(self, input_ids=None, use_cache=None, logits_to_keep=0, labels=None):
        if isinstance(logits_to_keep, torch.Tensor):
            self.seen.append(logits_to_keep.device)
            logits_to_keep = logits_to_keep.as_subclass(torch.Tensor)
        return self.model(
            input_ids=input_ids.as_subclass(torch.Tensor),
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
        )


def test_the_loss_under_a_device_map_indexes_the_head_with_a_cpu_index(tiny_llama_dir):
    """#19 defect 2: wandg's loss computed logits only at the counted positions with an index on
    the inputs' device; under a device map transformers indexes the last GPU's hidden states
    with it, which torch refuses unless the index is on the CPU (or that GPU)."""
    from wandacli.config.settings import ModelSpec
    from wandacli.data.calibration import IGNORE_INDEX
    from wandacli.methods.wandg import sample_loss
    from wandacli.models.loader import load_model

    loaded = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
    model = _HeadOnLastDevice(loaded.model)
    input_ids = torch.randint(3, 100, (1, 12))
    labels = input_ids.clone()
    labels[0, :5] = IGNORE_INDEX
    loss = sample_loss(
        model, input_ids.as_subclass(_OnAnotherDevice), labels.as_subclass(_OnAnotherDevice)
    )
    assert [device.type for device in model.seen] == ["cpu"]
    expected = loaded.model(input_ids=input_ids, labels=labels, use_cache=False).loss
    torch.testing.assert_close(loss.as_subclass(torch.Tensor), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_processes_fine_tune_as_one(cli, tiny_llama_dir, pairs_csv, tmp_path):
    """`torchrun ... finetune --freeze`: two processes, each on half of every batch, take the
    steps one process takes on the whole batch (up to the order of the sums); the frozen
    weights stay bitwise; rank 0 alone saves and reports."""
    from tests.test_finetune import mask_commands, masks, matrices

    store = tmp_path / "store"
    for args in mask_commands(tiny_llama_dir, store):
        assert cli(*args).exit_code == 0
    attack = ["finetune", "--model", str(tiny_llama_dir), "--data", str(pairs_csv), "--steps",
              "3", "--batch-size", "4", "--lr", "0.01", "--device", "cpu", "--no-progress",
              "--store", str(store), "--freeze", "m", "--json"]  # fmt: skip
    single = cli(*attack, "--out", tmp_path / "one")
    assert single.exit_code == 0, single.stderr
    done = torchrun([*attack, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"processes"') == 1  # one report, rank 0's
    one, two = json.loads(single.stdout), json.loads(done.stdout[done.stdout.index("{") :])
    assert two["processes"] == 2 and one["processes"] == 1
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4)
    before, a, b = matrices(tiny_llama_dir), matrices(tmp_path / "one"), matrices(tmp_path / "two")
    for key, selector in masks(store).items():
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
        assert torch.equal(b[key][selector], before[key][selector]), key
    refused = torchrun([*attack[:-1], "--batch-size", "1", "--out", str(tmp_path / "x")])
    assert refused.returncode != 0 and "split across 2 processes" in refused.stderr
