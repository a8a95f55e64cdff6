"""`--help` reads as a user expects: flags show no value placeholder, choices show their values,
summaries are whole sentences, and help strings keep their bracketed defaults."""

from __future__ import annotations

import inspect
import re

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from wandacli.cli import app

COMMANDS = sorted(get_command(app).commands)  # type: ignore[attr-defined]
WIDE = {"COLUMNS": "220", "TERMINAL_WIDTH": "220"}


def help_text(*args: str, env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env=env or WIDE)
    assert result.exit_code == 0, result.output
    return result.output


def option_row(text: str, flag: str) -> str:
    """The help row that starts with `flag` (the first column of an options panel)."""
    for line in text.splitlines():
        if re.match(rf"^│\s+\*?\s*{re.escape(flag)}\b", line):
            return line
    raise AssertionError(f"{flag} not in help:\n{text}")


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_no_flag_shows_a_bool_placeholder(command: str) -> None:
    text = help_text(*([command] if command else []))
    assert "<bool>" not in text
    assert "--help" in option_row(text, "--help")


def test_flags_show_nothing_between_name_and_help() -> None:
    text = help_text("report")
    assert re.search(r"--json\s+Print the result as JSON", option_row(text, "--json"))
    # And a flag still takes no value: `--json true` is refused with one line.
    result = CliRunner().invoke(app, ["score", "--json", "true"])
    assert result.exit_code == 2
    assert "unexpected extra argument" in result.output.lower()


@pytest.mark.parametrize(
    ("command", "flag", "shown"),
    [
        ("score", "--method", "<wanda|wandg|magnitude|random|actsvd|mean-activations>"),
        ("score", "--dtype", "<auto|float32|bfloat16|float16>"),
        ("score", "--template", "<raw|chat>"),
        ("prune", "--sparsity-type", "<unstructured|N:M>"),
        ("eval-attack", "--judge", "<NAME[:MODEL]>"),
        ("eval-attack", "--configs", "<basic,basic_nosys,multiple_nosys,gcg>"),
        ("eval-attack", "--backend", "<hf|vllm>"),
        ("eval-attack", "--device-map", "<auto|balanced|sequential|JSON>"),
    ],
)
def test_choices_show_their_values(command: str, flag: str, shown: str) -> None:
    assert shown in option_row(help_text(command), flag)


def test_command_list_shows_each_summary_whole_on_a_wide_terminal() -> None:
    text = help_text()
    group = get_command(app)
    for name in COMMANDS:
        command = group.commands[name]  # type: ignore[attr-defined]
        summary = " ".join(inspect.cleandoc(command.help).split("\n\n")[0].split())
        rows = [line for line in text.splitlines() if re.match(rf"^│ {re.escape(name)}\s", line)]
        assert len(rows) == 1, text
        row = " ".join(rows[0].strip("│ ").split())
        # One row: the summary is not split mid-sentence by the docstring's line breaks.
        assert row == f"{name} {summary}".replace("\\[", "["), text


def test_command_list_wraps_only_at_the_terminal_edge() -> None:
    text = help_text(env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    panel = text[text.index("Commands") :]
    rows = [line for line in panel.splitlines() if line.startswith("│")]
    for previous, current in zip(rows, rows[1:], strict=False):
        if re.match(r"^│ \S", current):  # a new command's first row
            continue
        # A continuation row begins only where the row above was full: its next word would
        # not have fitted before the panel's right edge.
        used = len(previous.rstrip("│").rstrip())
        next_word = current.strip("│ ").split()[0]
        assert used + 1 + len(next_word) > len(previous) - 2, (previous, current)


def test_bracketed_defaults_in_help_strings_are_shown() -> None:
    assert "[default: <method>-<data>]" in option_row(help_text("score"), "--name")
    assert "[default: all]" in option_row(help_text("eval-attack"), "--configs")
    assert "[pipeline]" in help_text("check-config")
