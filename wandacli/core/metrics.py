"""The attack configurations and their metrics, named once. Result files, the reference's log,
the report's columns and the figures all read names and order from here; the names are the
reference's (`ASR_basic`, `inst_ASR_basic_nosys`, ...)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttackSetting:
    name: str  # the --configs value
    system_prompt: bool
    sampling: bool
    gcg: bool
    metric: str  # the reference's log metric, before the tag prefix
    column: str  # the report's column title: the paper's names for its three (Wei et al., Table 6)
    legend: str  # what the column means, in the report's title


# In the paper's order, which is the report's column order and the figures' order.
SETTINGS: dict[str, AttackSetting] = {
    s.name: s
    for s in (
        AttackSetting(
            "basic", True, False, False, "ASR_basic", "Vanilla", "greedy with the system prompt"
        ),
        AttackSetting(
            "basic_nosys", False, False, False, "ASR_basic_nosys", "no sys", "greedy without it"
        ),
        AttackSetting(
            "multiple_nosys",
            False,
            True,
            False,
            "ASR_multiple_nosys",
            "Adv-Dec",
            "any of n samples / their mean",
        ),
        AttackSetting("gcg", False, False, True, "ASR_gcg", "Adv-Suffix", "the GCG suffixes"),
    )
}
ATTACK_CONFIGS = tuple(SETTINGS)


def tag_prefix(inst: bool) -> str:
    """The reference's file and metric prefix for the instruction-tag variant."""
    return "inst_" if inst else "no_inst_"


def metric_name(config: str, inst: bool) -> str:
    """The reference's metric for a configuration and tag variant (GCG has no prefix: the
    reference runs it with instruction tags only)."""
    setting = SETTINGS[config]
    return setting.metric if setting.gcg else f"{tag_prefix(inst)}{setting.metric}"


def metric_parts(metric: str) -> tuple[str, bool | None]:
    """`inst_ASR_basic` → (`ASR_basic`, True); `no_inst_…` → False; untagged → None."""
    if metric.startswith("inst_"):
        return metric.removeprefix("inst_"), True
    if metric.startswith("no_inst_"):
        return metric.removeprefix("no_inst_"), False
    return metric, None


_BASE_ORDER = [s.metric for s in SETTINGS.values()]


def metric_order(metric: str) -> tuple[int, int, str]:
    """Sort key: the paper's configuration order, then tags, no tags, untagged."""
    base, inst = metric_parts(metric)
    variant = {True: 0, False: 1, None: 2}[inst]
    return (_BASE_ORDER.index(base) if base in _BASE_ORDER else len(_BASE_ORDER), variant, metric)


# The results table's ASR columns at 80 characters: the instruction-tag variant of each.
REPORT_COLUMNS = tuple((s.column, metric_name(s.name, True)) for s in SETTINGS.values())
# What each column means, by its title.
COLUMN_LEGENDS = {s.column: s.legend for s in SETTINGS.values()}


def metric_title(metric: str) -> str:
    """A metric as the report's readers know it: the paper's name for its configuration
    (`inst_ASR_multiple_nosys` → `Adv-Dec`), what variant it is after (`no tags`, the sampled
    mean `mean`, `any of n`). Names that are no configuration's are shown as they are."""
    variant = ""
    if metric.endswith("_sample_mean"):
        metric, variant = metric.removesuffix("_sample_mean"), " mean"
    elif "_any" in metric and metric.rsplit("_any", 1)[1].isdigit():
        metric, count = metric.rsplit("_any", 1)
        variant = f" any of {count}"
    base, inst = metric_parts(metric)
    setting = next((s for s in SETTINGS.values() if s.metric == base), None)
    if setting is None:
        return metric + variant
    return setting.column + (" (no tags)" if inst is False else "") + variant
