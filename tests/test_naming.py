"""One file-safe name rule: the derived names of masks, edits, results folders and figures, and
the default results folder that eval-attack and eval-utility share."""

from __future__ import annotations

import json
import shutil

import pytest

from wandacli.core.naming import file_safe_name
from wandacli.store.schema import check_name


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("wanda-align_short.r0.5.top", "wanda-align_short.r0.5.top"),
        ("a+b=c,d@e", "a+b=c,d@e"),
        ("tiny llama (v2)", "tiny_llama__v2_"),
        ("org/model", "org_model"),
        ("..", "_."),
        (".hidden", "_hidden"),
        ("modèle", "mod_le"),
        ("", "unnamed"),
    ],
)
def test_file_safe_name(name, safe):
    assert file_safe_name(name) == safe


def test_a_safe_name_is_a_valid_store_name():
    for name in ("tiny llama (v2)", "x/y:z", "-lead", "_x"):
        safe = file_safe_name(name)
        if safe[0].isalnum():
            assert check_name(safe) == safe


@pytest.mark.slow
def test_attack_and_utility_of_one_model_share_one_folder_and_one_report_row(
    cli, tiny_llama_dir, tmp_path, monkeypatch
):
    # A model directory whose name holds characters a folder name should not: both eval
    # commands must derive the same default folder from it.
    model = tmp_path / "tiny llama (v2)"
    shutil.copytree(tiny_llama_dir, model)
    monkeypatch.chdir(tmp_path)
    common = ["--model", str(model), "--device", "cpu", "--no-progress"]
    attack = cli(
        "eval-attack",
        *common,
        "--prompts",
        "advbench",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--configs",
        "basic_nosys",
    )
    assert attack.exit_code == 0, attack.stderr
    utility = cli("eval-utility", *common, "--seqlen", "64", "--limit-windows", "1")
    assert utility.exit_code == 0, utility.stderr
    results = tmp_path / "wandacli-results"
    assert [p.name for p in results.iterdir()] == ["tiny_llama__v2_"]
    folder = results / "tiny_llama__v2_"
    assert (folder / "results.json").is_file() and (folder / "utility.json").is_file()
    report = cli("report", str(results), "--json")
    assert report.exit_code == 0, report.stderr
    rows = json.loads(report.stdout)
    assert len(rows) == 1
    assert rows[0]["perplexity"] is not None and rows[0]["asr"]
