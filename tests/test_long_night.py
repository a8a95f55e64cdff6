"""A GPU user's long night (issue #32): progress that reaches a log when stderr is not a
terminal (nohup, tmux logging, Slurm, CI), silenced by --no-progress."""

from __future__ import annotations

from tests.test_score_cli import score_args
from wandacli.core.console import LogReporter


def test_log_lines_carry_the_step_its_count_rate_and_time_left(capsys):
    now = [0.0]
    reporter = LogReporter(30.0, clock=lambda: now[0])
    reporter.start("wanda: samples", total=10)
    for _ in range(10):
        now[0] += 10.0  # one sample every 10 s: a line at 30 s, 60 s, 90 s
        reporter.advance()
    reporter.finish()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "wanda: samples: started, 10 steps"
    assert lines[1] == "wanda: samples: 3/10 (30%), 10 s each, about 1m10s left"
    assert len(lines) == 5  # started, 3 periodic lines, done
    assert lines[-1] == "wanda: samples: done, 10/10 in 1m40s"


def test_a_resumed_step_counts_its_rate_from_what_it_does_now(capsys):
    now = [0.0]
    reporter = LogReporter(1.0, clock=lambda: now[0])
    reporter.start("wandg: samples", total=100, completed=90)
    now[0] = 2.0
    reporter.advance(4)
    assert capsys.readouterr().err.splitlines()[-1] == (
        "wandg: samples: 94/100 (94%), 2.00/s, about 3s left"
    )


def test_a_score_run_writes_progress_lines_to_a_log(cli, tiny_llama_dir, pairs_csv, tmp_path,
                                                   monkeypatch):  # fmt: skip
    monkeypatch.setenv("WANDACLI_PROGRESS_SECONDS", "0")
    args = [a for a in score_args(tiny_llama_dir, tmp_path / "store", data=pairs_csv)
            if a != "--no-progress"]  # fmt: skip
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "wanda: samples: started, 6 steps" in lines
    assert any(line.startswith("wanda: samples: 3/6 (50%), ") for line in lines)
    assert any(line.startswith("wanda: samples: done, 6/6 in ") for line in lines)
    quiet = cli(*score_args(tiny_llama_dir, tmp_path / "quiet", data=pairs_csv))
    assert quiet.exit_code == 0 and "samples:" not in quiet.stderr
