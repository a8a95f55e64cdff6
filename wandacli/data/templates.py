"""The text a model reads for a prompt, in one place: the reference's Llama-2 strings, the
tokenizer's chat template, and the Llama-2 tags of the shipped pair sets taken apart. Calibration
samples, attacks, searches and mean activations all build their texts here, so that a prompt
scored and a prompt attacked are the same tokens."""

from __future__ import annotations

import re
from typing import Any

from wandacli.core import reference
from wandacli.core.errors import DataError

_LLAMA2_SYS = re.compile(r"<<SYS>>\s*(.*?)\s*<</SYS>>", re.DOTALL)
_LLAMA2_TAGS = re.compile(r"\[/?INST\]")


def strip_llama2_tags(prompt: str) -> tuple[str | None, str]:
    """(system prompt or None, user text) of a Llama-2 `[INST] <<SYS>>...<</SYS>> ... [/INST]`
    string; text without tags comes back unchanged."""
    system = None
    match = _LLAMA2_SYS.search(prompt)
    if match:
        system = match.group(1).strip()
        prompt = prompt[: match.start()] + prompt[match.end() :]
    return system, _LLAMA2_TAGS.sub("", prompt).strip()


def apply_chat_template(tokenizer: Any, user: str, system: str | None) -> str:
    """The tokenizer's chat template around one user turn, ending with the assistant cue.
    A system prompt becomes a system turn, or is prepended to the user turn when the template
    rejects system turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template: use --template raw (or llama2)")
    messages = [{"role": "user", "content": user}]
    if system:
        try:
            return str(
                tokenizer.apply_chat_template(
                    [{"role": "system", "content": system}, *messages],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            )
        except Exception:  # templates that reject system turns raise from Jinja
            messages = [{"role": "user", "content": f"{system}\n\n{user}"}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


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
