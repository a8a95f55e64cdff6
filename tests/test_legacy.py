"""import-legacy: the reference's pickled score dumps (both path formats, CUDA and bfloat16
tensors) become a score set; a pickle or .pt with a code-executing payload is refused and
runs nothing."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.serialization as serialization

from tests.test_score_cli import assert_one_line_error
from wandacli.config.settings import ModelSpec
from wandacli.models.loader import load_model
from wandacli.store.files import ScoreSet


def pickled_as_on_cuda(tensor: torch.Tensor) -> bytes:
    """pickle.dumps(tensor) as the reference ran it on a GPU: the storage's location is
    cuda:0, which a plain pickle.load cannot restore on a CPU-only machine."""

    def tag(obj):
        return (
            "cuda:0"
            if getattr(obj, "device", None) is not None and obj.device.type == "cpu"
            else None
        )

    serialization.register_package(1, tag, lambda obj, location: None)
    try:
        return pickle.dumps(tensor)
    finally:
        serialization._package_registry[:] = [
            p for p in serialization._package_registry if p[1] is not tag
        ]


@pytest.fixture(scope="module")
def model_scores(tiny_llama_dir) -> dict[tuple[int, str], torch.Tensor]:
    loaded = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
    generator = torch.Generator().manual_seed(0)
    return {
        (lin.layer, lin.name): torch.rand(lin.shape, generator=generator)
        for lin in loaded.linear_layers
    }


def write_wanda_format(root: Path, scores, data="align", cuda=True, dtype=torch.bfloat16) -> Path:
    folder = root / "wanda_score" / f"{data}_weight_only_disentangle"
    folder.mkdir(parents=True)
    for (layer, module), tensor in scores.items():
        path = folder / f"W_metric_layer_{layer}_name_{module}_{data}_weight_only_disentangle.pkl"
        payload = pickled_as_on_cuda(tensor.to(dtype)) if cuda else pickle.dumps(tensor.to(dtype))
        path.write_bytes(payload)
    return root


def write_wandg_format(root: Path, scores) -> Path:
    folder = root / "wanda_score"
    folder.mkdir(parents=True)
    for (layer, module), tensor in scores.items():
        with (
            folder / f"W_metric_layer_{layer}_name_model.layers.{layer}.{module}_weight.pkl"
        ).open("wb") as handle:
            pickle.dump(tensor, handle)
    return root


def imported(store: Path, name: str) -> dict[str, np.ndarray]:
    with ScoreSet(store / "scores" / f"{name}.h5") as score_set:
        assert score_set.meta["imported_from"]["files"] == 14
        return {key: score_set.read(key) for key in score_set.keys}


def legacy_args(directory, model_dir, store, *extra):
    return [
        "import-legacy",
        str(directory),
        "--model",
        str(model_dir),
        "--store",
        str(store),
        "--no-progress",
        *extra,
    ]


def test_plain_pickle_of_a_cuda_tensor_fails_without_us(model_scores):
    with pytest.raises(RuntimeError, match="CUDA"):
        pickle.loads(pickled_as_on_cuda(next(iter(model_scores.values()))))


def test_wanda_format_with_cuda_bfloat16_tensors(cli, tiny_llama_dir, model_scores, tmp_path):
    dumps = write_wanda_format(tmp_path / "save", model_scores)
    result = cli(*legacy_args(dumps, tiny_llama_dir, tmp_path / "store", "--name", "w"))
    assert result.exit_code == 0, result.stderr
    arrays = imported(tmp_path / "store", "w")
    for (layer, module), tensor in model_scores.items():
        np.testing.assert_array_equal(
            arrays[f"{layer}/{module}"], tensor.to(torch.bfloat16).float().numpy()
        )
    meta = ScoreSet(tmp_path / "store" / "scores" / "w.h5").meta
    assert (meta["method"], meta["data"]["name"]) == ("wanda", "align")


def test_wandg_format_with_full_module_names(cli, tiny_llama_dir, model_scores, tmp_path):
    dumps = write_wandg_format(tmp_path / "save", model_scores)
    result = cli(
        *legacy_args(dumps / "wanda_score", tiny_llama_dir, tmp_path / "store", "--name", "g")
    )
    assert result.exit_code == 0, result.stderr
    arrays = imported(tmp_path / "store", "g")
    for (layer, module), tensor in model_scores.items():
        np.testing.assert_array_equal(arrays[f"{layer}/{module}"], tensor.numpy())
    assert ScoreSet(tmp_path / "store" / "scores" / "g.h5").meta["method"] == "wandg"


def test_imported_sets_prune_like_any_other(cli, tiny_llama_dir, model_scores, tmp_path):
    dumps = write_wandg_format(tmp_path / "save", model_scores)
    assert (
        cli(*legacy_args(dumps, tiny_llama_dir, tmp_path / "store", "--name", "g")).exit_code == 0
    )
    result = cli(
        "prune", "--store", str(tmp_path / "store"), "--scores", "g", "-r", "0.5", "--no-progress"
    )
    assert result.exit_code == 0, result.stderr


class _Payload:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused_and_runs_nothing(
    cli, tiny_llama_dir, model_scores, tmp_path
):
    dumps = write_wandg_format(tmp_path / "save", model_scores)
    marker = tmp_path / "pwned"
    target = next((dumps / "wanda_score").glob("W_metric_layer_1_name_*mlp.up_proj_weight.pkl"))
    target.write_bytes(pickle.dumps(_Payload(marker)))
    result = cli(*legacy_args(dumps, tiny_llama_dir, tmp_path / "store"))
    assert_one_line_error(result, "refusing", "posix.system", "only tensors")
    assert not marker.exists()
    assert not (tmp_path / "store" / "scores" / "imported.h5").exists()


def test_code_executing_pt_file_is_refused_and_runs_nothing(
    cli, tiny_llama_dir, model_scores, tmp_path
):
    dumps = write_wandg_format(tmp_path / "save", model_scores)
    marker = tmp_path / "pwned-pt"
    target = next((dumps / "wanda_score").glob("W_metric_layer_0_name_*q_proj_weight.pkl"))
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    target.write_bytes(buffer.getvalue())
    assert zipfile.is_zipfile(target)
    result = cli(*legacy_args(dumps, tiny_llama_dir, tmp_path / "store"))
    assert_one_line_error(result, "refusing", "posix.system", str(target.name))
    assert not marker.exists()


def test_several_dump_kinds_need_a_suffix(cli, tiny_llama_dir, model_scores, tmp_path):
    root = write_wandg_format(tmp_path / "save", model_scores)
    extra = next((root / "wanda_score").glob("W_metric_layer_0_name_*q_proj_weight.pkl"))
    (extra.parent / extra.name.replace("_weight.pkl", "_weight_diff.pkl")).write_bytes(
        extra.read_bytes()
    )
    result = cli(*legacy_args(root, tiny_llama_dir, tmp_path / "store"))
    assert_one_line_error(result, "several score dumps", "weight, weight_diff", "--suffix")
    result = cli(*legacy_args(root, tiny_llama_dir, tmp_path / "store", "--suffix", "weight"))
    assert result.exit_code == 0, result.stderr


def test_missing_module_and_wrong_shapes(
    cli, tiny_llama_dir, tiny_llama_3layer_dir, model_scores, tmp_path
):
    root = write_wandg_format(tmp_path / "save", model_scores)
    result = cli(*legacy_args(root, tiny_llama_3layer_dir, tmp_path / "store"))
    assert_one_line_error(result, "no score dump for layer 2")
    broken = next((root / "wanda_score").glob("W_metric_layer_1_name_*down_proj_weight.pkl"))
    broken.write_bytes(pickle.dumps(torch.zeros(3, 3)))
    assert_one_line_error(
        cli(*legacy_args(root, tiny_llama_dir, tmp_path / "store")),
        "holds shape (3, 3)",
        "(32, 48)",
    )


def test_truncated_dump_names_the_file(cli, tiny_llama_dir, model_scores, tmp_path):
    root = write_wandg_format(tmp_path / "save", model_scores)
    target = next((root / "wanda_score").glob("W_metric_layer_1_name_*o_proj_weight.pkl"))
    target.write_bytes(target.read_bytes()[:40])
    assert_one_line_error(
        cli(*legacy_args(root, tiny_llama_dir, tmp_path / "store")), "cannot read", target.name
    )


def test_negated_dumps_are_flagged_and_can_be_flipped(cli, tiny_llama_dir, model_scores, tmp_path):
    negated = {k: -v for k, v in model_scores.items()}
    root = write_wandg_format(tmp_path / "save", negated)
    result = cli(*legacy_args(root, tiny_llama_dir, tmp_path / "store", "--name", "n"))
    assert result.exit_code == 0 and "--negate" in result.stderr
    assert (
        cli(
            *legacy_args(root, tiny_llama_dir, tmp_path / "store", "--name", "p", "--negate")
        ).exit_code
        == 0
    )
    arrays = imported(tmp_path / "store", "p")
    assert all((a >= 0).all() for a in arrays.values())
