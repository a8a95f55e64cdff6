"""What a generation backend offers eval-attack (lm-eval's `LM` plays this part there): one
`generate` for every configuration, the tokens it generated, and `close`. A backend is one
module in this folder with a `BACKEND` and one line in the registry (backends/__init__.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Response:
    """One generated response: its text, and whether the model ended it (its end of sequence)
    before the token budget, which the keyword rule needs (evaluation/keyword_rule.py)."""

    text: str
    ended: bool = True


class Generator(Protocol):
    generated_tokens: int

    def generate(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool,
        samples: int,
        sampling: bool,
        seed: int,
        temperature: float = 1.0,
    ) -> list[list[Response]]:
        """For each text, `samples` continuations (greedy, or sampled at `temperature`)."""
        ...

    def close(self) -> None:
        """Release what the backend holds (a saved copy of the model, an engine)."""
        ...


@dataclass(frozen=True)
class Backend:
    """A backend: `check` refuses it before anything is loaded (not installed), `make` starts
    it on the model under test (config: eval-attack's settings; out: the results folder);
    `sampler` names how it draws sampled responses (runs drawn otherwise are not reused)."""

    name: str
    check: Callable[[], None]
    make: Callable[[Any, Any, Path, Any], Generator]
    sampler: str


def always_available() -> None:
    """The check of a backend that needs nothing beyond wandacli's own dependencies."""
