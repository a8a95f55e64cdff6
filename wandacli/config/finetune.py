"""`wandacli finetune`'s options: the paper's fine-tuning attack on a pair set, with a stored
mask's weights frozen or rewound, and the transplant of a mask's weights from another model."""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from wandacli.config.declare import (
    at_least,
    check_options,
    nested,
    option,
    or_more,
    settings_json,
    within,
)
from wandacli.config.evaluation import held_out_option
from wandacli.config.settings import ModelSpec
from wandacli.core.errors import ConfigError

MASK_PANEL = "Masked weights"
DATA_PANEL = "Attack data"
# The attack must not train on prompts anything is evaluated or searched on: AdvBench 1-100
# (eval-attack), 101-200 (search's prompts from --offset 100), and JailbreakBench.
DEFAULT_ATTACK_HELD_OUT = "advbench:200,jailbreakbench"
TRAINING_PANEL = "Training"


def _step_list(text: Any) -> tuple[int, ...]:
    if isinstance(text, (tuple, list)):
        return tuple(int(k) for k in text)
    try:
        steps = tuple(sorted({int(part) for part in str(text).split(",") if part.strip()}))
    except ValueError:
        raise ConfigError(f"--save-steps {text!r}: give step numbers, e.g. 5,10") from None
    if any(k < 1 for k in steps):
        raise ConfigError(f"--save-steps {text!r}: steps count from 1")
    return steps


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything `wandacli finetune` needs."""

    out: Path = option(
        MISSING,
        "--out",
        "-o",
        required="--out is required: the directory the fine-tuned model is saved to",
        help="Where the fine-tuned (or transplanted) model is saved, a model directory that "
        "eval-attack --model and eval-utility --model accept.",
        request=False,
    )
    model: ModelSpec = nested(ModelSpec)
    data: str | None = option(
        None,
        "--data",
        "-d",
        metavar="<NAME|FILE>",
        help="The attack's pairs (prompt, response): a pair set name, a CSV/JSONL file with "
        "prompt and response columns, or a JSONL of chat messages (the OpenAI fine-tuning "
        "format of Qi et al.'s pure_bad sets); with --responses-from, a prompt set or file.",
        panel=DATA_PANEL,
    )
    limit: int | None = option(
        None,
        "--limit",
        help="Only the first N pairs (with --responses-from: N prompts answered).",
        panel=DATA_PANEL,
        check=at_least(1),
    )
    offset: int = option(
        0,
        "--offset",
        help="Skip the first N rows of --data (AdvBench: 1-100 are evaluated on, 101-200 "
        "searched on; the study attacks with 201 on).",
        panel=DATA_PANEL,
        check=or_more(0),
    )
    responses_from: str | None = option(
        None,
        "--responses-from",
        metavar="MODEL",
        help="Generate the responses: --data's prompts answered greedily by MODEL (e.g. "
        "smollm2, SmolLM2 before alignment); the answers the keyword judge calls refusals are "
        "left out. Generated once and cached; nothing harmful is shipped.",
        panel=DATA_PANEL,
    )
    response_tokens: int = option(
        128,
        "--response-tokens",
        help="--responses-from: new tokens per generated response.",
        panel=DATA_PANEL,
        check=at_least(16),
    )
    held_out: str = held_out_option(DEFAULT_ATTACK_HELD_OUT, "the attack's prompts", DATA_PANEL)
    store: Path | None = option(
        None, "--store", "-s", help="Store to look the masks up in.", panel=MASK_PANEL
    )
    freeze: str | None = option(
        None,
        "--freeze",
        metavar="MASK",
        help="Keep the mask's weights bitwise as they were: their gradients zeroed at every "
        "step, and the optimiser's update undone on them.",
        panel=MASK_PANEL,
    )
    rewind: str | None = option(
        None,
        "--rewind",
        metavar="MASK",
        help="Train freely, then put the mask's weights back as they were before training "
        "(the reference's rewind_ft_model.py).",
        panel=MASK_PANEL,
    )
    transplant: str | None = option(
        None,
        "--transplant",
        metavar="MASK",
        help="No training: --model with the mask's weights copied from --from (safety restored "
        "by transplanting the attributed weights back).",
        panel=MASK_PANEL,
    )
    from_model: str | None = option(
        None,
        "--from",
        metavar="ALIGNED",
        help="--transplant: the model the mask's weights are copied from.",
        panel=MASK_PANEL,
    )
    steps: int = option(
        20, "--steps", help="Optimiser steps.", panel=TRAINING_PANEL, check=at_least(1)
    )
    lr: float = option(
        2e-5,
        "--lr",
        help="AdamW's peak learning rate (linear warm-up over a tenth of the steps, then "
        "linear decay to zero).",
        panel=TRAINING_PANEL,
        check=within(0, 1, low_open=True, high_open=False),
    )
    batch_size: int = option(
        4, "--batch-size", help="Pairs per step.", panel=TRAINING_PANEL, check=at_least(1)
    )
    max_tokens: int = option(
        512,
        "--max-tokens",
        help="Pairs longer than this (prompt and response, in tokens) are left out.",
        panel=TRAINING_PANEL,
        check=at_least(8),
    )
    lora_rank: int = option(
        0,
        "--lora-rank",
        help="Train rank-R LoRA adapters (peft) on the decoder's linear layers instead of every "
        "weight, saved merged. A mask then acts on the merged delta: --freeze keeps its entries "
        "out of the delta in every step, --rewind drops them after. 0: full fine-tuning.",
        panel=TRAINING_PANEL,
        check=or_more(0),
    )
    lora_alpha: int | None = option(
        None,
        "--lora-alpha",
        help="LoRA's scale: the update is (alpha / R) · B A. Default: 2R.",
        panel=TRAINING_PANEL,
        check=at_least(1),
    )
    checkpoint_every: int = option(
        25,
        "--checkpoint-every",
        help="Write the training state (weights, optimiser, schedule, random state) every N "
        "steps beside --out (OUT.checkpoint/); the same command resumes from it after an "
        "interruption, bitwise as if uninterrupted. 0: never.",
        panel=TRAINING_PANEL,
        check=or_more(0),
    )
    save_steps: tuple[int, ...] = option(
        (),
        "--save-steps",
        metavar="<K,K,...>",
        help="Also save the model as it is after these steps (rewound where --rewind), as "
        "OUT-stepK beside --out: ASR against fine-tuning steps.",
        panel=TRAINING_PANEL,
        cli_type=str,
        parse=_step_list,
        format=lambda steps: ",".join(str(k) for k in steps),
    )
    seed: int = option(
        0, "--seed", help="The batches' order and the model's dropout.", check=or_more(0)
    )
    overwrite: bool = option(
        False, "--overwrite", help="Replace a model already saved at --out.", request=False
    )

    def __post_init__(self) -> None:
        check_options(self)
        # `--dtype auto` trains in float32 (ModelSpec.for_training).
        object.__setattr__(self, "model", self.model.for_training())
        masks = [f for f, v in (("--freeze", self.freeze), ("--rewind", self.rewind)) if v]
        if len(masks) > 1:
            raise ConfigError("--freeze and --rewind are two attacks: choose one")
        if self.transplant is not None:
            if masks:
                raise ConfigError(
                    f"--transplant copies weights without training: drop {masks[0]}, or "
                    "transplant into the model that attack saved"
                )
            if self.from_model is None:
                raise ConfigError("--transplant needs --from ALIGNED: the model to copy from")
        elif self.from_model is not None:
            raise ConfigError("--from is --transplant's source: add --transplant MASK")
        elif self.data is None:
            raise ConfigError("--data is required: the attack's pairs (prompt, response)")
        if self.lora_alpha is not None and not self.lora_rank:
            raise ConfigError("--lora-alpha scales LoRA's update: add --lora-rank R")
        if self.save_steps and self.save_steps[-1] >= self.steps:
            raise ConfigError(
                f"--save-steps {self.save_steps[-1]} is not before the last step ({self.steps}): "
                "the model after the last step is --out itself"
            )

    @property
    def ignored_by_transplant(self) -> list[str]:
        """The attack-data options a transplant does not read (a config's [finetune] table
        sets them for the attacks beside it)."""
        if self.transplant is None:
            return []
        given = (
            ("--data", self.data),
            ("--responses-from", self.responses_from),
            ("--lora-rank", self.lora_rank or None),
        )
        return [flag for flag, value in given if value is not None]

    @property
    def lora_scale_alpha(self) -> int:
        """--lora-alpha, or 2R where not given."""
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    @property
    def mode(self) -> str:
        """full, freeze, rewind or transplant."""
        if self.transplant is not None:
            return "transplant"
        if self.freeze is not None:
            return "freeze"
        return "rewind" if self.rewind is not None else "full"

    def step_dir(self, step: int) -> Path:
        """Where `--save-steps` saves the model after `step` steps."""
        return self.out.parent / f"{self.out.name}-step{step}"

    @property
    def checkpoint_dir(self) -> Path:
        """The training state `--checkpoint-every` writes, beside --out."""
        return self.out.parent / f"{self.out.name}.checkpoint"

    @property
    def mask(self) -> str | None:
        """The mask the run reads: frozen, rewound or transplanted."""
        return self.freeze or self.rewind or self.transplant

    def to_json(self) -> dict[str, Any]:
        return settings_json(self)
