"""The JSON summaries (search.json, results.json, utility.json) are versioned like the HDF5
files: each records its format and version, a reader refuses a newer version in one line, and
files written before versions were recorded read as version 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_report import write_result
from tests.test_score_cli import assert_one_line_error
from wandacli.core.errors import StoreError
from wandacli.store.summaries import (
    SEARCH_FORMAT,
    SUMMARY_VERSION,
    SearchSummary,
    is_complete,
    read_evaluation,
)


def a_search(directory: Path, **extra) -> Path:
    directory.mkdir(parents=True)
    path = directory / "search.json"
    summary = {
        "name": directory.name,
        "request": {"kind": "set-difference", "p": [0.1, 0.2], "q": [0.05, 0.5], "seed": 0},
        "dense": {"refusal": 0.9, "kl": 0.0, "sparsity": 0.0},
        "trials": [
            {"index": 0, "state": "COMPLETE", "params": {"p": 0.1}, "refusal": 0.5, "kl": 0.1},
            {"index": 1, "state": "FAIL", "params": {"p": 0.2}},
        ],
        "front": [],
    } | extra
    path.write_text(json.dumps(summary), encoding="utf-8")
    return path


def test_a_summary_written_before_versions_reads_as_version_1(tmp_path):
    summary = SearchSummary.read(a_search(tmp_path / "searches" / "old"))
    assert summary.name == "old"
    assert [t["index"] for t in summary.complete_trials] == [0]
    assert summary.amount_name == "sparsity"
    assert summary.ranges == {"p": (0.1, 0.2), "q": (0.05, 0.5)}
    # written again, it records its format and version, and keeps what it did not know
    path = tmp_path / "again.json"
    summary.other["updated"] = "now"
    summary.write(path)
    data = json.loads(path.read_text())
    assert (data["format"], data["format_version"]) == (SEARCH_FORMAT, SUMMARY_VERSION)
    assert SearchSummary.read(path).other["updated"] == "now"


def test_one_rule_for_a_complete_trial():
    assert is_complete({"state": "COMPLETE"})
    assert not is_complete({"state": "RUNNING"}) and not is_complete({})


def test_a_newer_summary_is_refused_in_one_line(cli, tmp_path):
    store = tmp_path / "store"
    a_search(store / "searches" / "future", format_version=SUMMARY_VERSION + 1)
    with pytest.raises(StoreError, match="upgrade wandacli"):
        SearchSummary.read(store / "searches" / "future" / "search.json")
    results = tmp_path / "results"
    write_result(results, "dense", method="dense", sparsity=0.0, asr={"inst_basic": 0.1}, ppl=9.0)
    assert cli("report", str(results), "--searches", str(store)).exit_code == 2
    assert_one_line_error(
        cli("report", str(results), "--searches", str(store)), "format_version 2", "upgrade"
    )
    listed = json.loads(cli("inspect", str(store), "--json").stdout)
    assert "upgrade wandacli" in listed["searches"][0]["error"]


def test_a_newer_results_file_is_refused_in_one_line(cli, tmp_path):
    results = tmp_path / "results"
    write_result(results, "dense", method="dense", sparsity=0.0, asr={"inst_basic": 0.1}, ppl=9.0)
    path = results / "dense" / "results.json"
    assert read_evaluation(path).attack_results[0]["asr"] == 0.1
    data = json.loads(path.read_text()) | {"format_version": SUMMARY_VERSION + 1}
    path.write_text(json.dumps(data), encoding="utf-8")
    assert_one_line_error(cli("report", str(results)), "results.json", "upgrade wandacli")
    other = json.loads(path.read_text()) | {"format": "something-else", "format_version": 1}
    path.write_text(json.dumps(other), encoding="utf-8")
    assert_one_line_error(cli("report", str(results)), "is not a wandacli attack results file")
