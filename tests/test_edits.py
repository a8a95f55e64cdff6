"""Rank edits from stored rank statistics (`prune --remove-top-ranks`, `--keep-top-ranks`, the
orthogonal projection): the edited weights equal the formulas computed here with numpy from the
stored second moments and the weights; edits apply wherever masks do; bad input is refused in
one line with the store untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_score_cli import assert_one_line_error, score_args
from wandacli.config.settings import ModelSpec
from wandacli.evaluation.under_test import load_model_under_test
from wandacli.models.loader import load_model
from wandacli.store.files import RankStatistics


@pytest.fixture(scope="module")
def rank_store(tmp_path_factory, tiny_llama_dir, pairs_csv) -> Path:
    """actsvd statistics of the tiny model on a safety set and a utility set."""
    from typer.testing import CliRunner

    from wandacli.cli import app

    store = tmp_path_factory.mktemp("ranks") / "store"
    runner = CliRunner()
    for data, name in ((pairs_csv, "safety"), ("utility", "utility")):
        args = score_args(tiny_llama_dir, store, "--name", name, method="actsvd", data=data)
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return store


def top_directions(w: np.ndarray, c: np.ndarray, rank: int) -> np.ndarray:
    """V_r by numpy: eigenvectors of W C Wᵀ with the largest eigenvalues."""
    values, vectors = np.linalg.eigh(w @ c @ w.T)
    return vectors[:, np.argsort(values)[::-1][:rank]]


def weights(model_dir) -> dict[str, np.ndarray]:
    loaded = load_model(ModelSpec(model=str(model_dir), device="cpu"))
    return {lin.key: lin.weight_matrix().double().numpy() for lin in loaded.linear_layers}


def moments(store: Path, name: str) -> dict[str, np.ndarray]:
    with RankStatistics(store / "scores" / f"{name}.h5") as statistics:
        return {key: statistics.read(key) for key in statistics.keys}


def edited(model_dir, store: Path, edit: str) -> dict[str, np.ndarray]:
    """The weights of the model under test with the edit applied in memory (eval's path)."""
    under_test = load_model_under_test(ModelSpec(model=str(model_dir), device="cpu"), edit, store)
    assert under_test.is_edit
    return {
        lin.key: lin.weight_matrix().double().numpy() for lin in under_test.loaded.linear_layers
    }


def prune_ranks(cli, store, model_dir, *args):
    result = cli("prune", "--store", store, "--model", model_dir, "--no-progress", "--json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


class TestEditsEqualTheFormulas:
    def test_remove_top_ranks(self, cli, rank_store, tiny_llama_dir):
        summary = prune_ranks(
            cli, rank_store, tiny_llama_dir, "--scores", "safety", "--remove-top-ranks", "3"
        )
        assert summary["mode"] == "remove-top-ranks" and summary["modules"] == 14
        w, c = weights(tiny_llama_dir), moments(rank_store, "safety")
        after = edited(tiny_llama_dir, rank_store, summary["name"])
        for key in w:
            v = top_directions(w[key], c[key], 3)
            expected = w[key] - v @ (v.T @ w[key])
            np.testing.assert_allclose(after[key], expected, atol=2e-5, err_msg=key)
        full = sum(min(a.shape) for a in w.values())
        assert summary["removed_rank_fraction"] == pytest.approx(14 * 3 / full)

    def test_keep_top_ranks(self, cli, rank_store, tiny_llama_dir):
        summary = prune_ranks(
            cli, rank_store, tiny_llama_dir, "--scores", "safety", "--keep-top-ranks", "5"
        )
        w, c = weights(tiny_llama_dir), moments(rank_store, "safety")
        after = edited(tiny_llama_dir, rank_store, summary["name"])
        for key in w:
            v = top_directions(w[key], c[key], 5)
            np.testing.assert_allclose(after[key], v @ (v.T @ w[key]), atol=2e-5, err_msg=key)
            assert np.linalg.matrix_rank(after[key], tol=1e-4) <= 5

    @pytest.mark.parametrize("ranks", [("--safety-ranks", "6", "--utility-ranks", "9")])
    def test_orthogonal_projection(self, cli, rank_store, tiny_llama_dir, ranks):
        summary = prune_ranks(
            cli,
            rank_store,
            tiny_llama_dir,
            "--scores",
            "safety",
            "--utility-scores",
            "utility",
            *ranks,
        )
        assert summary["mode"] == "orthogonal-projection"
        w = weights(tiny_llama_dir)
        safety, utility = moments(rank_store, "safety"), moments(rank_store, "utility")
        after = edited(tiny_llama_dir, rank_store, summary["name"])
        for key in w:
            v_s, v_u = (
                top_directions(w[key], safety[key], 6),
                top_directions(w[key], utility[key], 9),
            )
            eye = np.eye(w[key].shape[0])
            expected = w[key] - (eye - v_u @ v_u.T) @ (v_s @ v_s.T) @ w[key]
            np.testing.assert_allclose(after[key], expected, atol=2e-5, err_msg=key)
            delta = w[key] - after[key]
            assert np.linalg.matrix_rank(delta, tol=1e-4) <= 6, key
            assert summary["ranks"][key]["removed_rank"] <= 6

    def test_the_references_rank_pos_and_rank_neg_are_per_module_complements(
        self, cli, rank_store, tiny_llama_dir
    ):
        summary = prune_ranks(
            cli,
            rank_store,
            tiny_llama_dir,
            "--scores",
            "safety",
            "--utility-scores",
            "utility",
            "--rank-neg",
            "10",
            "--rank-pos",
            "4",
        )
        w = weights(tiny_llama_dir)
        for key, entry in summary["ranks"].items():
            full = min(w[key].shape)
            assert entry["ranks"] == {"safety": full - 10, "utility": full - 4}, key
            assert entry["full_rank"] == full

    def test_filters_edit_only_the_chosen_modules(self, cli, rank_store, tiny_llama_dir):
        summary = prune_ranks(
            cli,
            rank_store,
            tiny_llama_dir,
            "--scores",
            "safety",
            "--remove-top-ranks",
            "2",
            "--layers",
            "1",
            "--modules",
            "mlp.*",
        )
        assert sorted(summary["ranks"]) == ["1/mlp.down_proj", "1/mlp.gate_proj", "1/mlp.up_proj"]
        before = weights(tiny_llama_dir)
        after = edited(tiny_llama_dir, rank_store, summary["name"])
        for key in before:
            changed = not np.allclose(before[key], after[key])
            assert changed == (key in summary["ranks"]), key


class TestEditsApplyWhereMasksDo:
    @pytest.mark.slow
    def test_eval_attack_and_utility_record_the_edit(
        self, cli, rank_store, tiny_llama_dir, tmp_path
    ):
        summary = prune_ranks(
            cli, rank_store, tiny_llama_dir, "--scores", "safety", "--remove-top-ranks", "2"
        )
        result = cli(
            "eval-utility",
            "--model",
            str(tiny_llama_dir),
            "--device",
            "cpu",
            "--store",
            str(rank_store),
            "--edit",
            summary["name"],
            "--seqlen",
            "64",
            "--limit-windows",
            "1",
            "--out",
            str(tmp_path / "u"),
            "--no-progress",
            "--json",
        )
        assert result.exit_code == 0, result.stderr
        under_test = json.loads(result.stdout)["model_under_test"]
        assert under_test["method"] == "actsvd_remove_top"
        assert under_test["removed_rank_fraction"] == pytest.approx(
            summary["removed_rank_fraction"]
        )
        log = (tmp_path / "u" / "log_actsvd_remove_top.txt").read_text().splitlines()
        assert log[1].split("\t")[2] == "PPL"
        report = cli("report", str(tmp_path))
        assert report.exit_code == 0, report.stderr
        assert "rank %" in report.stdout
        rows = json.loads(cli("report", str(tmp_path), "--json").stdout)
        assert rows[0]["removed_rank_fraction"] == pytest.approx(summary["removed_rank_fraction"])

    def test_save_model_holds_the_edited_weights(self, cli, rank_store, tiny_llama_dir, tmp_path):
        out = tmp_path / "edited-model"
        summary = prune_ranks(
            cli,
            rank_store,
            tiny_llama_dir,
            "--scores",
            "safety",
            "--keep-top-ranks",
            "7",
            "--save-model",
            str(out),
        )
        assert summary["saved_model"] == str(out)
        in_memory = edited(tiny_llama_dir, rank_store, summary["name"])
        saved = weights(out)
        for key, value in in_memory.items():
            np.testing.assert_allclose(saved[key], value, atol=1e-6, err_msg=key)
        # The saved model says what it is: eval commands name its method.
        under_test = load_model_under_test(ModelSpec(model=str(out), device="cpu"), None, None)
        assert under_test.method == "actsvd_keep_top"

    def test_the_same_command_again_has_nothing_to_do(
        self, cli, rank_store, tiny_llama_dir, tiny_llama_base_dir
    ):
        args = ("--scores", "safety", "--remove-top-ranks", "1", "--name", "again")
        prune_ranks(cli, rank_store, tiny_llama_dir, *args)
        second = prune_ranks(cli, rank_store, tiny_llama_dir, *args)
        assert second["already_complete"] is True
        other = cli(
            "prune",
            "--store",
            rank_store,
            "--model",
            tiny_llama_dir,
            "--scores",
            "safety",
            "--remove-top-ranks",
            "2",
            "--name",
            "again",
        )
        assert_one_line_error(other, "already exists", "remove_top_ranks")
        # Other weights (another model of the same shapes) are another edit too.
        other_model = cli(
            "prune",
            "--store",
            rank_store,
            "--model",
            tiny_llama_base_dir,
            "--scores",
            "safety",
            "--remove-top-ranks",
            "1",
            "--name",
            "again",
        )
        assert_one_line_error(other_model, "already exists", "model")

    def test_inspect_lists_edits(self, cli, rank_store, tiny_llama_dir):
        prune_ranks(
            cli, rank_store, tiny_llama_dir, "--scores", "safety", "--remove-top-ranks", "1"
        )
        listed = json.loads(cli("inspect", str(rank_store), "--json").stdout)
        assert any(e["name"] == "safety.remove-top1" and e["complete"] for e in listed["edits"])


def store_files(store: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()
    }


class TestBadInput:
    @pytest.mark.parametrize(
        ("args", "fragment"),
        [
            (["--remove-top-ranks", "99"], "outside [0, 32]"),
            (["--keep-top-ranks", "-1"], "must be 0 or more"),
            (["--utility-scores", "utility", "--safety-ranks", "3"], "both --safety-ranks"),
            (
                ["--utility-scores", "utility", "--rank-neg", "40", "--rank-pos", "1"],
                "--rank-neg gives",
            ),
            (["--remove-top-ranks", "2", "--keep-top-ranks", "2"], "a rank edit is one of"),
            (["--remove-top-ranks", "2", "--sparsity-ratio", "0.5"], "--sparsity-ratio chooses"),
            (["--remove-top-ranks", "2", "--prune-highest"], "--prune-highest chooses"),
            (["--safety-ranks", "2", "--utility-ranks", "2"], "need --utility-scores"),
        ],
    )
    def test_one_line_errors_and_the_store_is_untouched(
        self, cli, rank_store, tiny_llama_dir, args, fragment
    ):
        before = store_files(rank_store)
        result = cli(
            "prune", "--store", rank_store, "--model", tiny_llama_dir, "--scores", "safety", *args
        )
        assert_one_line_error(result, fragment)
        assert store_files(rank_store) == before

    def test_rank_edits_need_the_model(self, cli, rank_store):
        result = cli(
            "prune", "--store", rank_store, "--scores", "safety", "--remove-top-ranks", "1"
        )
        assert_one_line_error(result, "pass --model")

    def test_a_score_set_where_rank_statistics_are_needed(
        self, cli, rank_store, tiny_llama_dir, tmp_path
    ):
        store = tmp_path / "s"
        assert cli(*score_args(tiny_llama_dir, store, method="magnitude")).exit_code == 0
        result = cli(
            "prune",
            "--store",
            store,
            "--model",
            tiny_llama_dir,
            "--scores",
            "magnitude",
            "--remove-top-ranks",
            "1",
        )
        assert_one_line_error(result, "is a score set, not rank statistics")

    def test_sets_from_different_models(
        self, cli, rank_store, tiny_llama_dir, tiny_llama_3layer_dir, pairs_csv
    ):
        other = rank_store.parent / "other"
        args = score_args(
            tiny_llama_3layer_dir, other, "--name", "u3", method="actsvd", data=pairs_csv
        )
        assert cli(*args).exit_code == 0
        before = store_files(rank_store)
        result = cli(
            "prune",
            "--store",
            rank_store,
            "--model",
            tiny_llama_dir,
            "--scores",
            "safety",
            "--utility-scores",
            str(other / "scores" / "u3.h5"),
            "--safety-ranks",
            "2",
            "--utility-ranks",
            "2",
        )
        assert_one_line_error(result, "different models")
        assert store_files(rank_store) == before


@pytest.mark.slow
def test_eigh_and_the_references_randomised_svd_on_smollm2():
    """On the embedded SmolLM2 with real second moments (8 align_short samples): the top-10
    subspace of the exact eigensolver against `torch.svd_lowrank(q=10, niter=20)` on the same
    operator, per module of layers 0 and 15. docs/reference-differences.md quotes these."""
    from wandacli.data.calibration import build_calibration_set
    from wandacli.data.sources import load_raw
    from wandacli.methods.actsvd import SecondMoments, shared_inputs
    from wandacli.removal.ranks import subspace_similarity, top_output_directions

    loaded = load_model(ModelSpec(model="smollm2", device="cpu"))
    keep = [lin for lin in loaded.linear_layers if lin.layer in (0, 15)]
    calibration = build_calibration_set(
        load_raw("align_short"), loaded.tokenizer, nsamples=8, seed=0, seqlen=256, template="chat"
    )
    statistics = SecondMoments(keep, shared_inputs(loaded.model, keep, "cpu"), stop_early=True)
    with statistics.recording():
        for sample in calibration.samples:
            statistics.observe(loaded.model, sample.input_ids, sample.counted)
    similarities = {}
    for lin in keep:
        c = statistics.second_moment(lin.key)
        w = lin.weight_matrix().double()
        mine = top_output_directions(w, c, 10)
        values, vectors = torch.linalg.eigh(c)
        root = vectors * values.clamp_min(0).sqrt()
        torch.manual_seed(0)
        # A' = Lᵀ Wᵀ has A'ᵀA' = W C Wᵀ: the same right singular vectors as the outputs.
        _, _, v = torch.svd_lowrank((root.T @ w.T).float(), q=10, niter=20)
        similarities[lin.key] = round(subspace_similarity(mine, v.double()), 6)
    print(json.dumps(similarities, indent=1))
    assert len(similarities) == 14
    assert min(similarities.values()) > 0.5
    assert float(np.mean(list(similarities.values()))) > 0.9


class TestSubspaceComparison:
    """`compare` on two rank-statistics sets: φ per layer and module."""

    def run(self, cli, rank_store, model_dir, *extra):
        result = cli(
            "compare",
            "safety",
            "utility",
            "--store",
            rank_store,
            "--model",
            model_dir,
            "--no-progress",
            *extra,
        )
        assert result.exit_code == 0, result.stderr
        return result

    def test_similarity_equals_an_independent_computation(self, cli, rank_store, tiny_llama_dir):
        result = self.run(cli, rank_store, tiny_llama_dir, "--ranks", "3,8,20", "--json")
        rows = json.loads(result.stdout)["rows"]
        w = weights(tiny_llama_dir)
        safety, utility = moments(rank_store, "safety"), moments(rank_store, "utility")
        assert len(rows) == 14 * 3
        for row in rows:
            key = f"{row['layer']}/{row['module']}"
            rank = row["rank_a"]
            assert row["rank_b"] == rank
            if rank > min(w[key].shape):
                assert row["subspace_similarity"] is None  # no such rank in this module
                continue
            v_a = top_directions(w[key], safety[key], rank)
            v_b = top_directions(w[key], utility[key], rank)
            expected = float(np.sum((v_a.T @ v_b) ** 2) / rank)
            assert row["subspace_similarity"] == pytest.approx(expected, abs=1e-6), key
        assert any(r["subspace_similarity"] is None for r in rows)  # rank 20 > 16 for k/v

    @pytest.mark.slow
    def test_grid_table_csv_and_plot(self, cli, rank_store, tiny_llama_dir, tmp_path):
        result = self.run(
            cli,
            rank_store,
            tiny_llama_dir,
            "--ranks",
            "2,4",
            "--rank-grid",
            "--csv",
            str(tmp_path / "phi.csv"),
            "--plot",
            str(tmp_path / "phi.png"),
        )
        assert "subspace similarity" in result.stdout and "2×4" in result.stdout
        import csv

        rows = list(csv.DictReader((tmp_path / "phi.csv").open()))
        assert {(r["rank_a"], r["rank_b"]) for r in rows} == {
            ("2", "2"),
            ("2", "4"),
            ("4", "2"),
            ("4", "4"),
        }
        assert (tmp_path / "phi.png").read_bytes().startswith(b"\x89PNG")

    @pytest.mark.slow
    def test_report_draws_the_subspace_heatmap_from_the_csv(
        self, cli, rank_store, tiny_llama_dir, tmp_path
    ):
        from tests.test_report import write_result

        compare_dir = tmp_path / "compare"
        compare_dir.mkdir()
        self.run(
            cli, rank_store, tiny_llama_dir, "--ranks", "5", "--csv", str(compare_dir / "s.csv")
        )
        results = tmp_path / "results"
        write_result(
            results, "dense", method="dense", sparsity=0.0, asr={"inst_ASR_basic": 0.1}, ppl=9.0
        )
        report = cli(
            "report",
            results,
            "--plots",
            tmp_path / "fig",
            "--compare",
            compare_dir,
            "--markdown",
            tmp_path / "r.md",
        )
        assert report.exit_code == 0, report.stderr
        assert (tmp_path / "fig" / "subspaces-safety-vs-utility-r5.png").is_file()
        assert "Rank-level overlap of safety and utility" in (tmp_path / "r.md").read_text()

    @pytest.mark.parametrize(
        ("extra", "fragment"),
        [
            (["--ranks", "0"], "positive integers"),
            (["--ranks", "a,b"], "positive integers"),
        ],
    )
    def test_bad_ranks(self, cli, rank_store, tiny_llama_dir, extra, fragment):
        result = cli(
            "compare", "safety", "utility", "--store", rank_store, "--model", tiny_llama_dir, *extra
        )
        assert_one_line_error(result, fragment)

    def test_the_model_is_needed_and_two_sets_at_a_time(self, cli, rank_store, tiny_llama_dir):
        assert_one_line_error(
            cli("compare", "safety", "utility", "--store", rank_store), "pass --model"
        )
        three = cli(
            "compare",
            "safety",
            "utility",
            "safety",
            "--store",
            rank_store,
            "--model",
            tiny_llama_dir,
        )
        assert_one_line_error(three, "two at a time")


class TestSequentialOrder:
    """`prune --sequential`: the reference's loop, layer by layer."""

    @staticmethod
    def reference_loop(model_dir, data, rank: int) -> dict[str, np.ndarray]:
        """The reference's ActSVD `--top_remove` loop written out here: for each decoder layer
        in order, run the calibration samples through the model (earlier layers already
        edited), record every module's input rows at the counted tokens, take the top right
        singular vectors of A = X Wᵀ by a full SVD, and set W ← W − V Vᵀ W for the whole layer."""
        from wandacli.data.calibration import build_calibration_set
        from wandacli.data.sources import load_raw

        loaded = load_model(ModelSpec(model=str(model_dir), device="cpu"))
        calibration = build_calibration_set(
            load_raw(str(data)), loaded.tokenizer, nsamples=6, seed=0, seqlen=128
        )
        layers = sorted({lin.layer for lin in loaded.linear_layers})
        for layer in layers:
            group = [lin for lin in loaded.linear_layers if lin.layer == layer]
            rows: dict[str, list[torch.Tensor]] = {lin.key: [] for lin in group}
            mask: dict[str, torch.Tensor] = {}

            def hook(key, rows=rows, mask=mask):
                def pre_hook(module, args):
                    x = args[0].reshape(-1, args[0].shape[-1])
                    rows[key].append(x[mask["counted"]].double())

                return pre_hook

            handles = [lin.module.register_forward_pre_hook(hook(lin.key)) for lin in group]
            with torch.no_grad():
                for sample in calibration.samples:
                    mask["counted"] = sample.counted.reshape(-1)
                    loaded.model(input_ids=sample.input_ids)
            for handle in handles:
                handle.remove()
            for lin in group:
                w = lin.weight_matrix().double()
                a = torch.cat(rows[lin.key]) @ w.T
                v = torch.linalg.svd(a, full_matrices=False).Vh[:rank].T
                with torch.no_grad():
                    lin.weight.copy_((w - v @ (v.T @ w)).float())
        return {lin.key: lin.weight_matrix().double().numpy() for lin in loaded.linear_layers}

    def test_sequential_equals_the_reference_loop(self, cli, rank_store, tiny_llama_dir, pairs_csv):
        summary = prune_ranks(
            cli,
            rank_store,
            tiny_llama_dir,
            "--scores",
            "safety",
            "--remove-top-ranks",
            "3",
            "--sequential",
        )
        assert summary["name"].endswith(".seq")
        expected = self.reference_loop(tiny_llama_dir, pairs_csv, 3)
        after = edited(tiny_llama_dir, rank_store, summary["name"])
        for key, value in expected.items():
            np.testing.assert_allclose(after[key], value, atol=5e-5, err_msg=key)
        # Layer 0 sees the same inputs either way; layer 1 does not: the orders differ there.
        store_first = edited(
            tiny_llama_dir,
            rank_store,
            prune_ranks(
                cli, rank_store, tiny_llama_dir, "--scores", "safety", "--remove-top-ranks", "3"
            )["name"],
        )
        np.testing.assert_allclose(store_first["0/mlp.up_proj"], after["0/mlp.up_proj"], atol=5e-5)
        assert not np.allclose(store_first["1/mlp.up_proj"], after["1/mlp.up_proj"], atol=1e-4)

    def test_sequential_projection_saved_model_is_edited_once(
        self, cli, rank_store, tiny_llama_dir, tmp_path
    ):
        out = tmp_path / "seq-model"
        summary = prune_ranks(
            cli,
            rank_store,
            tiny_llama_dir,
            "--scores",
            "safety",
            "--utility-scores",
            "utility",
            "--safety-ranks",
            "4",
            "--utility-ranks",
            "6",
            "--sequential",
            "--save-model",
            str(out),
        )
        in_memory = edited(tiny_llama_dir, rank_store, summary["name"])
        saved = weights(out)
        for key, value in in_memory.items():
            np.testing.assert_allclose(saved[key], value, atol=1e-6, err_msg=key)


def test_an_edit_made_before_requests_were_recorded_is_the_same_request(
    cli, rank_store, tiny_llama_dir
):
    """An edit of an earlier version recorded its request as `config`, with the word `auto`
    for the dtype: the same prune finds it complete (`auto` is the dtype it means now)."""
    import h5py

    args = ("--scores", "safety", "--remove-top-ranks", "1", "--name", "old-edit")
    prune_ranks(cli, rank_store, tiny_llama_dir, *args)
    path = rank_store / "edits" / "old-edit.h5"
    with h5py.File(path, "r+") as handle:
        meta = json.loads(handle.attrs["meta"])
        request = meta.pop("request")
        request["model"]["dtype"] = "auto"
        meta["config"] = request
        handle.attrs["meta"] = json.dumps(meta)
    assert prune_ranks(cli, rank_store, tiny_llama_dir, *args)["already_complete"] is True
