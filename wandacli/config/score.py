"""The settings of `score`, and the part of them that changes the numbers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wandacli.config.settings import (
    CALIBRATION_NSAMPLES,
    CALIBRATION_SEED,
    DATA_METHODS,
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_STORE,
    MEAN_POSITIONS,
    METHODS,
    RANK_METHODS,
    Columns,
    ModelSpec,
)
from wandacli.core.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# score


@dataclass(frozen=True)
class ScoreConfig:
    """Everything `wandacli score` needs."""

    method: str
    model: ModelSpec = field(default_factory=ModelSpec)
    data: str | None = None
    nsamples: int = CALIBRATION_NSAMPLES
    seed: int = CALIBRATION_SEED
    store: Path = DEFAULT_STORE
    name: str | None = None
    seqlen: int | None = None
    template: str = "raw"
    entangle: bool = False
    base_model: str | None = None
    use_diff: bool = False
    overwrite: bool = False
    layers_per_pass: int = 0  # 0: every layer in one pass
    checkpoint_every: int | None = None  # None: DEFAULT_CHECKPOINT_EVERY[method]
    score_dtype: str = "float32"
    columns: Columns = field(default_factory=Columns)
    data_dir: Path | None = None
    offload_accumulators: bool = False
    positions: int = MEAN_POSITIONS  # mean-activations: the last K prompt positions

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.method in DATA_METHODS and not self.data:
            raise ConfigError(
                f"--method {self.method} needs calibration data: pass --data (e.g. align_short)"
            )
        if self.nsamples < 1:
            raise ConfigError(f"--nsamples must be at least 1 (got {self.nsamples})")
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
        if self.positions < 1:
            raise ConfigError(f"--positions must be 1 or more (got {self.positions})")
        if self.method == "mean-activations":
            self._check_mean_activations()
        elif self.positions != MEAN_POSITIONS:
            raise ConfigError(
                f"--positions is mean-activations' option; --method {self.method} scores "
                "every counted token: drop --positions"
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
        data = asdict(self)
        data["store"] = str(self.store)
        data["data_dir"] = str(self.data_dir) if self.data_dir else None
        data["model"]["cache_dir"] = str(self.model.cache_dir) if self.model.cache_dir else None
        return data


# ScoreConfig fields that do not change the numbers (where the set goes, how often it
# checkpoints, where data files are looked up: the data's own hash is compared instead).
_SCORE_BOOKKEEPING = frozenset(
    {"store", "name", "overwrite", "checkpoint_every", "data_dir", "offload_accumulators"}
)
_MODEL_SPEC_NUMERIC = ("model", "dtype", "device")


def score_request(config_json: dict[str, Any]) -> dict[str, Any]:
    """The request part of a ScoreConfig's JSON (as stored in a set's `meta.config`)."""
    request = {k: v for k, v in config_json.items() if k not in _SCORE_BOOKKEEPING}
    model = request.pop("model", None) or {}
    for key in _MODEL_SPEC_NUMERIC:
        request[f"model.{key}"] = model.get(key)
    return request
