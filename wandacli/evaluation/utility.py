"""What utility is left: perplexity on WikiText-2 (the reference's computation) and zero-shot
accuracy through lm-evaluation-harness (an optional extra)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandacli.config.evaluation import UtilityConfig, results_root
from wandacli.core.console import NullReporter, Reporter, info
from wandacli.core.durable import ensure_writable_directory
from wandacli.core.errors import ConfigError, DataError, interruptible
from wandacli.core.provenance import now_iso, software_versions
from wandacli.evaluation.divergence import KL_RULE, dense_distributions, kl_divergence
from wandacli.evaluation.prompts import model_texts, read_prompts, template_for
from wandacli.evaluation.under_test import (
    ModelUnderTest,
    append_reference_log,
    load_model_under_test,
)
from wandacli.models.pretrained import model_max_length
from wandacli.store.summaries import UTILITY_RESULTS, write_evaluation

# The reference evaluates Llama-2 on windows of its full context, 4096 tokens (Wanda's
# published figures use the same); longer contexts cost memory for no comparability.
DEFAULT_PERPLEXITY_SEQLEN = 4096


def perplexity(
    model: Any,
    input_ids: Any,
    seqlen: int,
    *,
    limit_windows: int | None = None,
    reporter: Reporter | None = None,
) -> tuple[float, int]:
    """(perplexity, windows) over non-overlapping `seqlen` windows of `input_ids` [1, N]: each
    window's mean next-token cross-entropy, weighted by seqlen as the reference does, then
    exp(sum / (windows · seqlen)). A trailing partial window is dropped, as in the reference."""
    import torch

    reporter = reporter or NullReporter()
    windows = input_ids.shape[1] // seqlen
    if limit_windows is not None:
        windows = min(windows, limit_windows)
    if windows == 0:
        raise DataError(
            f"the text has {input_ids.shape[1]} tokens, fewer than one --seqlen {seqlen} window: lower --seqlen"
        )
    device = model.get_input_embeddings().weight.device
    total = 0.0  # float64 sum of the windows' negative log-likelihoods
    reporter.start("perplexity: windows", total=windows)
    with torch.no_grad():
        for index in range(windows):
            inputs = input_ids[:, index * seqlen : (index + 1) * seqlen].to(device)
            logits = model(input_ids=inputs, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(), inputs[:, 1:].reshape(-1)
            )
            total += float(loss) * seqlen
            reporter.advance()
    reporter.finish()
    return math.exp(total / (windows * seqlen)), windows


def require_lm_eval() -> Any:
    """The lm_eval package, or a one-line error saying how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM lives here)
    except ImportError:
        raise ConfigError(
            "zero-shot accuracy needs lm-evaluation-harness: pip install 'wandacli[eval]' (or drop --zero-shot)"
        ) from None
    return lm_eval


LOCAL_TASK_SUFFIXES = (".yaml", ".yml")


def is_local_task(task: str) -> bool:
    return task.lower().endswith(LOCAL_TASK_SUFFIXES)


def local_task_config(path: Path) -> dict[str, Any] | str:
    """A task YAML file as lm-eval's inline config, with relative `dataset_kwargs.data_files`
    resolved against the YAML's folder (lm-eval would resolve them against the current
    directory), so a task folder works from anywhere. A YAML that needs lm-eval's own loader
    (`!function` tags, `include:`) is passed as its path, unchanged."""
    import yaml

    if not path.is_file():
        raise ConfigError(
            f"--zero-shot task file {path} does not exist: give a task YAML or an lm-eval task name"
        )
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return str(path)
    if not isinstance(config, dict) or "task" not in config:
        raise ConfigError(
            f"--zero-shot task file {path} has no `task:` key: it is not an lm-eval task YAML"
        )
    if "include" in config:
        return str(path)
    data_files = (config.get("dataset_kwargs") or {}).get("data_files")
    if data_files is not None:

        def resolve(value: Any) -> Any:
            if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
                return str((path.parent / value).resolve())
            if isinstance(value, list):
                return [resolve(v) for v in value]
            if isinstance(value, dict):
                return {k: resolve(v) for k, v in value.items()}
            return value

        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": resolve(data_files)}
    return config


def zero_shot(
    under_test: ModelUnderTest, tasks: tuple[str, ...], limit: int | None, batch_size: int
) -> dict[str, float]:
    """Accuracy per task through lm-evaluation-harness, on the in-memory model under test.
    A task is an lm-eval task name or a path to a task YAML (local data, no hub needed)."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    HFLM = lm_eval.models.huggingface.HFLM  # noqa: N806 (a class)
    specs = [local_task_config(Path(t)) if is_local_task(t) else t for t in tasks]
    # Indexing lm-eval's thousands of built-in task files takes seconds: skip it when every
    # task is a local file.
    task_manager = TaskManager(include_defaults=not all(is_local_task(t) for t in tasks))
    loaded = under_test.loaded
    model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=model, tasks=specs, num_fewshot=0, limit=limit, task_manager=task_manager
        )
    except (KeyError, ValueError) as exc:
        raise ConfigError(
            f"lm-evaluation-harness rejected the tasks {', '.join(tasks)}: {exc}"
        ) from exc
    except (OSError, ConnectionError, RuntimeError) as exc:
        raise DataError(
            f"a zero-shot task's data is not available ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): "
            "it is downloaded from the Hugging Face hub on first use; connect once or set HF_DATASETS_CACHE"
        ) from exc
    accuracies = {}
    for task, metrics in (results or {}).get("results", {}).items():
        value = metrics.get("acc,none", metrics.get("acc"))
        if isinstance(value, (int, float)):
            accuracies[task] = float(value)
    return accuracies


@dataclass
class UtilityResult:
    under_test: dict[str, Any]
    perplexity: float | None = None
    windows: int = 0
    seqlen: int | None = None
    zero_shot: dict[str, float] = field(default_factory=dict)
    kl: float | None = None  # mean KL(dense ‖ model) on harmless prompts (divergence.py)
    kl_detail: dict[str, Any] | None = None
    out: Path | None = None
    seconds: float = 0.0

    @property
    def zero_shot_mean(self) -> float | None:
        return sum(self.zero_shot.values()) / len(self.zero_shot) if self.zero_shot else None

    def to_json(self) -> dict[str, Any]:
        return {
            "model_under_test": self.under_test,
            "perplexity": self.perplexity,
            "windows": self.windows,
            "seqlen": self.seqlen,
            "zero_shot": self.zero_shot,
            "zero_shot_mean": self.zero_shot_mean,
            "kl": self.kl,
            "kl_detail": self.kl_detail,
            "out": str(self.out) if self.out else None,
            "seconds": round(self.seconds, 3),
        }


def kl_reference_of(config: UtilityConfig) -> str | None:
    """The model the KL is measured from when it is not --model before its --mask:
    --kl-reference, or the dense model a saved pruned or edited model records."""
    from wandacli.removal.apply import DENSE_MODEL_KEY, read_provenance

    if config.kl_reference is not None:
        return config.kl_reference
    if config.removal is None and Path(config.model.model).is_dir():
        recorded = (read_provenance(Path(config.model.model)) or {}).get(DENSE_MODEL_KEY)
        if recorded:
            info(f"KL from {recorded}, the dense model {config.model.model} was saved from")
            return str(recorded)
    return None


def vocabulary_digest(tokenizer: Any) -> str:
    """A digest of the tokenizer's vocabulary (token → id), to tell two tokenizers apart."""
    import hashlib

    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def run_utility(config: UtilityConfig, *, reporter: Reporter | None = None) -> UtilityResult:
    """Perplexity and/or zero-shot accuracy of the model under test; results.json and the
    reference's log lines under the output directory."""
    from wandacli.data.sources import load_raw

    started = time.monotonic()
    if config.zero_shot:
        require_lm_eval()  # before any work, so nothing computed is lost to a missing extra
        for task in config.zero_shot:
            if is_local_task(task):
                local_task_config(Path(task))  # a missing or malformed task file, before loading
    raw = load_raw(config.data, directory=config.data_dir) if config.data else None
    if raw is not None and raw.kind != "text":
        raise DataError(
            f"{config.data!r} is not plain text: perplexity needs text (e.g. wikitext or a .txt file)"
        )
    kl_prompts = (
        read_prompts(
            config.kl_settings.kl_prompts,
            limit=config.kl_settings.kl_limit,
            data_dir=config.data_dir,
            option="--kl-prompts",
        )
        if config.kl
        else None
    )
    dense: dict[str, Any] = {}

    def reference_for_kl(loaded: Any) -> None:
        """The dense model's distributions, before the mask or edit is applied."""
        if kl_prompts is None:
            return
        template = template_for(config.template, loaded.tokenizer)
        texts, special = model_texts(loaded.tokenizer, kl_prompts.texts, template)
        results = config.out.parent if config.out else results_root(config.store)
        cache = config.kl_cache or results / "kl-dense"
        with interruptible(lambda: "nothing was written"):
            dense["distributions"] = dense_distributions(
                loaded,
                texts,
                positions=config.kl_settings.kl_positions,
                add_special_tokens=special,
                cache_dir=cache,
                reporter=reporter,
            )
        dense["template"] = template
        dense["model"] = str(loaded.model_id)
        dense["vocabulary"] = vocabulary_digest(loaded.tokenizer)

    reference = kl_reference_of(config) if kl_prompts is not None else None
    if reference is not None:  # the dense side first, let go before the model under test
        from dataclasses import replace

        from wandacli.models.loader import load_model

        dense_model = ModelUnderTest(load_model(replace(config.model, model=reference)))
        reference_for_kl(dense_model.loaded)
        dense_model.release()
    under_test = load_model_under_test(
        config.model,
        config.removal,
        config.store,
        before_removal=reference_for_kl if reference is None else None,
        allow_other_model=config.allow_other_model,
    )
    if kl_prompts is not None:
        if reference is None and under_test.removal_path is None and under_test.removal_meta:
            raise ConfigError(
                f"--kl compares a model with its dense self, but {config.model.model} was saved "
                "pruned or edited: pass --kl-reference DENSE, or the dense --model with --mask"
            )
        if dense["vocabulary"] != vocabulary_digest(under_test.loaded.tokenizer):
            raise ConfigError(
                f"--kl-reference {reference} and {config.model.model} have different tokenizers: "
                "the KL compares next-token distributions over one vocabulary"
            )
    result = UtilityResult(under_test=under_test.describe())
    out = config.out or under_test.default_out(config.store)
    ensure_writable_directory(out, "--out")
    with interruptible(lambda: "nothing was written"):
        if raw is not None:
            model = under_test.loaded.model
            limit = model_max_length(model) or DEFAULT_PERPLEXITY_SEQLEN
            seqlen = config.seqlen or min(DEFAULT_PERPLEXITY_SEQLEN, limit)
            if seqlen > limit:
                raise ConfigError(
                    f"--seqlen {seqlen} exceeds the model's context of {limit}: use --seqlen {limit} or less"
                )
            text = "\n\n".join(raw.texts)
            input_ids = under_test.loaded.tokenizer(text, return_tensors="pt").input_ids
            result.perplexity, result.windows = perplexity(
                model, input_ids, seqlen, limit_windows=config.limit_windows, reporter=reporter
            )
            result.seqlen = seqlen
        if kl_prompts is not None:
            distributions = dense["distributions"]
            result.kl = kl_divergence(under_test.loaded, distributions, reporter=reporter)
            result.kl_detail = {
                "rule": KL_RULE,
                "positions": config.kl_settings.kl_positions,
                "prompts": kl_prompts.describe(),
                "template": dense["template"],
                "reference": dense["model"],
                "counted_positions": distributions.counted_positions,
            }
        if config.zero_shot:
            result.zero_shot = zero_shot(
                under_test, config.zero_shot, config.zero_shot_limit, config.batch_size
            )
    result.out = out
    result.seconds = time.monotonic() - started
    payload = result.to_json() | {
        "versions": software_versions(),
        "finished": now_iso(),
        # The text actually read (a data directory's copy, the shipped file, or a download).
        "data": {"name": config.data, "source": raw.source, "sha256": raw.content_hash}
        if raw is not None
        else None,
    }
    write_evaluation(out / UTILITY_RESULTS, payload)
    log = out / f"log_{under_test.method}.txt"
    if result.perplexity is not None:
        append_reference_log(log, under_test, "PPL", result.perplexity)
    if result.kl is not None:
        append_reference_log(log, under_test, "KL", result.kl)
    for task, accuracy in result.zero_shot.items():
        append_reference_log(log, under_test, task, accuracy)
    if result.zero_shot_mean is not None:
        append_reference_log(log, under_test, "averaged", result.zero_shot_mean)
    return result
