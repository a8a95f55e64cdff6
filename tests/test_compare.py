"""`wandacli compare`: figures against an independent computation (Python sets and sorted
lists), the Jaccard identities, the top-F rule shared with `prune`, the heatmap, bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from rich.console import Console

from tests.test_prune_cli import prune
from tests.test_score_cli import assert_one_line_error, score_args
from wandacli.analysis.compare import average_ranks, compare_files, spearman
from wandacli.core.durable import atomic_h5
from wandacli.reporting import heatmap
from wandacli.store.assemble import set_root_attrs
from wandacli.store.files import MaskFile, ScoreSet, write_mask_array


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama_dir, pairs_csv) -> Path:
    from typer.testing import CliRunner

    from wandacli.cli import app

    root = tmp_path_factory.mktemp("compare") / "store"
    runner = CliRunner()
    for method in ("wanda", "wandg"):
        assert (
            runner.invoke(
                app, score_args(tiny_llama_dir, root, method=method, data=pairs_csv)
            ).exit_code
            == 0
        )
    assert runner.invoke(app, score_args(tiny_llama_dir, root, method="random")).exit_code == 0
    result = runner.invoke(
        app,
        ["prune", "--store", str(root), "--scores", "wanda-pairs", "-r", "0.5", "--no-progress"],
    )
    assert result.exit_code == 0, result.stderr
    return root


def read_all(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as handle:
        fmt = handle.attrs["format"]
    if fmt == "wandacli-mask":
        with MaskFile(path) as mask:
            return {k: mask.read(k) for k in mask.keys}
    with ScoreSet(path) as scores:
        return {k: scores.read(k) for k in scores.keys}


def top_set(scores: np.ndarray, fraction: float) -> set[int]:
    flat = scores.ravel().tolist()
    k = int(fraction * scores.shape[1] * scores.shape[0])
    return set(sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k])


def plain_spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for position in range(i, j + 1):
                result[order[position]] = (i + j) / 2 + 1
            i = j + 1
        return result

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


class TestFigures:
    @pytest.mark.slow
    def test_two_score_sets_match_set_arithmetic_and_ranks(self, store):
        a, b = store / "scores" / "wanda-pairs.h5", store / "scores" / "wandg-pairs.h5"
        result = compare_files([str(a), str(b)], top=0.1)
        scores_a, scores_b = read_all(a), read_all(b)
        (pair,) = result.pairs
        totals = [0, 0, 0]
        for figures in pair.modules:
            set_a, set_b = top_set(scores_a[figures.key], 0.1), top_set(scores_b[figures.key], 0.1)
            both = set_a & set_b
            assert (
                figures.overlap.size_a,
                figures.overlap.size_b,
                figures.overlap.intersection,
            ) == (len(set_a), len(set_b), len(both))
            assert figures.overlap.a_minus_b == len(set_a - set_b)
            assert figures.overlap.jaccard == pytest.approx(len(both) / len(set_a | set_b))
            expected_rho = plain_spearman(
                scores_a[figures.key].ravel().tolist(), scores_b[figures.key].ravel().tolist()
            )
            assert figures.spearman == pytest.approx(expected_rho, abs=1e-9)
            assert figures.spearman_method == "exact"
            totals = [totals[0] + len(set_a), totals[1] + len(set_b), totals[2] + len(both)]
        overall = pair.overall
        assert (overall.size_a, overall.size_b, overall.intersection) == tuple(totals)

    def test_per_row_ranking(self, store):
        a, b = store / "scores" / "wanda-pairs.h5", store / "scores" / "random-seed0.h5"
        result = compare_files([str(a), str(b)], top=0.25, per_row=True)
        for figures in result.pairs[0].modules:
            rows, cols = read_all(a)[figures.key].shape
            assert figures.overlap.size_a == rows * int(0.25 * cols)

    def test_large_matrices_are_sampled_and_say_so(self, store):
        result = compare_files(
            [str(store / "scores" / "wanda-pairs.h5"), str(store / "scores" / "wandg-pairs.h5")],
            sample=100,
        )
        assert {m.spearman_method for m in result.pairs[0].modules} == {"sampled 100"}
        again = compare_files(
            [str(store / "scores" / "wanda-pairs.h5"), str(store / "scores" / "wandg-pairs.h5")],
            sample=100,
        )
        assert [m.spearman for m in result.pairs[0].modules] == [
            m.spearman for m in again.pairs[0].modules
        ]

    def test_jaccard_with_itself_is_one_and_with_the_complement_zero(self, store, tmp_path):
        mask_path = store / "masks" / "wanda-pairs.r0.5.h5"
        complement = tmp_path / "complement.h5"
        with MaskFile(mask_path) as mask, atomic_h5(complement) as handle:
            for key in mask.keys:
                write_mask_array(handle, key, ~mask.read(key))
            set_root_attrs(handle, "wandacli-mask", mask.meta)
        same = compare_files([str(mask_path), str(mask_path)])
        assert same.pairs[0].overall.jaccard == 1.0
        assert same.inputs[0].label != same.inputs[1].label  # told apart
        opposite = compare_files([str(mask_path), str(complement)])
        assert opposite.pairs[0].overall.jaccard == 0.0
        assert all(m.overlap.jaccard == 0.0 for m in opposite.pairs[0].modules)

    def test_top_fraction_matches_the_set_difference_selection(self, cli, store):
        # With p so small that the utility's top set is empty, prune's set difference is the
        # safety set's top-q: compare's top-F must select exactly the same weights.
        result = prune(
            cli,
            store,
            "--scores",
            "wandg-pairs",
            "--utility-scores",
            "random-seed0",
            "--p",
            "1e-9",
            "--q",
            "0.2",
            "--name",
            "topq",
        )
        assert result.exit_code == 0, result.stderr
        figures = compare_files(
            [str(store / "scores" / "wandg-pairs.h5"), str(store / "masks" / "topq.h5")], top=0.2
        )
        assert figures.pairs[0].overall.jaccard == 1.0

    def test_three_inputs_give_a_pairwise_matrix(self, store):
        paths = [
            store / "scores" / "wanda-pairs.h5",
            store / "scores" / "wandg-pairs.h5",
            store / "masks" / "wanda-pairs.r0.5.h5",
        ]
        result = compare_files([str(p) for p in paths])
        matrix = result.jaccard_matrix()
        assert len(result.pairs) == 3 and len(matrix) == 3
        assert all(matrix[i][i] == 1.0 for i in range(3))
        assert matrix[0][1] == matrix[1][0] == result.pairs[0].overall.jaccard

    def test_average_ranks_and_spearman(self):
        assert average_ranks(np.array([10.0, 20.0, 10.0, 30.0])).tolist() == [1.5, 3.0, 1.5, 4.0]
        assert spearman(np.arange(5.0), np.arange(5.0) ** 3) == pytest.approx(1.0)
        assert math.isnan(spearman(np.ones(4), np.arange(4.0)))


class TestOutputs:
    def test_cli_table_csv_json(self, cli, store, tmp_path):
        csv_path, json_path = tmp_path / "c.csv", tmp_path / "c.json"
        result = cli(
            "compare",
            str(store / "scores" / "wanda-pairs.h5"),
            str(store / "scores" / "wandg-pairs.h5"),
            "--csv",
            str(csv_path),
            "--json-file",
            str(json_path),
            "--no-progress",
        )
        assert result.exit_code == 0, result.stderr
        assert "Jaccard by layer and module" in result.stdout and "Spearman" in result.stdout
        rows = list(csv.DictReader(csv_path.open()))
        assert len(rows) == 15  # 14 modules + overall
        assert rows[-1]["layer"] == "all"
        data = json.loads(json_path.read_text())
        assert data["rows"][0]["jaccard"] == pytest.approx(float(rows[0]["jaccard"]))
        assert len(data["jaccard_matrix"]) == 2

    def test_names_with_store(self, cli, store):
        result = cli(
            "compare",
            "wanda-pairs",
            "wandg-pairs",
            "--store",
            str(store),
            "--json",
            "--no-progress",
        )
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["inputs"][0]["label"] == "wanda-pairs"

    @pytest.mark.slow
    @pytest.mark.parametrize("suffix", ["png", "svg"])
    def test_plot_draws_the_heatmap_with_matplotlib(self, cli, store, tmp_path, suffix):
        plot = tmp_path / f"heat.map.{suffix}"
        result = cli(
            "compare",
            str(store / "scores" / "wanda-pairs.h5"),
            str(store / "scores" / "wandg-pairs.h5"),
            "--plot",
            str(plot),
            "--no-progress",
        )
        assert result.exit_code == 0, result.stderr
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("heat")] == [plot.name]
        head = plot.read_bytes()[:200]
        assert head.startswith(b"\x89PNG") if suffix == "png" else b"<svg" in plot.read_bytes()

    def test_plot_to_an_unknown_format_fails_before_computing(self, cli, store, tmp_path):
        result = cli(
            "compare",
            str(store / "scores" / "wanda-pairs.h5"),
            str(store / "scores" / "wandg-pairs.h5"),
            "--plot",
            str(tmp_path / "heat.pdf"),
            "--no-progress",
        )
        assert_one_line_error(result, ".png or .svg")
        assert "Jaccard" not in result.stdout

    @pytest.mark.parametrize("layers", [1, 40])
    def test_heatmap_renders_at_80_columns(self, layers):
        modules = [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
        values = {
            f"{layer}/{module}": (layer * 7 + i) % 11 / 10
            for layer in range(layers)
            for i, module in enumerate(modules)
        }
        values["0/mlp.up_proj"] = math.nan
        console = Console(width=80, record=True, color_system="truecolor")
        console.print(heatmap.jaccard_heatmap("heat", values))
        console.print(heatmap.heatmap_legend())
        text = console.export_text()
        lines = text.splitlines()
        assert all(len(line) <= 80 for line in lines)
        assert len(lines) >= layers + 2
        assert f"{layers - 1} " in text and "gate" in text and "down" in text
        assert "on #" in console.export_html() or "background-color" in console.export_html()


class TestBadInput:
    def test_missing_input(self, cli, store):
        result = cli(
            "compare", str(store / "scores" / "nope.h5"), str(store / "scores" / "wanda-pairs.h5")
        )
        assert_one_line_error(result, "nope.h5 does not exist")

    def test_one_input(self, cli, store):
        assert_one_line_error(
            cli("compare", str(store / "scores" / "wanda-pairs.h5")), "at least two inputs"
        )

    @pytest.mark.parametrize("top", ["0", "1.5", "-1"])
    def test_top_out_of_range(self, cli, store, top):
        result = cli(
            "compare",
            str(store / "scores" / "wanda-pairs.h5"),
            str(store / "scores" / "wandg-pairs.h5"),
            "--top",
            top,
        )
        assert_one_line_error(result, "--top must be in (0, 1]")

    def test_mismatched_models(self, cli, store, tiny_llama_3layer_dir, tmp_path):
        other = tmp_path / "other"
        assert cli(*score_args(tiny_llama_3layer_dir, other, method="magnitude")).exit_code == 0
        result = cli(
            "compare",
            str(store / "scores" / "wanda-pairs.h5"),
            str(other / "scores" / "magnitude.h5"),
        )
        assert_one_line_error(result, "different models", "has 2 layers", "has 3")

    def test_not_a_store_file(self, cli, store, tmp_path):
        junk = tmp_path / "junk.h5"
        junk.write_text("junk")
        result = cli("compare", str(store / "scores" / "wanda-pairs.h5"), str(junk))
        assert_one_line_error(result, "not an HDF5 file")
