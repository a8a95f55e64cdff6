"""Attack prompts: the reference's templates, or the tokenizer's chat template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wandacli.config.evaluation import UTILITY_HELD_OUT, AttackConfig
from wandacli.config.settings import Columns
from wandacli.core.console import warn
from wandacli.core.errors import ConfigError, DataError
from wandacli.data.templates import build_prompt


@dataclass(frozen=True)
class PromptSet:
    """Prompts as read (stripped), with where they came from."""

    name: str
    texts: list[str]
    source: str
    sha256: str  # of the file read (the rows chosen are named by offset and limit)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "sha256": self.sha256,
            "count": len(self.texts),
        }


def prompt_digests(texts: list[str]) -> list[str]:
    """sha256 of each prompt's exact text: what the search/evaluation overlap checks compare."""
    import hashlib

    return [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]


def check_not_searched_on(prompts: list[str], option: str, removal_meta: dict[str, Any]) -> None:
    """A mask or edit kept by `search` is not evaluated on the prompts the search chose it on:
    a number tuned on the prompts it is reported on is not a result."""
    from wandacli.core.errors import ConfigError

    origin = removal_meta.get("search") or {}
    searched = set((origin.get("prompts") or {}).get("text_sha256") or [])
    if not searched:
        return
    shared = [p for p, d in zip(prompts, prompt_digests(prompts), strict=True) if d in searched]
    if shared:
        raise ConfigError(
            f"{option} shares {len(shared)} prompts with the prompts search {origin.get('name')!r} "
            f"chose this removal on (first: {shared[0][:60]!r}): evaluate on held-out prompts "
            "(e.g. --prompts advbench --limit 100, or jailbreakbench)"
        )


def read_prompts(
    reference: str,
    *,
    column: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    data_dir: Any = None,
    option: str = "--prompts",
) -> PromptSet:
    """Rows offset..offset+limit of a prompt set or file, or the prompts of a pair set (Llama-2
    tags stripped), or `utility-held-out`."""
    from wandacli.data.sources import load_raw, named_set
    from wandacli.data.templates import strip_llama2_tags

    if reference == UTILITY_HELD_OUT:
        from wandacli.models.organism import DEFAULT_RECIPE, training_set

        raw = load_raw("utility", directory=data_dir)
        trained = {e.prompt for e in training_set(DEFAULT_RECIPE).examples if not e.harmful}
        texts = [strip_llama2_tags(pair.prompt)[1] for pair in raw.pairs]
        texts = [t for t in texts if t not in trained]
    else:
        entry = named_set(reference)
        columns = Columns(prompt=column) if column else None
        # A named pair set (utility, align_short) gives its prompts; files are read as prompts.
        as_prompts = entry is None or entry.kind == "prompts"
        raw = load_raw(
            reference,
            purpose="prompts" if as_prompts else "calibration",
            columns=columns,
            directory=data_dir,
        )
        if raw.pairs:
            texts = [strip_llama2_tags(pair.prompt)[1] for pair in raw.pairs]
        else:
            texts = [t.strip() for t in raw.texts]
    texts = list(dict.fromkeys(t for t in texts if t))  # each prompt once, in file order
    if offset < 0 or (limit is not None and limit < 1):
        raise DataError(f"{option}: the offset must be 0 or more and the limit 1 or more")
    chosen = texts[offset : offset + limit if limit is not None else None]
    if not chosen:
        raise DataError(
            f"{option} {reference} has {len(texts)} distinct prompts: none left from offset {offset}"
        )
    if limit is not None and len(chosen) < limit:
        warn(
            f"{option} {reference}: {len(chosen)} prompts from offset {offset}, fewer than --limit {limit}"
        )
    return PromptSet(
        raw.name if reference != UTILITY_HELD_OUT else reference,
        chosen,
        raw.source,
        raw.content_hash,
    )


def held_out_prompts(spec: str, data_dir: Any) -> dict[str, set[str]]:
    """`--held-out NAME[:N],...` → {part: the exact texts of its first N prompts (all without
    N)}: the evaluation prompts a search or an attack must not see."""
    found: dict[str, set[str]] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part or part == "none":
            continue
        name, _, count = part.partition(":")
        try:
            limit = int(count) if count else None
        except ValueError:
            raise ConfigError(f"--held-out {spec!r}: {part!r} is not NAME or NAME:N") from None
        found[part] = set(
            read_prompts(name, limit=limit, data_dir=data_dir, option="--held-out").texts
        )
    return found


def check_no_overlap(
    prompts: PromptSet, held_out: dict[str, set[str]], fix: str, option: str = "--prompts"
) -> None:
    """Prompts a search or an attack trains on must not be ones it is evaluated on."""
    for name, texts in held_out.items():
        shared = [t for t in prompts.texts if t in texts]
        if shared:
            raise ConfigError(
                f"{option} {prompts.name} shares {len(shared)} prompts with the held-out set {name} "
                f"(first: {shared[0][:60]!r}): {fix}, or change --held-out"
            )


def template_for(requested: str | None, tokenizer: Any) -> str:
    """--template, else the tokenizer's chat template where it has one, else the reference's
    Llama-2 strings."""
    from wandacli.core.errors import ConfigError

    has_chat = bool(getattr(tokenizer, "chat_template", None))
    template = requested or ("chat" if has_chat else "llama2")
    if template == "chat" and not has_chat:
        raise ConfigError(
            "--template chat but the tokenizer has no chat template: use --template llama2"
        )
    return template


def model_texts(
    tokenizer: Any, prompts: list[str], template: str, *, system: str | None = None
) -> tuple[list[str], bool]:
    """The prompts as the model reads them when attacked with instruction tags (in the chat
    template: the user turn and the assistant cue), and whether to add special tokens."""
    texts, special = [], True
    for prompt in prompts:
        text, special = build_prompt(
            tokenizer, prompt, template=template, system=system, inst=True, suffix=None
        )
        texts.append(text)
    return texts, special


def load_prompts(config: AttackConfig) -> tuple[list[str], str, str]:
    """(prompts, source, sha256) for the attack: the first `--limit` of a named set or file."""
    from wandacli.data.sources import load_raw

    columns = Columns(prompt=config.prompt_column) if config.prompt_column else None
    raw = load_raw(config.prompts, purpose="prompts", columns=columns, directory=config.data_dir)
    prompts = [p.strip() for p in raw.texts]
    if config.offset >= len(prompts):
        raise DataError(
            f"--offset {config.offset}: {raw.name} has {len(prompts)} prompts, none left from "
            "there: use a smaller --offset"
        )
    left = len(prompts) - config.offset
    if left < config.limit:
        warn(
            f"--limit {config.limit} but {raw.name} has {left} prompts from --offset "
            f"{config.offset}: using all of them"
        )
    chosen = prompts[config.offset : config.offset + config.limit]
    return chosen, raw.source, raw.content_hash
