"""The README's ten-minute tour runs as written: every command of its block, in order, on the
tiny model in place of the organism (the demo's config with the model and the sizes made
small), and it ends in one table of every model under test."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEMO_CONFIG = ROOT / "configs" / "smollm2-demo.toml"

# What the tiny model needs in place of the organism's settings: (config line, its stand-in).
CONFIG_STAND_INS = (
    ('model = "smollm2-aligned"', 'model = "{model}"'),
    ('dtype = "auto"', 'dtype = "float32"'),
    ("nsamples = 32", "nsamples = 4"),
    ("max-new-tokens = 32", "max-new-tokens = 8"),
    ("seqlen = 256", "seqlen = 64\nkl-limit = 4"),
    ("limit-windows = 8", "limit-windows = 2"),
)
# The tiny model has 2 decoder layers: the organism's layer 20 is its last.
COMMAND_STAND_INS = {"--direction-layer 20": "--direction-layer 2", "--nsamples 16": "--nsamples 4"}


def tour_commands(readme: str, variables: dict[str, str]) -> list[list[str]]:
    """The wandacli commands of the README's tour block, in order, with its shell variables and
    for-loops expanded; anything else in the block (the install line) is left out."""
    block = re.search(r"<!-- tour:start -->\n```sh\n(.*?)```\n<!-- tour:end -->", readme, re.S)
    assert block, "the README's tour block (between <!-- tour:start/end --> markers) is gone"
    lines = [line.split(" #")[0].strip() for line in block.group(1).splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    commands: list[list[str]] = []
    loop: tuple[str, list[str]] | None = None
    body: list[str] = []

    def expand(line: str, extra: dict[str, str]) -> list[str]:
        for name, value in {**variables, **extra}.items():
            line = line.replace(f"${name}", value)
        for written, stand_in in COMMAND_STAND_INS.items():
            line = line.replace(written, stand_in)
        return shlex.split(line)

    for line in lines:
        if match := re.fullmatch(r"for (\w+) in (.+); do", line):
            loop, body = (match.group(1), match.group(2).split()), []
        elif line == "done":
            assert loop is not None
            name, values = loop
            commands += [expand(b, {name: v}) for v in values for b in body]
            loop = None
        elif loop is not None:
            body.append(line)
        elif match := re.fullmatch(r"(\w+)=(\S+)", line):
            variables.setdefault(match.group(1), match.group(2))
        elif line.startswith("wandacli "):
            commands.append(expand(line, {}))
    return commands


@pytest.mark.slow
def test_the_readme_tour_runs_as_written_and_ends_in_a_table(cli, tiny_llama_dir, tmp_path,
                                                             monkeypatch):  # fmt: skip
    config = DEMO_CONFIG.read_text(encoding="utf-8")
    for written, stand_in in CONFIG_STAND_INS:
        assert written in config, f"the demo config no longer says {written!r}"
        config = config.replace(written, stand_in.format(model=tiny_llama_dir))
    (tmp_path / "tour.toml").write_text(config, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    commands = tour_commands(
        README.read_text(encoding="utf-8"), {"C": "tour.toml", "S": str(tmp_path / "tour")}
    )
    assert [c[1] for c in commands if c[0] == "wandacli"][-1] == "report"
    for command in commands:
        result = cli(*command[1:])
        assert result.exit_code == 0, f"{shlex.join(command)}: {result.stderr}"
    table = result.stdout
    for name in ("direction", "random-direction", "set-difference", "random-set-difference"):
        assert re.search(rf"│ {re.escape(name)}\s+│", table), name
    assert "tiny-llama" in table  # the dense model's row
    assert "Adv-Dec" in table and "PPL" in table and "KL" in table
