"""The seams a new user meets, made consistent: `inspect --store` like every other command (the
positional STORE kept), one way of showing a mask's sparsity, a means set described as means,
the report's Markdown in the terminal's names."""

from __future__ import annotations

import json
import re

import pytest

from tests.test_mean_activations import means_args
from tests.test_prune_cli import prune
from tests.test_report import write_result
from tests.test_score_cli import assert_one_line_error, score_args


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory, tiny_llama_dir, pairs_csv):
    """One wanda set of the tiny model, named `safety`."""
    from typer.testing import CliRunner

    from wandacli.cli import app

    store = tmp_path_factory.mktemp("first-day") / "store"
    args = score_args(tiny_llama_dir, store, "--name", "safety", method="wanda", data=pairs_csv)
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return store


def test_inspect_takes_store_as_every_command_does(cli, scored_store):
    by_option = cli("inspect", "--store", str(scored_store), "--json")
    by_argument = cli("inspect", str(scored_store), "--json")
    assert by_option.exit_code == 0, by_option.stderr
    assert json.loads(by_option.stdout) == json.loads(by_argument.stdout)
    both = cli("inspect", str(scored_store), "--store", str(scored_store / "other"))
    assert_one_line_error(both, "two stores given")


def test_a_masks_sparsity_reads_the_same_in_prune_and_inspect(cli, scored_store):
    made = prune(cli, scored_store, "--scores", "safety", "-r", "0.3", "--name", "seam")
    assert made.exit_code == 0, made.stderr
    shown = re.search(r"\((\d+\.\d+%)\)", made.stdout)
    assert shown is not None, made.stdout
    listing = cli("inspect", "--store", str(scored_store))
    row = next(line for line in listing.stdout.splitlines() if "seam" in line)
    assert shown.group(1) in row, (shown.group(1), row)


def test_a_means_set_is_described_as_means(cli, tiny_llama_dir, pairs_csv, tmp_path):
    done = cli(*means_args(tiny_llama_dir, tmp_path / "s", pairs_csv))
    assert done.exit_code == 0, done.stderr
    assert "weights scored" not in done.stdout
    assert "residual streams" in done.stdout


def test_the_markdown_names_the_settings_as_the_terminal_does(cli, tmp_path):
    results = tmp_path / "results"
    asr = {"inst_ASR_basic": 0.06, "inst_ASR_multiple_nosys": 1.0, "ASR_gcg": 0.97}
    write_result(results, "masked", method="wandg", sparsity=0.0086, asr=asr, ppl=6.0)
    document = tmp_path / "results.md"
    assert cli("report", str(results), "--markdown", str(document)).exit_code == 0
    header = next(line for line in document.read_text().splitlines() if "model under test" in line)
    assert all(name in header for name in ("Vanilla", "Adv-Dec", "Adv-Suffix"))
    assert "ASR_" not in header
