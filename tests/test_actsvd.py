"""`score --method actsvd`: a rank-statistics set whose second moments equal an explicit
computation, shared inputs stored once, and refusals where rank statistics do not fit."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from tests.test_score_cli import arrays, assert_one_line_error, score_args
from wandacli.config.settings import ModelSpec
from wandacli.data.calibration import build_calibration_set
from wandacli.data.sources import load_raw
from wandacli.models.loader import load_model
from wandacli.store.files import RankStatistics


def explicit_second_moments(model_dir, data) -> tuple[dict[str, np.ndarray], int]:
    """Every linear layer's input rows at the counted tokens, gathered by hooks in this test,
    and C = XᵀX / N in float64."""
    loaded = load_model(ModelSpec(model=str(model_dir), device="cpu"))
    calibration = build_calibration_set(
        load_raw(str(data)), loaded.tokenizer, nsamples=6, seed=0, seqlen=128
    )
    rows: dict[str, list[torch.Tensor]] = {lin.key: [] for lin in loaded.linear_layers}
    counted: dict[str, torch.Tensor] = {}

    def hook(key):
        def pre_hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            rows[key].append(x[counted["mask"]].double())

        return pre_hook

    handles = [lin.module.register_forward_pre_hook(hook(lin.key)) for lin in loaded.linear_layers]
    with torch.no_grad():
        for sample in calibration.samples:
            counted["mask"] = sample.counted.reshape(-1)
            loaded.model(input_ids=sample.input_ids)
    for handle in handles:
        handle.remove()
    moments = {}
    tokens = 0
    for key, pieces in rows.items():
        x = torch.cat(pieces)
        tokens = x.shape[0]
        moments[key] = (x.T @ x / x.shape[0]).numpy()
    return moments, tokens


@pytest.mark.slow
def test_second_moments_equal_an_explicit_computation(cli, tiny_llama_dir, pairs_csv, store):
    result = cli(*score_args(tiny_llama_dir, store, "--json", method="actsvd", data=pairs_csv))
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == "actsvd" and summary["name"] == "actsvd-pairs"
    expected, tokens = explicit_second_moments(tiny_llama_dir, pairs_csv)
    stored = arrays(summary["path"])
    assert set(stored) == set(expected)
    for key, value in expected.items():
        assert stored[key].shape == value.shape
        np.testing.assert_allclose(stored[key], value, rtol=2e-5, atol=1e-7, err_msg=key)
    with RankStatistics(summary["path"]) as statistics:
        assert statistics.counted_tokens == tokens
        assert statistics.meta["method"] == "actsvd"


def test_modules_reading_one_input_share_one_stored_array(cli, tiny_llama_dir, pairs_csv, store):
    result = cli(*score_args(tiny_llama_dir, store, "--json", method="actsvd", data=pairs_csv))
    path = json.loads(result.stdout)["path"]
    with RankStatistics(path) as statistics:
        shared = statistics.meta["shared_inputs"]
    assert shared == {
        f"{layer}/{module}": f"{layer}/{owner}"
        for layer in (0, 1)
        for module, owner in (
            ("self_attn.k_proj", "self_attn.q_proj"),
            ("self_attn.v_proj", "self_attn.q_proj"),
            ("mlp.up_proj", "mlp.gate_proj"),
        )
    }
    with h5py.File(path, "r") as handle:
        for key, owner in shared.items():
            assert handle[key].id == handle[owner].id  # one dataset, two names: a hard link
        # 4 distinct inputs per layer (attention in, o_proj in, MLP in, down_proj in).
        distinct = set()
        handle.visititems(
            lambda name, item: (
                distinct.add(h5py.h5o.get_info(item.id).addr)
                if isinstance(item, h5py.Dataset)
                else None
            )
        )
        assert len(distinct) == 8


def test_layers_per_pass_gives_the_same_statistics(cli, tiny_llama_dir, pairs_csv, tmp_path):
    paths = {}
    for per in ("0", "1"):
        result = cli(
            *score_args(
                tiny_llama_dir,
                tmp_path / per,
                "--json",
                "--layers-per-pass",
                per,
                method="actsvd",
                data=pairs_csv,
            )
        )
        assert result.exit_code == 0, result.stderr
        paths[per] = json.loads(result.stdout)["path"]
    one, split = arrays(paths["0"]), arrays(paths["1"])
    for key in one:
        np.testing.assert_array_equal(one[key], split[key], err_msg=key)


def test_inspect_lists_rank_statistics(cli, tiny_llama_dir, pairs_csv, store):
    assert cli(*score_args(tiny_llama_dir, store, method="actsvd", data=pairs_csv)).exit_code == 0
    listed = cli("inspect", str(store), "--json")
    assert listed.exit_code == 0, listed.stderr
    assert "actsvd-pairs" in listed.stdout and '"actsvd"' in listed.stdout


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--use-diff", "--base-model", "x"], "drop --use-diff"),
        (["--score-dtype", "float16"], "float32"),
    ],
)
def test_settings_that_do_not_apply_are_refused(
    cli, tiny_llama_dir, pairs_csv, store, extra, fragment
):
    result = cli(*score_args(tiny_llama_dir, store, *extra, method="actsvd", data=pairs_csv))
    assert_one_line_error(result, fragment)
    assert not store.exists() or not any(store.rglob("*.h5"))


def test_a_mask_from_rank_statistics_is_refused(cli, tiny_llama_dir, pairs_csv, store):
    assert cli(*score_args(tiny_llama_dir, store, method="actsvd", data=pairs_csv)).exit_code == 0
    result = cli("prune", "--store", str(store), "--scores", "actsvd-pairs", "-r", "0.1")
    assert_one_line_error(result, "rank statistics", "--remove-top-ranks")
    assert not (store / "masks").exists() or not any((store / "masks").iterdir())
