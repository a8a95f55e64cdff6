"""The shipped configs and the Makefile pipeline: every config validates, and the demo's
pipeline runs end to end (with a tiny model in place of SmolLM2) and skips finished steps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_score_cli import assert_one_line_error
from wandacli.config.files import read_config_file
from wandacli.pipeline import Plan, makefile

CONFIGS = sorted((REPO / "configs").glob("*.toml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_is_valid(cli, config):
    result = cli("check-config", str(config))
    assert result.exit_code == 0, result.stderr
    assert "are valid" in result.stderr
    plan = Plan.from_config(read_config_file(config), config)
    assert plan.pq and plan.methods


def test_check_config_names_a_bad_value(cli, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[prune]\nsparsity-ratio = "half"\n')
    assert_one_line_error(cli("check-config", str(path)), "[prune] sparsity_ratio = 'half'")


def test_check_config_refuses_a_bad_pipeline(cli, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[pipeline]\npq = [[0.1, 2.0]]\n")
    assert_one_line_error(cli("check-config", str(path)), "p and q must be in (0, 1]")


@pytest.mark.slow
def test_plan_targets_are_files(tmp_path):
    config = REPO / "configs" / "smollm2-demo.toml"
    text = makefile(
        Plan.from_config(read_config_file(config), config), config, tmp_path, "wandacli", None
    )
    for target in (
        "store/scores/wanda-safety.h5",
        "store/masks/top0.01-wandg-safety.h5",
        "store/masks/wanda-setdiff-q0.1-p0.1.h5",
        "store/scores/random.h5",
        "store/masks/random-as-wanda-setdiff-q0.1-p0.1.h5",
        "compare/wandg-safety-vs-utility.csv",
        "results/dense/results.json",
        "results/wanda-setdiff-q0.15-p0.1/utility.json",
        "results/baseline-smollm2/results.json",
        "results/random-as-top0.01/results.json",
        "results.txt",
    ):
        assert f"{tmp_path / target}:" in text, target


def test_random_controls_copy_each_masks_counts(tmp_path):
    config = tmp_path / "plan.toml"
    config.write_text(
        '[pipeline]\nmethods = ["wandg"]\npq = [[0.1, 0.05]]\nrandom_control = true\n'
    )
    text = makefile(Plan.from_config(read_config_file(config), config), config, tmp_path, "w", None)
    control = tmp_path / "store" / "masks" / "random-as-wandg-setdiff-q0.05-p0.1.h5"
    rule = text[text.index(f"{control}:") :].split("\n\n")[0]
    assert "wandg-setdiff-q0.05-p0.1.h5" in rule.splitlines()[0]  # made after its mask
    assert "--scores random --match-counts wandg-setdiff-q0.05-p0.1" in rule
    without = tmp_path / "plain.toml"
    without.write_text('[pipeline]\nmethods = ["wandg"]\npq = [[0.1, 0.05]]\n')
    plain = makefile(
        Plan.from_config(read_config_file(without), without), without, tmp_path, "w", None
    )
    assert "--method random" not in plain and "--match-counts" not in plain


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_demo_pipeline_runs_end_to_end_with_a_tiny_model(
    tiny_llama_dir, tiny_llama_base_dir, tmp_path
):
    out = tmp_path / "demo"
    bin_dir = str(Path(sys.executable).parent)
    # The demo's config with another tiny model as the baseline (the real one is SmolLM2), one
    # method and one set difference instead of two and three: every kind of step, in fewer
    # processes (each costs seconds of torch import).
    demo_config = (REPO / "configs" / "smollm2-demo.toml").read_text()
    sweep = "pq = [[0.1, 0.05], [0.1, 0.1], [0.1, 0.15]]"
    methods = 'methods = ["wanda", "wandg"]'
    assert 'baseline_models = ["smollm2"]' in demo_config and sweep in demo_config
    assert methods in demo_config
    config = tmp_path / "demo.toml"
    config.write_text(
        demo_config.replace('["smollm2"]', f'["{tiny_llama_base_dir}"]')
        .replace(sweep, "pq = [[0.1, 0.15]]")
        .replace(methods, 'methods = ["wanda"]'),
        encoding="utf-8",
    )
    command = [
        "make",
        "-C",
        str(REPO),
        "--no-print-directory",
        "pipeline",
        f"PIPELINE_CONFIG={config}",
        f"OUT={out}",
        f"MODEL={tiny_llama_dir}",
        # The interpreter running the tests, already installed: no install step inside the test.
        f"BIN={bin_dir}",
        "NEEDS_INSTALL=",
    ]
    env = {**os.environ, "WANDACLI_QUIET": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (out / "results.txt").read_text()
    for label in (
        "dense",
        "top0.01-wanda-safety",
        "wanda-setdiff-q0.15-p0.1",
        "random-as-wanda-setdiff-q0.15-p0.1",
        "random-as-top0.01",
        "baseline-",
    ):
        assert label in table, label
    document = (out / "results.md").read_text()
    assert document.startswith("# Results") and "| model under test |" in document
    # The study's figures, embedded in the document by paths relative to it.
    for stem in ("asr-vs-perplexity", "sparsity-sweep", "jaccard-wanda-safety-vs-wanda-utility"):
        for fmt in ("png", "svg"):
            assert (out / "figures" / f"{stem}.{fmt}").is_file(), stem
        assert f"](figures/{stem}.png)" in document
    assert (out / "compare" / "wanda-safety-vs-utility.csv").is_file()
    # Everything is up to date now: a dry run would only print the table again.
    again = subprocess.run([*command, "-n"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "wandacli" not in again.stdout, again.stdout


def test_report_shows_only_the_configurations_that_ran(cli, tmp_path):
    import json

    for label, asr, ppl in (("dense", 0.0, 30.0), ("masked", 0.75, 31.5)):
        folder = tmp_path / "results" / label
        folder.mkdir(parents=True)
        under_test = {"method": "dense" if label == "dense" else "set-difference"}
        (folder / "results.json").write_text(
            json.dumps(
                {
                    "model_under_test": {**under_test, "actual_sparsity": 0.01},
                    "results": [{"metric": "inst_ASR_basic_nosys", "asr": asr}],
                }
            )
        )
        (folder / "utility.json").write_text(
            json.dumps({"model_under_test": under_test, "perplexity": ppl})
        )
    result = cli("report", str(tmp_path / "results"))
    assert result.exit_code == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "model under test" in line)
    assert "no sys" in header and "basic" not in header.replace("no sys", "")
    assert "gcg" not in header and "multi" not in header
    masked = next(line for line in result.stdout.splitlines() if "masked" in line)
    assert "0.75" in masked and "31.50" in masked


@pytest.mark.slow
def test_baseline_models_are_evaluated_dense_beside_the_study(tmp_path):
    config = tmp_path / "plan.toml"
    config.write_text('[pipeline]\nmethods = ["wandg"]\nbaseline_models = ["smollm2", "org/m"]\n')
    text = makefile(Plan.from_config(read_config_file(config), config), config, tmp_path, "w", None)
    for label, model in (("baseline-smollm2", "smollm2"), ("baseline-org_m", "org/m")):
        for name in ("results.json", "utility.json"):
            target = tmp_path / "results" / label / name
            rule = text[text.index(f"{target}:") :].split("\n\n")[0]
            assert f"--model {model} " in rule and "--mask" not in rule, rule
        assert f"{tmp_path / 'results' / label / 'results.json'}" in text.split("results.txt:")[1]
