"""Attack prompts: the reference's templates, or the tokenizer's chat template."""

from __future__ import annotations

from typing import Any

from wandacli.config.evaluation import AttackConfig
from wandacli.config.settings import Columns
from wandacli.core import reference
from wandacli.core.console import warn

# ---------------------------------------------------------------------------------------------
# Templating (pure)


def llama2_prompt(prompt: str, *, system: str | None, inst: bool, suffix: str | None = None) -> str:
    """The reference's `apply_prompt_template` strings, exactly:
    with tags    `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{prompt} [/INST]` (GCG: `... {prompt} {suffix} [/INST]`)
    without      `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{prompt}\\n` (or `{prompt}\\n` without a system prompt)
    """
    body = (reference.B_SYS + system + reference.E_SYS + prompt) if system else prompt
    if not inst:
        return body.strip() + "\n"
    if suffix is not None:
        return f"{reference.B_INST} {body.strip()} {suffix} {reference.E_INST}"
    return f"{reference.B_INST} {body.strip()} {reference.E_INST}"


def chat_prompt(
    tokenizer: Any, prompt: str, *, system: str | None, suffix: str | None = None
) -> str:
    """The tokenizer's chat template around the prompt (and GCG suffix), ending with the
    assistant's cue; a system prompt becomes a system turn where the template allows one."""
    from wandacli.data.calibration import apply_chat_template

    user = f"{prompt} {suffix}" if suffix is not None else prompt
    return apply_chat_template(tokenizer, user, system)


def build_prompt(
    tokenizer: Any,
    prompt: str,
    *,
    template: str,
    system: str | None,
    inst: bool,
    suffix: str | None,
) -> tuple[str, bool]:
    """(text, whether the tokenizer should add its special tokens). Without instruction tags
    the text is the reference's plain string in either template style."""
    if template == "chat" and inst:
        return chat_prompt(tokenizer, prompt, system=system, suffix=suffix), False
    return llama2_prompt(prompt, system=system, inst=inst, suffix=suffix), True


def load_prompts(config: AttackConfig) -> tuple[list[str], str, str]:
    """(prompts, source, sha256) for the attack: the first `--limit` of a named set or file."""
    from wandacli.data.sources import load_raw

    columns = Columns(prompt=config.prompt_column) if config.prompt_column else None
    raw = load_raw(config.prompts, purpose="prompts", columns=columns, directory=config.data_dir)
    prompts = [p.strip() for p in raw.texts]
    if len(prompts) < config.limit:
        warn(f"--limit {config.limit} but {raw.name} has {len(prompts)} prompts: using all of them")
    return prompts[: config.limit], raw.source, raw.content_hash
