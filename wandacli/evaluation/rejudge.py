"""`eval-attack --rejudge --out DIR --judge NAME`: judge stored responses again, without
generating. A study generates once and is judged many times: each JSONL row keeps every judge's
verdict under `judges` (the run's own judge's included), results.json keeps each judge's ASR
under `judges`, and the report shows how they agree (analysis/agreement.py). Word salad is
measured too where the rows lack it."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from wandacli.config.evaluation import AttackConfig
from wandacli.core.console import NullReporter, Reporter
from wandacli.core.errors import ConfigError, StoreError, interruptible
from wandacli.evaluation.attack import (
    AttackResult,
    RunRecord,
    dense_model_of,
    flag_word_salad,
    read_rows,
    summarize,
    verdict_fields,
    write_rows,
)
from wandacli.evaluation.backends.base import Response
from wandacli.evaluation.judges import context_of, judge_label, make_judge
from wandacli.store.summaries import (
    ATTACK_RESULTS,
    ATTACK_RESULTS_FORMAT,
    read_json_summary,
    write_evaluation,
)


def _stored(out: Path | None) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The results folder, its settings.json and results.json, or a one-line refusal."""
    if out is None:
        raise ConfigError(
            "--rejudge judges the responses of an eval-attack run: pass its results folder "
            "as --out DIR"
        )
    settings_path, results_path = out / "settings.json", out / ATTACK_RESULTS
    if not settings_path.is_file():
        raise StoreError(
            f"{out} holds no eval-attack responses (no settings.json): pass the --out of an "
            "eval-attack run"
        )
    if not results_path.is_file():
        raise StoreError(
            f"{out} holds an unfinished eval-attack run (no {ATTACK_RESULTS}): finish it first "
            "(the same eval-attack command resumes it)"
        )
    try:
        settings = json.loads(settings_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise StoreError(f"{settings_path} is not JSON ({error}): run eval-attack again") from None
    results = read_json_summary(results_path, ATTACK_RESULTS_FORMAT, "attack results file")
    return out, settings, results


def _judge_entry(success: int, score: Any = None, detail: Any = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"success": int(success)}
    if score is not None:
        entry["score"] = score
    if detail:
        entry["detail"] = detail
    return entry


def _dense_model(spec: Any, model: str) -> Any:
    """The dense model of a stored run: the model it evaluated, unless that is a saved pruned
    or edited model, whose provenance names the model it was made from."""
    from wandacli.models.loader import load_model
    from wandacli.removal.apply import read_provenance

    provenance = read_provenance(Path(model)) if Path(model).is_dir() else None
    dense = dense_model_of(model, provenance) if provenance is not None else model
    return load_model(replace(spec, model=dense))


def rejudge(config: AttackConfig, *, reporter: Reporter | None = None) -> AttackResult:
    """Judge every stored response of `config.out` with `config.judge`; record the verdicts in
    the rows and the judge's ASR in results.json; flag word salad where unmeasured."""
    reporter = reporter or NullReporter()
    started = time.monotonic()
    out, settings, results = _stored(config.out)
    paths = sorted(p for p in out.glob("*.jsonl") if RunRecord.from_run_name(p.stem))
    if not paths:
        raise StoreError(f"{out} holds no responses (no run's JSONL file): run eval-attack first")
    own = judge_label(str(settings.get("judge", "keyword")))
    context = context_of(config, int(settings["max_new_tokens"]))
    judge = make_judge(config.judge, context)
    for path in paths:
        rows = read_rows(path)
        if rows is None:
            raise StoreError(f"{path} is unreadable: run eval-attack again with --overwrite")
        if all(judge.name in (r.get("judges") or {}) for r in rows):
            continue  # judged before an interruption: the rerun goes on from the next run
        reporter.start(f"{path.stem}: {judge.name}", total=len(rows))
        with interruptible(lambda: f"judged runs are kept in {out}; the same command goes on"):
            verdicts = judge.judge(
                [str(r["prompt"]) for r in rows],
                [Response(str(r["response"]), bool(r.get("ended", True))) for r in rows],
            )
        reporter.advance(len(rows))
        reporter.finish()
        for row, verdict in zip(rows, verdicts, strict=True):
            judges = row.setdefault("judges", {})
            judges.setdefault(
                own,
                _judge_entry(
                    row["attack_success"], row.get("judge_score"), row.get("judge_detail")
                ),
            )
            fields = verdict_fields(verdict)
            judges[judge.name] = _judge_entry(
                verdict.success, fields.get("judge_score"), fields.get("judge_detail")
            )
        write_rows(path, rows)
    described = judge.describe()
    del judge  # its model: the dense model may be loaded next
    template = str(settings.get("template", "chat"))
    if config.word_salad:
        flag_word_salad(
            paths,
            lambda: _dense_model(config.model, str(settings["model"])),
            template=template,
            batch_size=config.batch_size,
            reporter=reporter,
        )
    prompts = 1 + max(int(r["question_id"]) for p in paths for r in read_rows(p) or [])
    own_records: list[RunRecord] = []
    new_records: list[RunRecord] = []
    for path in paths:
        rows = read_rows(path) or []
        for judge_name, records in ((None, own_records), (described["judge"], new_records)):
            record = RunRecord.from_run_name(path.stem)
            assert record is not None
            record.fill(rows, prompts, judge_name)
            records.append(record)
    own_summaries, new_summaries = summarize(own_records), summarize(new_records)
    under_test = dict(results.get("model_under_test") or {})
    judges = dict(results.get("judges") or {})
    judges.setdefault(
        own,
        {
            "format": under_test.get("judge_format")
            or {"judge": own, "rule": under_test.get("judge_rule")},
            "results": results.get("results"),
        },
    )
    judges[described["judge"]] = {
        "format": described,
        "results": [s.to_json() for s in new_summaries],
    }
    # The run's own verdicts stay the results; the word-salad shares are filled in beside them.
    results["results"] = [s.to_json() for s in own_summaries]
    results["judges"] = judges
    write_evaluation(out / ATTACK_RESULTS, results)
    return AttackResult(
        under_test=under_test | {"judge": described["judge"], "judge_rule": described["rule"]},
        summaries=new_summaries,
        out=out,
        seconds=time.monotonic() - started,
        generated_tokens=0,
    )
