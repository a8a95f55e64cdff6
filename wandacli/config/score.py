"""The settings of `score`, and the part of them that changes the numbers."""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal

from wandacli.config.declare import (
    at_least,
    bookkeeping,
    check_options,
    nested,
    option,
    or_more,
    settings_json,
)
from wandacli.config.settings import (
    CALIBRATION_NSAMPLES,
    CALIBRATION_SEED,
    DATA_DIR_HELP,
    DATA_METHODS,
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_STORE,
    MEAN_POSITIONS,
    METHODS,
    MODEL_PANEL,
    NAMED_CALIBRATION_SETS,
    RANK_METHODS,
    Columns,
    ModelSpec,
)
from wandacli.core.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# score

DATA_PANEL = "Data"
STORE_PANEL = "Store"


@dataclass(frozen=True)
class ScoreConfig:
    """Everything `wandacli score` needs."""

    method: str = option(
        MISSING,
        "--method",
        cli_type=Literal["wanda", "wandg", "magnitude", "random", "actsvd", "mean-activations"],
        required=f"--method is required: {', '.join(METHODS)}",
        help="wanda: |W|·‖X‖₂ over calibration inputs; wandg (SNIP): |W|·Σ|∇W| of the "
        "calibration loss; magnitude: |W|; random: seeded uniform; actsvd: rank statistics "
        "(each input's second moment Σxxᵀ/N) for rank edits, not per-weight scores; "
        "mean-activations: the mean residual stream at the last --positions prompt tokens, "
        "per layer, for a refusal direction (prompts only: a pair set's responses are not "
        "read; each prompt as eval-attack shows it in --template, without a system prompt).",
    )
    model: ModelSpec = nested(ModelSpec)
    data: str | None = option(
        None,
        "--data",
        "-d",
        metavar="<NAME|FILE>",
        help="Calibration set: a named set or a CSV/JSON/JSONL/Parquet/TXT file. Named: "
        + NAMED_CALIBRATION_SETS,
        panel=DATA_PANEL,
    )
    nsamples: int = option(
        CALIBRATION_NSAMPLES,
        "--nsamples",
        "-n",
        help="Calibration samples.",
        panel=DATA_PANEL,
        check=at_least(1),
    )
    seed: int = option(
        CALIBRATION_SEED,
        "--seed",
        help="Which calibration samples are drawn (wanda, wandg, actsvd), or the random scores "
        "(random); mean-activations reads every prompt and magnitude no data.",
    )
    store: Path = option(
        DEFAULT_STORE, "--store", "-s", help="Store directory.", panel=STORE_PANEL, request=False
    )
    name: str | None = option(
        None,
        "--name",
        help="Score set name [default: <method>-<data>].",
        panel=STORE_PANEL,
        request=False,
    )
    seqlen: int | None = option(
        None,
        "--seqlen",
        help="Longest sample in tokens [default: min(2048, model context)].",
        panel=DATA_PANEL,
    )
    template: Literal["raw", "chat"] = option(
        "raw",
        "--template",
        help="raw: prompts as stored (the reference's Llama-2 [INST] text); chat: strip "
        "Llama-2 tags and apply the tokenizer's chat template.",
        panel=DATA_PANEL,
    )
    entangle: bool = option(
        False,
        "--entangle",
        help="Count every token of random seqlen-long windows instead of response tokens only.",
        panel=DATA_PANEL,
    )
    base_model: str | None = option(
        None,
        "--base-model",
        help="The model before alignment, for --use-diff.",
        panel=MODEL_PANEL,
    )
    use_diff: bool = option(
        False, "--use-diff", help="Score |W - W_base| in place of |W|.", panel=MODEL_PANEL
    )
    overwrite: bool = option(
        False, "--overwrite", help="Replace an existing result of the same name.", request=False
    )
    layers_per_pass: int = option(
        0,
        "--layers-per-pass",
        help="wandg, actsvd: decoder layers per pass over the data, to bound memory (0: all).",
    )
    checkpoint_every: int | None = option(
        None,
        "--checkpoint-every",
        help="Samples between checkpoints (0: off) [default: wanda 8, wandg 32].",
        request=False,
    )
    score_dtype: Literal["float32", "float16"] = option(
        "float32",
        "--score-dtype",
        help="Stored precision; float16 halves the size and refuses values above 65504.",
        panel=STORE_PANEL,
    )
    prompt_column: str = option(
        "prompt", "--prompt-column", help="Prompt column of a pair file.", panel=DATA_PANEL
    )
    response_column: str = option(
        "response", "--response-column", help="Response column of a pair file.", panel=DATA_PANEL
    )
    text_column: str = option(
        "text", "--text-column", help="Text column of a text table.", panel=DATA_PANEL
    )
    data_dir: Path | None = option(
        None, "--data-dir", help=DATA_DIR_HELP, panel=DATA_PANEL, request=False
    )
    offload_accumulators: bool = option(
        False,
        "--offload-accumulators",
        help="wandg: keep the |grad| sums in CPU memory (GPU memory ≈ the model alone).",
        request=False,
    )
    positions: int = option(
        MEAN_POSITIONS,
        "--positions",
        help="mean-activations: the last K prompt positions averaged (the post-instruction "
        "tokens: the chat template's assistant cue, Llama-2's [/INST]).",
        panel=DATA_PANEL,
        check=or_more(1),
    )
    # Off by default: [prompts, L + 1, K, d] float32 is 11 MB for the organism's 32 prompts
    # but about 1.7 GB for a 70B model's 128.
    per_prompt: bool = option(
        False,
        "--per-prompt",
        help="mean-activations: also keep each prompt's streams at those positions (float32 "
        "[prompts, layers + 1, K, d_model]), for `prune --directions K`.",
        panel=DATA_PANEL,
    )

    @property
    def columns(self) -> Columns:
        return Columns(self.prompt_column, self.response_column, self.text_column)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.method in DATA_METHODS and not self.data:
            raise ConfigError(
                f"--method {self.method} needs calibration data: pass --data (e.g. align_short)"
            )
        check_options(self)
        if self.seqlen is not None and self.seqlen <= 0:
            raise ConfigError(f"--seqlen must be positive (got {self.seqlen})")
        if self.template not in ("raw", "chat"):
            raise ConfigError(f"unknown --template {self.template!r}: use raw or chat")
        if self.use_diff and not self.base_model:
            raise ConfigError("--use-diff needs --base-model (the model before alignment)")
        if self.base_model and not self.use_diff:
            raise ConfigError(
                "--base-model is only used with --use-diff: add --use-diff or drop it"
            )
        if self.layers_per_pass < 0:
            raise ConfigError(
                f"--layers-per-pass must be 0 (all) or positive (got {self.layers_per_pass})"
            )
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise ConfigError(
                f"--checkpoint-every must be 0 (off) or positive (got {self.checkpoint_every})"
            )
        if self.score_dtype not in ("float32", "float16"):
            raise ConfigError(f"unknown --score-dtype {self.score_dtype!r}: use float32 or float16")
        if self.method == "mean-activations":
            self._check_mean_activations()
        elif self.positions != MEAN_POSITIONS:
            raise ConfigError(
                f"--positions is mean-activations' option; --method {self.method} scores "
                "every counted token: drop --positions"
            )
        elif self.per_prompt:
            raise ConfigError(
                f"--per-prompt is mean-activations' option; --method {self.method} keeps no "
                "prompt's streams: drop --per-prompt"
            )
        if self.method in RANK_METHODS:
            if self.use_diff:
                raise ConfigError(
                    "--use-diff scores weight differences; actsvd records the inputs' second "
                    "moments, which do not depend on it: drop --use-diff"
                )
            if self.score_dtype != "float32":
                raise ConfigError(
                    "actsvd stores its second moments in float32: drop --score-dtype float16"
                )

    def _check_mean_activations(self) -> None:
        """What does not apply to means over prompts: one line naming the option."""
        for flag, given, why in (
            ("--use-diff", self.use_diff, "means are of activations, not weights"),
            (
                "--layers-per-pass",
                self.layers_per_pass != 0,
                "one forward pass gives every layer's residual stream at once",
            ),
            ("--entangle", self.entangle, "each prompt is a sample of its own"),
            ("--seqlen", self.seqlen is not None, "prompts are never cut (their ends count)"),
            ("--score-dtype float16", self.score_dtype != "float32", "means are stored float32"),
        ):
            if given:
                raise ConfigError(f"--method mean-activations: drop {flag} ({why})")

    @property
    def needs_data(self) -> bool:
        return self.method in DATA_METHODS

    @property
    def checkpoint_interval(self) -> int:
        if self.checkpoint_every is not None:
            return self.checkpoint_every
        return DEFAULT_CHECKPOINT_EVERY.get(self.method, 0)

    def default_name(self, data_name: str | None) -> str:
        """`<method>-<dataset>` (a file's stem for files); `<method>` for data-free methods."""
        if not self.needs_data or not data_name:
            return f"{self.method}-seed{self.seed}" if self.method == "random" else self.method
        return f"{self.method}-{data_name}"

    def request(self) -> dict[str, Any]:
        """What decides a score set's numbers, as asked for (before loading anything): a
        finished set made with the same request is this run's result already."""
        return score_request(self.to_json())

    def to_json(self) -> dict[str, Any]:
        """Every setting, as score sets record it (the three columns as one `columns`)."""
        data = settings_json(self)
        data["columns"] = settings_json(self.columns)
        for flat in ("prompt_column", "response_column", "text_column"):
            data.pop(flat)
        data["model"].pop("auto_dtype")
        return data


# ScoreConfig fields that do not change the numbers (where the set goes, how often it
# checkpoints, where data files are looked up: the data's own hash is compared instead).
# The model's options that change a set's numbers (where the weights come from, their dtype,
# the device that computes them); the rest say how they are found or spread.
_MODEL_SPEC_NUMERIC = ("model", "dtype", "device")


def score_request(config_json: dict[str, Any]) -> dict[str, Any]:
    """The request part of a ScoreConfig's JSON (as stored in a set's `meta.config`)."""
    request = {k: v for k, v in config_json.items() if k not in bookkeeping(ScoreConfig)}
    model = request.pop("model", None) or {}
    for key in _MODEL_SPEC_NUMERIC:
        request[f"model.{key}"] = model.get(key)
    return request
