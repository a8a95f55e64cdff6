"""The judges eval-attack offers, named once: `--judge NAME` or `--judge NAME:MODEL`. Each name's
published model is its default; MODEL (a hub id or a directory) replaces it, as for a local copy
or another size. The judges themselves are one module each in evaluation/judges/, registered
under these names (a test holds the two lists equal)."""

from __future__ import annotations

from dataclasses import dataclass

from wandacli.core.errors import ConfigError


@dataclass(frozen=True)
class JudgeName:
    name: str
    default_model: str | None  # None: a rule, or a judge that needs MODEL
    summary: str  # --help's line
    needs_model: bool = False


JUDGE_NAMES: dict[str, JudgeName] = {
    j.name: j
    for j in (
        JudgeName("keyword", None, "the reference's refusal phrases (no model)"),
        JudgeName(
            "harmbench",
            "cais/HarmBench-Llama-2-13b-cls",
            "HarmBench's Llama-2-13B behaviour classifier (yes/no)",
        ),
        JudgeName(
            "harmbench-val",
            "cais/HarmBench-Mistral-7b-val-cls",
            "HarmBench's Mistral-7B validation classifier (yes/no)",
        ),
        JudgeName(
            "llamaguard",
            "meta-llama/Llama-Guard-3-8B",
            "Llama Guard 3 8B on the response (safe/unsafe, its 14 categories)",
        ),
        JudgeName(
            "llamaguard-1b",
            "meta-llama/Llama-Guard-3-1B",
            "Llama Guard 3 1B on the response (safe/unsafe, its 13 categories)",
        ),
        JudgeName(
            "strongreject",
            "qylu4156/strongreject-15k-v1",
            "StrongREJECT's fine-tuned Gemma-2B judge: a score in [0, 1]",
        ),
        JudgeName(
            "strongreject-rubric",
            None,
            "StrongREJECT's rubric asked of any chat model MODEL: (1 - refused) * "
            "(convincing + specific - 2) / 8",
            needs_model=True,
        ),
        JudgeName(
            "wildguard",
            "allenai/wildguard",
            "WildGuard: harmful request, refusal, harmful response",
        ),
    )
}
# `hf:MODEL`, the name before the named judges: HarmBench's classifier prompt asked of MODEL.
LEGACY_PREFIX = "hf"


def parse_judge(text: str) -> tuple[str, str | None]:
    """`NAME` or `NAME:MODEL` → (name, model or None); `hf:MODEL` is `harmbench:MODEL`."""
    name, _, model = text.partition(":")
    if name == LEGACY_PREFIX and model:
        name = "harmbench"
    known = JUDGE_NAMES.get(name)
    if known is None or (":" in text and not model):
        raise ConfigError(
            f"unknown --judge {text!r}: use one of {', '.join(JUDGE_NAMES)}, optionally "
            "NAME:MODEL for another copy of its model (a hub id or a directory)"
        )
    if name == "keyword" and model:
        raise ConfigError("--judge keyword takes no model: it is the reference's phrase rule")
    if known.needs_model and not model:
        raise ConfigError(
            f"--judge {name} needs the chat model that answers its rubric: {name}:MODEL"
        )
    return name, model or known.default_model
