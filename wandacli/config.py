"""Settings per command: frozen dataclasses, validated in one place.

Precedence: built-in defaults < config file (`--config FILE.toml`) < flags on the command line.
A config file is TOML (read by the standard library's tomllib, no extra dependency): top-level
keys apply to every command, a table named after a command (`[score]`, `[prune]`, ...) applies
to that command only and wins over the top level. Keys are option names with dashes or
underscores (`nsamples`, `sparsity-ratio`).
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wandacli import reference
from wandacli.errors import ConfigError

DEFAULT_MODEL_ALIAS = "smollm2"
# The embedded model fine-tuned on the CPU to refuse harmful requests (wandacli/organism.py).
ALIGNED_MODEL_ALIAS = "smollm2-aligned"
DEFAULT_STORE = Path("wandacli-store")
# Per-weight scores (masks are made from them) and actsvd's rank statistics (rank edits).
WEIGHT_METHODS = ("wanda", "wandg", "magnitude", "random")
RANK_METHODS = ("actsvd",)
METHODS = WEIGHT_METHODS + RANK_METHODS
DATA_METHODS = ("wanda", "wandg", "actsvd")

CALIBRATION_NSAMPLES = reference.CALIBRATION_NSAMPLES
CALIBRATION_SEED = reference.CALIBRATION_SEED
# The reference used the model's full context (4096 for Llama-2), a known cause of
# out-of-memory errors; calibration samples are rarely longer than a few hundred tokens.
DEFAULT_SEQLEN_CAP = 2048
# Wanda statistics are small (one vector per layer): checkpoint often. wandg accumulators are
# as large as the model's linear weights: checkpoint less often.
# actsvd's checkpoints hold d_in² float64 sums per distinct input (0.8 GB for SmolLM2): rarer.
DEFAULT_CHECKPOINT_EVERY = {"wanda": 8, "wandg": 32, "actsvd": 32}


# ---------------------------------------------------------------------------------------------
# Shared settings


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for: `--model`, `--dtype`, `--device`, `--device-map`."""

    model: str = DEFAULT_MODEL_ALIAS
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    max_memory: str | None = None  # "0=20GiB,1=20GiB,cpu=64GiB", with device_map
    cache_dir: Path | None = None


@dataclass(frozen=True)
class Columns:
    """Column names for local files (`--prompt-column`, `--response-column`, `--text-column`)."""

    prompt: str = "prompt"
    response: str = "response"
    text: str = "text"


# ---------------------------------------------------------------------------------------------
# Config files


def read_config_file(path: Path) -> dict[str, Any]:
    """The parsed TOML file, with a one-line error for anything wrong with it."""
    if path.is_dir():
        raise ConfigError(f"--config {path} is a directory: pass a .toml file")
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist")
    if path.suffix.lower() != ".toml":
        raise ConfigError(f"--config {path}: config files are TOML; use a .toml file")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path} is not valid TOML: {exc}") from exc


def _normalise(table: dict[str, Any]) -> dict[str, Any]:
    return {key.replace("-", "_"): value for key, value in table.items()}


# Tables a config file may hold for tools around wandacli (the Makefile pipeline reads them).
FOREIGN_TABLES = frozenset({"pipeline"})


def default_map(config: dict[str, Any], options_by_command: dict[str, set[str]]) -> dict[str, Any]:
    """Click's `default_map` for the whole app: per command, the top-level keys it has overlaid
    with its own table. Each value is then parsed and validated by the option itself, and flags
    on the command line win. Unknown keys and tables are errors, so a typo never silently falls
    back to a default."""
    known_options = set().union(*options_by_command.values()) if options_by_command else set()
    top = _normalise({k: v for k, v in config.items() if not isinstance(v, dict)})
    for key in top:
        if key not in known_options or key == "config":
            raise ConfigError(
                f"config: unknown key {key!r} (no wandacli command has --{key.replace('_', '-')})"
            )
    for table_name, value in config.items():
        if isinstance(value, dict) and table_name not in set(options_by_command) | FOREIGN_TABLES:
            raise ConfigError(
                f"config: unknown table [{table_name}]: use one of {', '.join(sorted(options_by_command))}"
            )
    result: dict[str, Any] = {}
    for command, options in options_by_command.items():
        table = _normalise(config.get(command, {}))
        for key in table:
            if key not in options or key == "config":
                raise ConfigError(
                    f"config: unknown key {key!r} in [{command}]: `wandacli {command}` has no such option"
                )
        merged = {k: v for k, v in top.items() if k in options}
        merged.update(table)
        if merged:
            result[command] = merged
    return result


def config_path_from_args(args: list[str]) -> Path | None:
    """The value of `--config`/`-c` in a command line, read before parsing so that the file can
    supply the defaults the parser then uses."""
    for index, arg in enumerate(args):
        if arg == "--":
            return None
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
        if arg in ("--config", "-c") and index + 1 < len(args):
            return Path(args[index + 1])
    return None


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


# ---------------------------------------------------------------------------------------------
# prune


@dataclass(frozen=True)
class PruneConfig:
    """Everything `wandacli prune` needs. `scores` is the safety set in set-difference mode."""

    scores: str
    store: Path | None = None  # None: the store holding `scores`, else DEFAULT_STORE
    sparsity_ratio: float | None = None
    sparsity_type: str = "unstructured"
    prune_highest: bool = False
    variant: bool = False
    scope: str = "row"
    utility_scores: str | None = None
    p: float | None = None
    q: float | None = None
    match_counts: str | None = None  # a mask whose per-matrix counts this one copies
    layers: str | None = None
    modules: str | None = None
    name: str | None = None
    model: ModelSpec | None = None
    save_model: Path | None = None
    recover_from_base: str | None = None
    export_mask: Path | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        from wandacli.pruning import parse_nm

        if self.scope not in ("row", "matrix"):
            raise ConfigError(f"unknown --scope {self.scope!r}: use row or matrix")
        if self.set_difference:
            if self.p is None or self.q is None:
                raise ConfigError(
                    "--utility-scores needs --p and --q (the top fractions to compare)"
                )
            for flag, value in (("--p", self.p), ("--q", self.q)):
                if not 0 < value <= 1:
                    raise ConfigError(f"{flag} must be in (0, 1] (got {value})")
            self._refuse_ratio_flags(
                "to the set difference (--utility-scores with --p/--q chooses what is pruned)"
            )
        elif self.match_counts is not None:
            if self.p is not None or self.q is not None:
                raise ConfigError("--p and --q need --utility-scores (the set difference)")
            self._refuse_ratio_flags(
                "with --match-counts (the mask given sets how many weights each matrix prunes)"
            )
        else:
            if self.p is not None or self.q is not None:
                raise ConfigError("--p and --q need --utility-scores (the set difference)")
            try:
                nm = parse_nm(self.sparsity_type)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if nm is not None:
                n, m = nm
                if self.sparsity_ratio is not None and abs(self.sparsity_ratio - n / m) > 1e-9:
                    raise ConfigError(
                        f"--sparsity-type {n}:{m} prunes {n / m:g} of the weights; "
                        f"--sparsity-ratio {self.sparsity_ratio:g} contradicts it: drop it"
                    )
                if self.variant or self.scope != "row":
                    raise ConfigError(
                        f"--sparsity-type {n}:{m} cannot be combined with --variant or --scope matrix"
                    )
            else:
                if self.sparsity_ratio is None:
                    raise ConfigError(
                        "--sparsity-ratio is required (e.g. 0.5), or use --sparsity-type N:M or --utility-scores"
                    )
                if not 0 <= self.sparsity_ratio < 1:
                    raise ConfigError(
                        f"--sparsity-ratio must be in [0, 1) (got {self.sparsity_ratio})"
                    )
            if self.variant and self.scope != "row":
                raise ConfigError("--variant ranks rows: it cannot be combined with --scope matrix")
        if self.save_model is not None and self.model is None:
            raise ConfigError("--save-model needs --model (the model the scores were computed on)")
        if self.recover_from_base is not None and self.save_model is None:
            raise ConfigError(
                "--recover-from-base only changes a saved model: add --save-model OUT"
            )

    def _refuse_ratio_flags(self, alongside: str) -> None:
        """The flags of ratio pruning, refused where something else chooses what is pruned."""
        for given, flag in (
            (self.sparsity_ratio is not None, "--sparsity-ratio"),
            (self.sparsity_type != "unstructured", "--sparsity-type"),
            (self.variant, "--variant"),
            (self.scope != "row", "--scope"),
        ):
            if given:
                raise ConfigError(f"{flag} does not apply {alongside}: drop one of them")

    @property
    def set_difference(self) -> bool:
        return self.utility_scores is not None

    @property
    def nm(self) -> tuple[int, int] | None:
        from wandacli.pruning import parse_nm

        return None if self.set_difference else parse_nm(self.sparsity_type)

    @property
    def mode(self) -> str:
        if self.set_difference:
            return "set-difference"
        if self.match_counts is not None:
            return "matched-counts"
        if self.nm is not None:
            return "n:m"
        if self.variant:
            return "variant"
        return "matrix" if self.scope == "matrix" else "row"

    @property
    def effective_ratio(self) -> float | None:
        nm = self.nm
        return nm[0] / nm[1] if nm else self.sparsity_ratio

    def request(self) -> dict[str, Any]:
        """What decides the mask's bits (the outputs and the model they go to do not)."""
        return prune_request(self.to_json())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("store", "save_model", "export_mask"):
            data[key] = str(data[key]) if data[key] is not None else None
        if self.model is not None:
            data["model"]["cache_dir"] = str(self.model.cache_dir) if self.model.cache_dir else None
        return data


_PRUNE_BOOKKEEPING = frozenset(
    {"store", "name", "overwrite", "model", "save_model", "export_mask", "recover_from_base"}
)


def prune_request(config_json: dict[str, Any]) -> dict[str, Any]:
    """The request part of a PruneConfig's JSON (as stored in a mask's `meta.config`)."""
    return {k: v for k, v in config_json.items() if k not in _PRUNE_BOOKKEEPING}


# ---------------------------------------------------------------------------------------------
# prune, rank edits (ActSVD)

EDIT_RANK_FLAGS = (
    "--remove-top-ranks",
    "--keep-top-ranks",
    "--safety-ranks",
    "--utility-ranks",
    "--rank-pos",
    "--rank-neg",
)


@dataclass(frozen=True)
class EditConfig:
    """`wandacli prune` on rank statistics: a rank edit into DIR/edits/.

    - remove_top_ranks R:  W ← (I − Π_R) W        (the reference's `--top_remove --rank R`)
    - keep_top_ranks K:    W ← Π_K W
    - orthogonal projection with `utility_scores`: W ← W − (I − Π_u) Π_s W, ranks given as
      safety_ranks/utility_ranks (r_s, r_u), or as the reference's rank_neg/rank_pos
      (r_s = min(d_out, d_in) − rank_neg, r_u = min(d_out, d_in) − rank_pos, per module).
    """

    scores: str  # rank statistics (the safety set in the orthogonal projection)
    model: ModelSpec | None = None
    store: Path | None = None
    remove_top_ranks: int | None = None
    keep_top_ranks: int | None = None
    utility_scores: str | None = None
    safety_ranks: int | None = None
    utility_ranks: int | None = None
    rank_pos: int | None = None
    rank_neg: int | None = None
    layers: str | None = None
    modules: str | None = None
    name: str | None = None
    save_model: Path | None = None
    overwrite: bool = False
    # The reference's order: layer by layer, each layer's inputs recorded after the layers
    # before it were edited (recomputed from the model and the sets' recorded data).
    sequential: bool = False

    def __post_init__(self) -> None:
        modes = [
            self.remove_top_ranks is not None,
            self.keep_top_ranks is not None,
            self.utility_scores is not None,
        ]
        direct = self.safety_ranks is not None or self.utility_ranks is not None
        reference = self.rank_pos is not None or self.rank_neg is not None
        if self.utility_scores is None and (direct or reference):
            raise ConfigError(
                "--safety-ranks/--utility-ranks and --rank-neg/--rank-pos need --utility-scores "
                "(the orthogonal projection)"
            )
        if sum(modes) != 1:
            raise ConfigError(
                "a rank edit is one of --remove-top-ranks R, --keep-top-ranks K, or "
                "--utility-scores with --safety-ranks/--utility-ranks (or --rank-neg/--rank-pos)"
            )
        if self.utility_scores is not None:
            if direct and reference:
                raise ConfigError(
                    "give the projection's ranks once: --safety-ranks/--utility-ranks, or the "
                    "reference's --rank-neg/--rank-pos, not both"
                )
            if direct and (self.safety_ranks is None or self.utility_ranks is None):
                raise ConfigError(
                    "the orthogonal projection needs both --safety-ranks and --utility-ranks"
                )
            if reference and (self.rank_pos is None or self.rank_neg is None):
                raise ConfigError("the orthogonal projection needs both --rank-neg and --rank-pos")
            if not direct and not reference:
                raise ConfigError(
                    "the orthogonal projection needs its ranks: --safety-ranks RS --utility-ranks RU "
                    "(or the reference's --rank-neg/--rank-pos)"
                )
        for flag, value in (
            ("--remove-top-ranks", self.remove_top_ranks),
            ("--keep-top-ranks", self.keep_top_ranks),
            ("--safety-ranks", self.safety_ranks),
            ("--utility-ranks", self.utility_ranks),
            ("--rank-pos", self.rank_pos),
            ("--rank-neg", self.rank_neg),
        ):
            if value is not None and value < 0:
                raise ConfigError(f"{flag} must be 0 or more (got {value})")
        if self.model is None:
            raise ConfigError(
                "a rank edit needs the weights (it projects W): pass --model, the model the "
                "rank statistics were computed on"
            )

    @property
    def mode(self) -> str:
        if self.remove_top_ranks is not None:
            return "remove-top-ranks"
        if self.keep_top_ranks is not None:
            return "keep-top-ranks"
        return "orthogonal-projection"

    def ranks_for(self, shape: tuple[int, int]) -> dict[str, int]:
        """The ranks of each basis for a module of `shape` [d_out, d_in]."""
        full = min(shape)
        if self.remove_top_ranks is not None:
            return {"remove": self.remove_top_ranks}
        if self.keep_top_ranks is not None:
            return {"keep": self.keep_top_ranks}
        if self.safety_ranks is not None and self.utility_ranks is not None:
            return {"safety": self.safety_ranks, "utility": self.utility_ranks}
        assert self.rank_neg is not None and self.rank_pos is not None
        return {"safety": full - self.rank_neg, "utility": full - self.rank_pos}

    def request(self) -> dict[str, Any]:
        """What decides the edit's numbers (outputs and bookkeeping excluded): the rank
        settings, and the weights it projects (the model and the dtype they are loaded in)."""
        data = self.to_json()
        request = {
            k: v
            for k, v in data.items()
            if k not in ("store", "name", "overwrite", "save_model", "model")
        }
        model = data.get("model") or {}
        request["model"] = {"model": model.get("model"), "dtype": model.get("dtype")}
        return request

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("store", "save_model"):
            data[key] = str(data[key]) if data[key] is not None else None
        if self.model is not None:
            data["model"]["cache_dir"] = str(self.model.cache_dir) if self.model.cache_dir else None
        return data


def refuse_mask_flags_for_edits(**given: Any) -> None:
    """Mask options given beside a rank flag: one line naming the first."""
    defaults = {
        "sparsity_type": "unstructured",
        "prune_highest": False,
        "variant": False,
        "scope": "row",
    }
    for option, value in given.items():
        if value is not None and value != defaults.get(option):
            flag = "--" + option.replace("_", "-")
            raise ConfigError(
                f"{flag} chooses weights for a mask; a rank edit (--remove-top-ranks, "
                "--keep-top-ranks, the orthogonal projection) removes ranks: drop one of them"
            )


# ---------------------------------------------------------------------------------------------
# eval-attack and eval-utility

ATTACK_CONFIGS = ("basic", "basic_nosys", "multiple_nosys", "gcg")
RESULTS_DIR = Path("wandacli-results")


@dataclass(frozen=True)
class AttackConfig:
    """Everything `wandacli eval-attack` needs."""

    model: ModelSpec = field(default_factory=ModelSpec)
    mask: str | None = None
    store: Path | None = None
    prompts: str = "advbench"
    prompt_column: str | None = None
    limit: int = reference.ATTACK_PROMPTS_USED
    configs: tuple[str, ...] = ATTACK_CONFIGS
    inst: tuple[bool, ...] = (True, False)
    template: str | None = None  # None: chat when the tokenizer has a template, else llama2
    max_new_tokens: int = reference.MAX_NEW_TOKENS
    batch_size: int = 16
    backend: str = "hf"
    judge: str = "keyword"
    samples: int = reference.MULTIPLE_SAMPLES
    temperature: float = reference.MULTIPLE_TEMPERATURE
    seed: int = 0
    out: Path | None = None  # None: wandacli-results/<mask or model>
    overwrite: bool = False
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        unknown = [c for c in self.configs if c not in ATTACK_CONFIGS]
        if unknown or not self.configs:
            raise ConfigError(
                f"unknown --configs {','.join(unknown) or '(empty)'}: use a comma list of {', '.join(ATTACK_CONFIGS)}"
            )
        if self.limit < 1:
            raise ConfigError(f"--limit must be at least 1 (got {self.limit})")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1 (got {self.samples})")
        if self.template not in (None, "chat", "llama2"):
            raise ConfigError(f"unknown --template {self.template!r}: use chat or llama2")
        if self.backend not in ("hf", "vllm"):
            raise ConfigError(f"unknown --backend {self.backend!r}: use hf or vllm")
        if self.judge != "keyword" and not (self.judge.startswith("hf:") and len(self.judge) > 3):
            raise ConfigError(
                f"unknown --judge {self.judge!r}: use keyword or hf:MODEL (a HarmBench-style classifier)"
            )
        if not self.inst:
            raise ConfigError(
                "no instruction-tag variant chosen: use --inst, --no-inst, or neither for both"
            )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("store", "out", "data_dir"):
            data[key] = str(data[key]) if data[key] is not None else None
        data["model"]["cache_dir"] = str(self.model.cache_dir) if self.model.cache_dir else None
        return data


@dataclass(frozen=True)
class UtilityConfig:
    """Everything `wandacli eval-utility` needs."""

    model: ModelSpec = field(default_factory=ModelSpec)
    mask: str | None = None
    store: Path | None = None
    data: str | None = "wikitext"  # None: no perplexity
    seqlen: int | None = None  # None: min(4096, model context), the reference's Llama-2 window
    limit_windows: int | None = None
    zero_shot: tuple[str, ...] = ()
    zero_shot_limit: int | None = reference.ZERO_SHOT_LIMIT
    batch_size: int = 1
    out: Path | None = None
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.seqlen is not None and self.seqlen < 2:
            raise ConfigError(f"--seqlen must be at least 2 (got {self.seqlen})")
        if self.limit_windows is not None and self.limit_windows < 1:
            raise ConfigError(f"--limit-windows must be at least 1 (got {self.limit_windows})")
        if self.zero_shot_limit is not None and self.zero_shot_limit < 1:
            raise ConfigError(f"--zero-shot-limit must be at least 1 (got {self.zero_shot_limit})")
        if self.data is None and not self.zero_shot:
            raise ConfigError(
                "nothing to evaluate: keep --data (perplexity) or add --zero-shot TASKS"
            )
