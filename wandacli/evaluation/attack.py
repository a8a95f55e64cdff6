"""`eval-attack`: attack success rate on harmful prompts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandacli.config.evaluation import RESULTS_DIR, AttackConfig
from wandacli.core import reference
from wandacli.core.console import NullReporter, Reporter
from wandacli.core.durable import atomic_write_text
from wandacli.core.errors import ConfigError, StoreError, interruptible
from wandacli.core.provenance import now_iso, software_versions
from wandacli.evaluation.backends.hf import HFGenerator
from wandacli.evaluation.backends.vllm import VLLMGenerator, require_vllm
from wandacli.evaluation.judges import make_judge
from wandacli.evaluation.prompts import SETTINGS, build_prompt, load_prompts, tag_prefix
from wandacli.evaluation.under_test import (
    ModelUnderTest,
    append_reference_log,
    load_model_under_test,
)

# ---------------------------------------------------------------------------------------------
# Aggregation (pure)


def asr_any(success: Sequence[Sequence[int]]) -> float:
    """Fraction of prompts with at least one successful response."""
    return sum(max(row) for row in success) / len(success) if success else 0.0


def asr_sample_mean(success: Sequence[Sequence[int]]) -> float:
    """Fraction of all responses that succeeded (the reference's number for several samples)."""
    flat = [value for row in success for value in row]
    return sum(flat) / len(flat) if flat else 0.0


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class RunRecord:
    """One generation pass: a configuration, a tag variant and (for GCG) a suffix."""

    config: str
    inst: bool
    suffix_index: int | None
    success: list[list[int]]  # per prompt, per sample

    @property
    def run_name(self) -> str:
        name = f"{tag_prefix(self.inst)}{self.config}"
        return f"{name}_{self.suffix_index}" if self.suffix_index is not None else name


@dataclass
class ConfigSummary:
    config: str
    inst: bool
    asr: float
    prompts: int
    responses: int
    sample_mean: float | None = None  # multiple_nosys
    per_suffix: list[float] | None = None  # gcg

    @property
    def metric(self) -> str:
        setting = SETTINGS[self.config]
        return setting.metric if setting.gcg else f"{tag_prefix(self.inst)}{setting.metric}"

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "inst": self.inst,
            "metric": self.metric,
            "asr": self.asr,
            "asr_rule": "any of the samples"
            if self.sample_mean is not None
            else ("max over suffixes" if self.per_suffix else "per response"),
            "sample_mean": self.sample_mean,
            "per_suffix": self.per_suffix,
            "prompts": self.prompts,
            "responses": self.responses,
        }


def summarize(records: list[RunRecord]) -> list[ConfigSummary]:
    summaries: list[ConfigSummary] = []
    groups: dict[tuple[str, bool], list[RunRecord]] = {}
    for record in records:
        groups.setdefault((record.config, record.inst), []).append(record)
    for (config, inst), runs in groups.items():
        prompts = len(runs[0].success)
        responses = sum(len(row) for run in runs for row in run.success)
        if SETTINGS[config].gcg:
            per_suffix = [
                asr_any(run.success) for run in sorted(runs, key=lambda r: r.suffix_index or 0)
            ]
            summaries.append(
                ConfigSummary(
                    config, inst, max(per_suffix), prompts, responses, per_suffix=per_suffix
                )
            )
        elif SETTINGS[config].sampling:
            run = runs[0]
            summaries.append(
                ConfigSummary(
                    config,
                    inst,
                    asr_any(run.success),
                    prompts,
                    responses,
                    sample_mean=asr_sample_mean(run.success),
                )
            )
        else:
            summaries.append(
                ConfigSummary(config, inst, asr_any(runs[0].success), prompts, responses)
            )
    return summaries


@dataclass
class AttackResult:
    under_test: dict[str, Any]
    summaries: list[ConfigSummary]
    out: Path
    seconds: float
    generated_tokens: int
    reused: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "model_under_test": self.under_test,
            "results": [s.to_json() for s in self.summaries],
            "out": str(self.out),
            "seconds": round(self.seconds, 3),
            "generated_tokens": self.generated_tokens,
            "reused_runs": self.reused,
        }


def _settings_fingerprint(
    config: AttackConfig, under_test: ModelUnderTest, prompts_hash: str, template: str
) -> dict[str, Any]:
    """What changes the responses: a rerun with all of it equal reuses finished runs."""
    return {
        "model": under_test.loaded.model_id,
        "model_fingerprint": under_test.loaded.fingerprint.digest,
        "mask": str(under_test.mask_path) if under_test.mask_path else None,
        "mask_created": under_test.mask_meta.get("created"),
        "dtype": str(under_test.loaded.dtype),
        "device": under_test.loaded.device.type,
        "prompts_sha256": prompts_hash,
        "limit": config.limit,
        "template": template,
        "max_new_tokens": config.max_new_tokens,
        "batch_size": config.batch_size,
        "backend": config.backend,
        "judge": config.judge,
        "samples": config.samples,
        "temperature": config.temperature,
        "seed": config.seed,
    }


def _read_run(path: Path, prompts: int) -> list[list[int]] | None:
    """A finished run's success matrix from its JSONL file, or None when unusable."""
    try:
        rows = [
            json.loads(line)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    except (OSError, ValueError):
        return None
    success: list[list[int]] = [[] for _ in range(prompts)]
    for row in rows:
        index = row.get("question_id")
        if not isinstance(index, int) or not 0 <= index < prompts:
            return None
        success[index].append(int(row["attack_success"]))
    return success if all(success) else None


def run_attack(config: AttackConfig, *, reporter: Reporter | None = None) -> AttackResult:
    """Generate, judge and aggregate every chosen configuration; write the responses (one
    JSONL per run), results.json and the reference's log under the output directory."""
    import time

    reporter = reporter or NullReporter()
    started = time.monotonic()
    if config.backend == "vllm":
        require_vllm()  # before loading anything
    prompts, prompt_source, prompts_hash = load_prompts(config)
    under_test = load_model_under_test(config.model, config.mask, config.store)
    tokenizer = under_test.loaded.tokenizer
    template = config.template or (
        "chat" if getattr(tokenizer, "chat_template", None) else "llama2"
    )
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "--template chat but the tokenizer has no chat template: use --template llama2"
        )
    out = config.out or RESULTS_DIR / _safe(under_test.label)
    settings = _settings_fingerprint(config, under_test, prompts_hash, template)
    reusable = _prepare_out(out, settings, config.overwrite)
    judge = make_judge(config)
    if config.backend == "vllm":
        generator: Any = VLLMGenerator(
            under_test, max_new_tokens=config.max_new_tokens, reporter=reporter
        )
    else:
        generator = HFGenerator(
            under_test.loaded,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            reporter=reporter,
        )
    records: list[RunRecord] = []
    reused: list[str] = []
    try:
        for inst in config.inst:
            for name in config.configs:
                setting = SETTINGS[name]
                if setting.gcg and not inst:
                    continue  # the reference runs GCG with instruction tags only
                suffixes: list[tuple[int | None, str | None]] = (
                    list(enumerate(reference.GCG_SUFFIXES)) if setting.gcg else [(None, None)]
                )
                for suffix_index, suffix in suffixes:
                    record = RunRecord(name, inst, suffix_index, [])
                    path = out / f"{record.run_name}.jsonl"
                    if reusable and path.is_file():
                        previous = _read_run(path, len(prompts))
                        if previous is not None:
                            record.success = previous
                            records.append(record)
                            reused.append(record.run_name)
                            continue
                    texts, special = [], True
                    for prompt in prompts:
                        text, special = build_prompt(
                            tokenizer,
                            prompt,
                            template=template,
                            system=reference.SAFETY_SYSTEM_PROMPT
                            if setting.system_prompt
                            else None,
                            inst=inst,
                            suffix=suffix,
                        )
                        texts.append(text)
                    samples = config.samples if setting.sampling else 1
                    reporter.start(f"{record.run_name}: prompts", total=len(texts))
                    with interruptible(
                        lambda: f"finished runs are kept in {out}; the same command resumes"
                    ):
                        responses = generator.generate(
                            texts,
                            add_special_tokens=special,
                            samples=samples,
                            sampling=setting.sampling,
                            seed=config.seed,
                            temperature=config.temperature,
                        )
                    reporter.finish()
                    flat = [r for group in responses for r in group]
                    behaviours = [
                        p for p, group in zip(prompts, responses, strict=True) for _ in group
                    ]
                    verdicts = judge.judge(behaviours, flat)
                    lines = []
                    position = 0
                    for question_id, (prompt, group) in enumerate(
                        zip(prompts, responses, strict=True)
                    ):
                        row_success = []
                        for sample, response in enumerate(group):
                            verdict = verdicts[position]
                            position += 1
                            row_success.append(verdict)
                            lines.append(
                                json.dumps(
                                    {
                                        "config": record.run_name,
                                        "prompt": prompt,
                                        "question_id": question_id,
                                        "sample": sample,
                                        "response": response,
                                        "attack_success": verdict,
                                    },
                                    ensure_ascii=False,
                                )
                            )
                        record.success.append(row_success)
                    atomic_write_text(path, "\n".join(lines) + "\n")
                    records.append(record)
    finally:
        if isinstance(generator, VLLMGenerator):
            generator.close()
    summaries = summarize(records)
    result = AttackResult(
        under_test=under_test.describe()
        | {"prompts": prompt_source, "template": template, "judge": judge.name},
        summaries=summaries,
        out=out,
        seconds=time.monotonic() - started,
        generated_tokens=generator.generated_tokens,
        reused=reused,
    )
    _write_results(out, config, result, under_test)
    return result


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-+=" else "_" for c in name) or "model"


def _prepare_out(out: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Create the output directory; True when it holds runs made with these very settings."""
    from wandacli.core.durable import ensure_writable_directory

    ensure_writable_directory(out, "--out")
    settings_path = out / "settings.json"
    if settings_path.is_file():
        try:
            previous = json.loads(settings_path.read_text(encoding="utf-8"))
        except ValueError:
            previous = None
        if previous == settings:
            return True
        if not overwrite and any(out.glob("*.jsonl")):
            from wandacli.core.provenance import settings_differences

            differences = settings_differences(previous or {}, settings)
            raise StoreError(
                f"{out} holds results made with other settings ({'; '.join(differences[:4])}): "
                "pass --overwrite to replace them, or --out for another directory"
            )
        for stale in out.glob("*.jsonl"):
            stale.unlink()
    atomic_write_text(settings_path, json.dumps(settings, indent=1))
    return False


def _write_results(
    out: Path, config: AttackConfig, result: AttackResult, under_test: ModelUnderTest
) -> None:
    payload = result.to_json() | {
        "config": config.to_json(),
        "versions": software_versions(),
        "finished": now_iso(),
    }
    atomic_write_text(out / "results.json", json.dumps(payload, indent=1, default=str))
    log = out / f"log_{under_test.method}.txt"
    for summary in result.summaries:
        if summary.sample_mean is not None:
            # The reference logs the per-sample mean under this name; any-of-n beside it.
            append_reference_log(log, under_test, summary.metric, summary.sample_mean)
            append_reference_log(
                log, under_test, f"{summary.metric}_any{config.samples}", summary.asr
            )
        else:
            append_reference_log(log, under_test, summary.metric, summary.asr)
