"""`wandacli prune` end to end on the tiny model: masks in the store, saved models, the
reference's .pt export, filters, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.test_score_cli import assert_one_line_error, score_args
from wandacli.config.settings import ModelSpec
from wandacli.models.loader import load_model
from wandacli.removal import masks as pruning
from wandacli.store.files import MaskFile, ScoreSet


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory, tiny_llama_dir, pairs_csv) -> Path:
    """A store with wanda and wandg safety sets and a utility set, on the tiny Llama."""
    from typer.testing import CliRunner

    from wandacli.cli import app

    store = tmp_path_factory.mktemp("pruned") / "store"
    runner = CliRunner()
    for method, name in (("wanda", "safety"), ("wandg", "gsafety"), ("wandg", "gutility")):
        args = score_args(tiny_llama_dir, store, "--name", name, method=method, data=pairs_csv)
        if name == "gutility":
            args += ["--seed", "5"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.stderr
    return store


@pytest.fixture()
def own_store(scored_store, tmp_path) -> Path:
    """A copy of the scored store for a test that changes it."""
    import shutil

    return Path(shutil.copytree(scored_store, tmp_path / "store"))


def prune(cli, store, *args):
    return cli("prune", "--store", str(store), "--no-progress", *args)


def mask_of(store, name) -> dict[str, np.ndarray]:
    with MaskFile(store / "masks" / f"{name}.h5") as mask_file:
        return {key: mask_file.read(key) for key in mask_file.keys}


def scores_of(store, name) -> dict[str, np.ndarray]:
    with ScoreSet(store / "scores" / f"{name}.h5") as score_set:
        return {key: score_set.read(key) for key in score_set.keys}


class TestMasks:
    def test_row_mask_in_the_store(self, cli, scored_store):
        result = prune(cli, scored_store, "--scores", "safety", "--sparsity-ratio", "0.5", "--json")
        assert result.exit_code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["name"] == "safety.r0.5" and summary["sparsity"] == 0.5
        scores = scores_of(scored_store, "safety")
        masks = mask_of(scored_store, "safety.r0.5")
        for key, mask in masks.items():
            np.testing.assert_array_equal(mask, pruning.row_mask(scores[key], 0.5))
        with h5py.File(scored_store / "masks" / "safety.r0.5.h5") as handle:
            assert handle.attrs["format"] == "wandacli-mask"
            dataset = handle["0/mlp.down_proj"]
            assert dataset.dtype == np.uint8 and dataset.shape == (32, 6)
            assert tuple(dataset.attrs["shape"]) == (32, 48)
            meta = json.loads(handle.attrs["meta"])
        assert meta["score_sets"][0]["name"] == "safety"
        assert meta["tie_rule"].startswith("among equal scores the lower index")
        assert meta["mode"] == "row" and meta["sparsity_ratio"] == 0.5

    def test_table_shows_sparsity_by_layer_and_module(self, cli, scored_store):
        result = prune(
            cli, scored_store, "--scores", "safety", "--sparsity-ratio", "0.25", "--name", "quarter"
        )
        assert result.exit_code == 0, result.stderr
        assert (
            "25.00" in result.stdout and "down" in result.stdout and "mask written" in result.stdout
        )

    def test_prune_highest_flips_selection(self, cli, scored_store):
        # Both masks made here: under pytest-xdist another worker may run the test that made
        # the lowest-first one (a finished request is not made twice).
        assert prune(cli, scored_store, "--scores", "safety", "-r", "0.5").exit_code == 0
        assert (
            prune(cli, scored_store, "--scores", "safety", "-r", "0.5", "--neg-prune").exit_code
            == 0
        )
        low, high = mask_of(scored_store, "safety.r0.5"), mask_of(scored_store, "safety.r0.5.top")
        scores = scores_of(scored_store, "safety")
        for key in low:
            for row, values in enumerate(scores[key]):
                assert values[high[key][row]].min() >= values[low[key][row]].max()

    def test_nm(self, cli, scored_store):
        assert (
            prune(cli, scored_store, "--scores", "safety", "--sparsity-type", "2:4").exit_code == 0
        )
        for mask in mask_of(scored_store, "safety.2of4").values():
            assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()

    def test_set_difference_ignores_prune_highest(self, cli, scored_store):
        args = ["--scores", "gsafety", "--utility-scores", "gutility", "--p", "0.2", "--q", "0.3"]
        assert prune(cli, scored_store, *args).exit_code == 0
        assert prune(cli, scored_store, *args, "--prune-highest", "--name", "flag").exit_code == 0
        plain = mask_of(scored_store, "gsafety-minus-gutility.q0.3.p0.2")
        flagged = mask_of(scored_store, "flag")
        safety, utility = scores_of(scored_store, "gsafety"), scores_of(scored_store, "gutility")
        for key in plain:
            np.testing.assert_array_equal(
                plain[key], pruning.set_difference_mask(safety[key], utility[key], 0.2, 0.3)
            )
            np.testing.assert_array_equal(plain[key], flagged[key])

    def test_filters(self, cli, scored_store):
        result = prune(
            cli,
            scored_store,
            "--scores",
            "safety",
            "-r",
            "0.5",
            "--layers",
            "1",
            "--modules",
            "mlp.*",
        )
        assert result.exit_code == 0, result.stderr
        masks = mask_of(scored_store, "safety.r0.5.L1.Mmlp._")
        for key, mask in masks.items():
            pruned = key.startswith("1/mlp.")
            assert mask.any() == pruned, key

    def test_score_set_by_path_uses_its_store(self, cli, scored_store):
        path = scored_store / "scores" / "safety.h5"
        result = cli("prune", "--scores", str(path), "-r", "0.1", "--no-progress")
        assert result.exit_code == 0, result.stderr
        assert (scored_store / "masks" / "safety.r0.1.h5").is_file()

    def test_the_same_command_again_has_nothing_to_do(self, cli, own_store):
        assert prune(cli, own_store, "--scores", "safety", "-r", "0.3").exit_code == 0
        mask = own_store / "masks" / "safety.r0.3.h5"
        before = mask.stat().st_mtime_ns
        again = prune(cli, own_store, "--scores", "safety", "-r", "0.3")
        assert again.exit_code == 0, again.stderr
        assert "'safety.r0.3' is already complete, nothing to do" in again.stdout
        assert mask.stat().st_mtime_ns == before

    def test_other_settings_under_the_same_name_are_refused_naming_them(self, cli, own_store):
        assert (
            prune(cli, own_store, "--scores", "safety", "-r", "0.3", "--name", "m").exit_code == 0
        )
        mask = own_store / "masks" / "m.h5"
        before = mask.stat().st_mtime_ns
        assert_one_line_error(
            prune(cli, own_store, "--scores", "safety", "-r", "0.4", "--name", "m"),
            "already exists",
            "sparsity_ratio: 0.3 → 0.4",
            "--overwrite",
        )
        assert mask.stat().st_mtime_ns == before
        assert (
            prune(
                cli, own_store, "--scores", "safety", "-r", "0.4", "--name", "m", "--overwrite"
            ).exit_code
            == 0
        )

    def test_a_mask_from_a_recomputed_score_set_is_stale(self, cli, own_store, tiny_llama_dir):
        assert prune(cli, own_store, "--scores", "safety", "-r", "0.3").exit_code == 0
        safety = own_store / "scores" / "safety.h5"
        import h5py

        with h5py.File(safety, "r+") as handle:  # as if `score --overwrite` had run since
            meta = json.loads(handle.attrs["meta"])
            meta["finished"] = "2099-01-01T00:00:00+00:00"
            handle.attrs["meta"] = json.dumps(meta)
        assert_one_line_error(
            prune(cli, own_store, "--scores", "safety", "-r", "0.3"),
            "already exists",
            "recomputed after the mask was made",
        )

    def test_save_model_of_the_same_mask_is_made_when_missing(
        self, cli, own_store, tiny_llama_dir, tmp_path
    ):
        args = ("--scores", "safety", "-r", "0.3", "--model", str(tiny_llama_dir))
        assert prune(cli, own_store, *args).exit_code == 0
        out = tmp_path / "pruned"
        saved = prune(cli, own_store, *args, "--save-model", str(out))
        assert saved.exit_code == 0, saved.stderr
        assert (out / "wandacli-mask.json").is_file()
        again = prune(cli, own_store, *args, "--save-model", str(out))
        assert again.exit_code == 0 and "already complete" in again.stdout, again.stderr

    def test_model_check_reads_only_the_config(self, cli, scored_store, tiny_llama_dir):
        result = prune(
            cli, scored_store, "--scores", "safety", "-r", "0.2", "--model", str(tiny_llama_dir)
        )
        assert result.exit_code == 0, result.stderr


class TestMatchedCounts:
    """--match-counts: the random control with a set difference's size and layout."""

    def test_every_matrix_prunes_as_many_as_the_given_mask(self, cli, own_store, tiny_llama_dir):
        setdiff = [
            "--scores",
            "gsafety",
            "--utility-scores",
            "gutility",
            "--p",
            "0.2",
            "--q",
            "0.3",
        ]
        assert prune(cli, own_store, *setdiff, "--name", "sd").exit_code == 0
        random_set = score_args(tiny_llama_dir, own_store, "--name", "rand", method="random")
        assert cli(*random_set).exit_code == 0
        result = prune(cli, own_store, "--scores", "rand", "--match-counts", "sd", "--json")
        assert result.exit_code == 0, result.stderr
        payload = json.loads(result.stdout)
        assert payload["name"] == "rand.as-sd" and payload["mode"] == "matched-counts"
        reference, control = mask_of(own_store, "sd"), mask_of(own_store, "rand.as-sd")
        randoms = scores_of(own_store, "rand")
        for key, mask in reference.items():
            assert control[key].sum() == mask.sum(), key
            if mask.any():  # the lowest random scores of the matrix, by the shared tie rule
                expected = pruning.count_mask(randoms[key], int(mask.sum()))
                assert np.array_equal(control[key], expected), key
        assert not all(np.array_equal(control[k], reference[k]) for k in reference)

    def test_it_refuses_a_ratio_beside_it(self, cli, scored_store):
        assert_one_line_error(
            prune(cli, scored_store, "--scores", "safety", "--match-counts", "x", "-r", "0.1"),
            "--sparsity-ratio does not apply with --match-counts",
        )

    def test_a_missing_mask_is_one_line(self, cli, scored_store):
        assert_one_line_error(
            prune(cli, scored_store, "--scores", "safety", "--match-counts", "nope"), "nope"
        )


class TestSavedModels:
    def test_saved_model_zeros_are_exactly_the_mask(
        self, cli, scored_store, tiny_llama_dir, tmp_path
    ):
        out = tmp_path / "pruned"
        result = prune(
            cli,
            scored_store,
            "--scores",
            "safety",
            "-r",
            "0.5",
            "--name",
            "saved",
            "--model",
            str(tiny_llama_dir),
            "--save-model",
            str(out),
            "--device",
            "cpu",
        )
        assert result.exit_code == 0, result.stderr
        original = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
        pruned = load_model(ModelSpec(model=str(out), device="cpu"))
        masks = mask_of(scored_store, "saved")
        for before, after in zip(original.linear_layers, pruned.linear_layers, strict=True):
            mask = masks[after.key]
            weight = after.weight_matrix().detach().numpy()
            np.testing.assert_array_equal(weight == 0, mask)
            np.testing.assert_array_equal(
                weight[~mask], before.weight_matrix().detach().numpy()[~mask]
            )
        assert json.loads((out / "wandacli-mask.json").read_text())["name"] == "saved"
        assert not list(tmp_path.glob(".*tmp*"))

    def test_recover_from_base_copies_base_weights(
        self, cli, scored_store, tiny_llama_dir, tiny_llama_base_dir, tmp_path
    ):
        out = tmp_path / "recovered"
        result = prune(
            cli,
            scored_store,
            "--scores",
            "safety",
            "-r",
            "0.5",
            "--name",
            "recovered",
            "--device",
            "cpu",
            "--model",
            str(tiny_llama_dir),
            "--save-model",
            str(out),
            "--recover-from-base",
            str(tiny_llama_base_dir),
        )
        assert result.exit_code == 0, result.stderr
        base = load_model(ModelSpec(model=str(tiny_llama_base_dir), device="cpu"))
        model = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
        recovered = load_model(ModelSpec(model=str(out), device="cpu"))
        masks = mask_of(scored_store, "recovered")
        for b, m, r in zip(
            base.linear_layers, model.linear_layers, recovered.linear_layers, strict=True
        ):
            mask = torch.from_numpy(masks[r.key])
            assert torch.equal(r.weight_matrix()[mask], b.weight_matrix()[mask])
            assert torch.equal(r.weight_matrix()[~mask], m.weight_matrix()[~mask])

    @pytest.mark.parametrize("highest", [False, True])
    def test_export_follows_the_reference_convention(self, cli, scored_store, tmp_path, highest):
        target = tmp_path / "mask.pt"
        extra = ["--prune-highest"] if highest else []
        result = prune(
            cli,
            scored_store,
            "--scores",
            "safety",
            "-r",
            "0.4",
            "--name",
            f"x{highest}",
            "--export-mask",
            str(target),
            *extra,
        )
        assert result.exit_code == 0, result.stderr
        exported = torch.load(target, weights_only=True)
        masks = mask_of(scored_store, f"x{highest}")
        assert set(exported) == {f"model.layers.{k.replace('/', '.')}" for k in masks}
        for key, mask in masks.items():
            tensor = exported[f"model.layers.{key.replace('/', '.')}"]
            assert tensor.dtype == torch.bool
            expected = mask if highest else ~mask  # True = pruned only when pruning highest
            np.testing.assert_array_equal(tensor.numpy(), expected)


class TestBadInput:
    @pytest.mark.parametrize("ratio", ["1", "1.5", "-0.1"])
    def test_ratio_out_of_range(self, cli, scored_store, ratio):
        assert_one_line_error(
            prune(cli, scored_store, "--scores", "safety", "-r", ratio),
            "--sparsity-ratio must be in (0, 1)",
        )

    def test_a_ratio_of_zero_is_refused_instead_of_an_empty_mask(self, cli, scored_store):
        before = sorted((scored_store / "masks").glob("*.h5"))
        result = prune(cli, scored_store, "--scores", "safety", "-r", "0")
        assert_one_line_error(result, "--sparsity-ratio 0 prunes nothing")
        assert sorted((scored_store / "masks").glob("*.h5")) == before

    def test_n_not_below_m(self, cli, scored_store):
        assert_one_line_error(
            prune(cli, scored_store, "--scores", "safety", "--sparsity-type", "4:4"),
            "N must be at least 1 and less than M",
        )

    def test_in_features_not_divisible(self, cli, scored_store):
        result = prune(cli, scored_store, "--scores", "safety", "--sparsity-type", "2:7")
        assert_one_line_error(result, "divisible by 7", "layer 0 self_attn.q_proj has 32")

    def test_ratio_contradicting_nm(self, cli, scored_store):
        result = prune(
            cli, scored_store, "--scores", "safety", "--sparsity-type", "2:4", "-r", "0.3"
        )
        assert_one_line_error(result, "contradicts")

    @pytest.mark.parametrize(("p", "q"), [("0", "0.1"), ("0.1", "1.2")])
    def test_p_q_out_of_range(self, cli, scored_store, p, q):
        result = prune(
            cli,
            scored_store,
            "--scores",
            "gsafety",
            "--utility-scores",
            "gutility",
            "--p",
            p,
            "--q",
            q,
        )
        assert_one_line_error(result, "must be in (0, 1]")

    def test_missing_score_set(self, cli, scored_store):
        assert_one_line_error(
            prune(cli, scored_store, "--scores", "nope", "-r", "0.5"),
            "no score set 'nope'",
            "safety",
        )

    def test_unfinished_score_set(self, cli, scored_store):
        (scored_store / "scores" / "half.parts").mkdir()
        try:
            assert_one_line_error(
                prune(cli, scored_store, "--scores", "half", "-r", "0.5"), "unfinished"
            )
        finally:
            (scored_store / "scores" / "half.parts").rmdir()

    def test_sets_from_different_models(self, cli, scored_store, tiny_llama_3layer_dir, tmp_path):
        other = tmp_path / "other"
        assert cli(*score_args(tiny_llama_3layer_dir, other, method="magnitude")).exit_code == 0
        result = prune(
            cli,
            scored_store,
            "--scores",
            "gsafety",
            "--utility-scores",
            str(other / "scores" / "magnitude.h5"),
            "--p",
            "0.1",
            "--q",
            "0.1",
        )
        assert_one_line_error(result, "different models", "2 layers")

    def test_store_for_another_model(self, cli, scored_store, tiny_llama_3layer_dir, tmp_path):
        result = prune(
            cli,
            scored_store,
            "--scores",
            "safety",
            "-r",
            "0.5",
            "--model",
            str(tiny_llama_3layer_dir),
            "--save-model",
            str(tmp_path / "o"),
            "--name",
            "other-model",
        )
        assert_one_line_error(result, "another model", "stored has 2 layers, model has 3")
        assert not (scored_store / "masks" / "other-model.h5").exists()
        assert not (tmp_path / "o").exists()

    def test_save_model_needs_model(self, cli, scored_store, tmp_path):
        result = prune(
            cli,
            scored_store,
            "--scores",
            "safety",
            "-r",
            "0.5",
            "--save-model",
            str(tmp_path / "o"),
        )
        assert_one_line_error(result, "--save-model needs --model")

    def test_unwritable_out(self, cli, scored_store, tiny_llama_dir, tmp_path):
        blocker = tmp_path / "file"
        blocker.write_text("")
        result = prune(
            cli,
            scored_store,
            "--scores",
            "safety",
            "-r",
            "0.5",
            "--model",
            str(tiny_llama_dir),
            "--save-model",
            str(blocker / "out"),
            "--name",
            "never",
        )
        assert_one_line_error(result, "--save-model directory", "is a file")
        assert not (scored_store / "masks" / "never.h5").exists()

    def test_contradictory_modes(self, cli, scored_store):
        assert_one_line_error(
            prune(
                cli,
                scored_store,
                "--scores",
                "safety",
                "-r",
                "0.5",
                "--variant",
                "--scope",
                "matrix",
            ),
            "--variant",
        )
        assert_one_line_error(
            prune(cli, scored_store, "--scores", "safety", "--p", "0.1"), "--utility-scores"
        )
        result = prune(
            cli,
            scored_store,
            "--scores",
            "gsafety",
            "--utility-scores",
            "gutility",
            "--p",
            "0.1",
            "--q",
            "0.1",
            "-r",
            "0.5",
        )
        assert_one_line_error(result, "does not apply to the set difference")

    def test_modules_matching_nothing(self, cli, scored_store):
        assert_one_line_error(
            prune(cli, scored_store, "--scores", "safety", "-r", "0.5", "--modules", "attn.*"),
            "matches no module",
        )

    def test_missing_ratio(self, cli, scored_store):
        assert_one_line_error(
            prune(cli, scored_store, "--scores", "safety"), "--sparsity-ratio is required"
        )


def test_a_mask_made_before_requests_were_recorded_is_the_same_request(cli, scored_store):
    """A mask of an earlier version keeps its whole settings as `config` and no `request`:
    the same prune finds it complete, another is refused naming what differs."""
    import h5py

    args = ("--scores", "safety", "-r", "0.2", "--name", "old-format")
    assert prune(cli, scored_store, *args).exit_code == 0
    path = scored_store / "masks" / "old-format.h5"
    with h5py.File(path, "r+") as handle:
        meta = json.loads(handle.attrs["meta"])
        meta.pop("request")
        meta["config"] = {k: v for k, v in meta["config"].items() if k not in ("kind", "settings")}
        handle.attrs["meta"] = json.dumps(meta)
    again = prune(cli, scored_store, *args, "--json")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["already_complete"] is True
    other = prune(cli, scored_store, "--scores", "safety", "-r", "0.3", "--name", "old-format")
    assert_one_line_error(other, "already exists", "sparsity_ratio: 0.2 → 0.3")
