"""The prepared device check (bench/gpu_check.py) runs on the CPU with a tiny model."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    """bench/gpu_check.py --tiny: every step of the prepared device check, on a tiny model, so
    that the script a GPU machine will run does not rot."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--tiny", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    log = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [entry["step"] for entry in log] == [
        "score wanda",
        "score wanda (2nd)",
        "score wandg",
        "score actsvd",
        "prune set difference",
        "rank edit",
        "eval-attack",
        "rejudge (llamaguard)",
    ]
    assert all(entry["ok"] for entry in log)
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["results"]
    assert any(name.startswith("llamaguard:") for name in results["judges"])
    assert "per 1,000" in done.stdout
