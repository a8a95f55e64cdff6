"""`wandacli eval-attack` and `wandacli eval-utility`: the model under test, measured."""

from __future__ import annotations

from typing import Any

from wandacli.cli.build import settings_command
from wandacli.config.evaluation import AttackConfig, UtilityConfig
from wandacli.reporting import render


def _attack(config: AttackConfig, *, reporter: Any, command_line: list[str]) -> Any:
    if config.rejudge:
        from wandacli.evaluation.rejudge import rejudge

        return rejudge(config, reporter=reporter)
    from wandacli.evaluation.attack import run_attack

    return run_attack(config, reporter=reporter)


def _utility(config: UtilityConfig, *, reporter: Any, command_line: list[str]) -> Any:
    from wandacli.evaluation.utility import run_utility

    return run_utility(config, reporter=reporter)


eval_attack = settings_command(
    "eval-attack",
    AttackConfig,
    _attack,
    render.attack_result,
    doc="""How often does the model answer harmful prompts? Attack success rate in the
    reference's configurations, with every response kept as JSONL.

    --rejudge --out DIR --judge NAME judges the kept responses again, without generating.""",
)

eval_utility = settings_command(
    "eval-utility",
    UtilityConfig,
    _utility,
    render.utility_result,
    doc="""How much general ability is left? Perplexity (the reference's WikiText-2
    computation), the KL divergence from the dense model (--kl) and zero-shot accuracy through
    lm-evaluation-harness.""",
)
