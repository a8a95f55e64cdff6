"""Calibration and evaluation data: named sets and local files (sample selection, tokenisation
and prompt masking are in data/calibration.py).

A named set resolves, first found wins, to: its file in a data directory (`--data-dir` or
`$WANDACLI_DATA_DIR`, when one is given and holds it); the copy shipped inside this package
(`wandacli/datasets/`, see its README for origins and licences); its public source (the reference
code's CSVs, downloaded once into the cache, or a hub dataset). Local files of any format
`datasets` reads (CSV, JSON, JSONL, Parquet) or plain text work everywhere a set name does.
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wandacli.config.settings import Columns
from wandacli.core.console import quiet_hub_clients
from wandacli.core.errors import DataError
from wandacli.core.fingerprint import sha256_file

# The reference code's data files, for real users with no data directory.
_REFERENCE_DATA_URL = (
    "https://raw.githubusercontent.com/boyiwei/alignment-attribution-code/main/data"
)

SetKind = Literal["pairs", "text", "prompts"]


@dataclass(frozen=True)
class Pair:
    """A calibration example: prompt (does not count) and response (counts)."""

    prompt: str
    response: str


def _pair_from_prompt_response(row: dict[str, Any]) -> Pair:
    return Pair(str(row["prompt"]), str(row["response"]))


def _pair_from_messages(row: dict[str, Any]) -> Pair:
    """A chat row in the OpenAI fine-tuning format (`{"messages": [{"role", "content"}, ...]}`,
    as Qi et al.'s pure_bad sets are written): its first user turn and the assistant turn after
    it; a system turn is left out (the model's own template applies)."""
    messages = row["messages"]
    for index, message in enumerate(messages):
        if message.get("role") == "user":
            reply = next((m for m in messages[index + 1 :] if m.get("role") == "assistant"), None)
            if reply is not None:
                return Pair(str(message["content"]), str(reply["content"]))
    raise KeyError("a user turn followed by an assistant turn in 'messages'")


def _pair_from_instruction(row: dict[str, Any]) -> Pair:
    """Alpaca-style rows (instruction/input/output, or Self-Instruct's `instances` list) in the
    Llama-2 `[INST] ... [/INST]` form the reference's CSVs use, response with a leading space."""
    instruction = str(row["instruction"]).strip()
    if "instances" in row and row["instances"]:
        instance = row["instances"][0]
        extra, output = str(instance.get("input", "")), str(instance.get("output", ""))
    else:
        extra, output = str(row.get("input", "") or ""), str(row["output"])
    body = f"{instruction}\n\n{extra.strip()}" if extra.strip() else instruction
    return Pair(f"[INST] {body} [/INST]", " " + output.strip())


@dataclass(frozen=True)
class NamedSet:
    """A data set users name instead of giving a path."""

    name: str
    kind: SetKind
    description: str
    local_files: tuple[str, ...]  # candidates inside the data directory, first found wins
    remote: str  # hub id, or a URL of a file
    shipped: str | None = None  # the copy in wandacli/datasets/, when the package ships one
    remote_config: str | None = None
    remote_split: str = "train"
    column: str | None = None  # the prompt column of prompt sets
    to_pair: Callable[[dict[str, Any]], Pair] | None = None
    aliases: tuple[str, ...] = field(default=())


NAMED_SETS: tuple[NamedSet, ...] = (
    NamedSet(
        "align",
        "pairs",
        "safety: harmful prompts with Llama-2-7b-chat's refusals (the reference's full set)",
        ("align.csv", "SFT_aligned_llama2-7b-chat-hf_train.csv"),
        f"{_REFERENCE_DATA_URL}/SFT_aligned_llama2-7b-chat-hf_train.csv",
        to_pair=_pair_from_prompt_response,
    ),
    NamedSet(
        "align_short",
        "pairs",
        "safety: harmful prompts with Llama-2-7b-chat's short refusals",
        ("align_short.csv", "SFT_aligned_llama2-7b-chat-hf_train_short.csv"),
        f"{_REFERENCE_DATA_URL}/SFT_aligned_llama2-7b-chat-hf_train_short.csv",
        to_pair=_pair_from_prompt_response,
        shipped="align_short.csv",
    ),
    NamedSet(
        "alpaca_cleaned_no_safety",
        "pairs",
        "utility: Alpaca-cleaned with safety-related rows removed (the reference's set)",
        ("alpaca_cleaned_no_safety_train.csv",),
        f"{_REFERENCE_DATA_URL}/alpaca_cleaned_no_safety_train.csv",
        to_pair=_pair_from_prompt_response,
    ),
    NamedSet(
        "utility",
        "pairs",
        "utility: benign instructions with responses (Self-Instruct's 175 seed tasks, shipped)",
        ("utility_seed_tasks.jsonl", "utility.jsonl"),
        "yahma/alpaca-cleaned",
        to_pair=_pair_from_instruction,
        shipped="utility_seed_tasks.jsonl",
    ),
    NamedSet(
        "wikitext",
        "text",
        "plain text: WikiText-2 raw, test split (also the perplexity text)",
        ("wikitext2_test.txt",),
        "wikitext",
        remote_config="wikitext-2-raw-v1",
        remote_split="test",
        column="text",
        shipped="wikitext2_test.txt",
    ),
    NamedSet(
        "advbench",
        "prompts",
        "attack prompts: AdvBench harmful behaviours (the reference uses the first 100)",
        ("advbench.txt",),
        "walledai/AdvBench",
        column="prompt",
        shipped="advbench.txt",
    ),
    NamedSet(
        "jailbreakbench",
        "prompts",
        "attack prompts: JailbreakBench harmful behaviours",
        ("jailbreakbench.json",),
        "JailbreakBench/JBB-Behaviors",
        remote_config="behaviors",
        remote_split="harmful",
        column="Goal",
        shipped="jailbreakbench.json",
    ),
)


def named_set(name: str) -> NamedSet | None:
    for entry in NAMED_SETS:
        if name == entry.name or name in entry.aliases:
            return entry
    return None


def data_display_name(data: str) -> str:
    """The name a data argument goes by in set names: the set's name, or a file's stem."""
    entry = named_set(data)
    return entry.name if entry is not None else Path(data).stem


def data_dir(explicit: Path | None = None) -> Path | None:
    """The data directory named sets are looked up in first, or None when none is given."""
    value = explicit if explicit is not None else os.environ.get("WANDACLI_DATA_DIR") or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data directory {path} does not exist: fix --data-dir / WANDACLI_DATA_DIR, "
            "or unset it to use the shipped sets"
        )
    return path


def shipped_data_dir() -> Path:
    """The folder of data files shipped inside the package (wandacli/datasets/)."""
    return Path(str(importlib.resources.files("wandacli.datasets")))


def offline() -> bool:
    """Whether the user asked for no network (the Hugging Face switches, which we honour)."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


# ---------------------------------------------------------------------------------------------
# Loading rows


@dataclass
class RawData:
    """A data set as read: pairs, one text, or prompts, and where it came from."""

    name: str  # set name, or the file's stem
    source: str  # the file or hub id actually read
    kind: SetKind
    content_hash: str
    pairs: list[Pair] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # rows (text sets and prompt sets)


_DATASETS_BUILDERS = {  # file types and the `datasets` builder that reads each
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
_TEXT_SUFFIXES = {".txt", ".text", ".md"}


def _load_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV/JSON/JSONL/Parquet file.

    CSV, TSV and JSON are parsed with the standard library: the same rows `datasets` yields
    for these files (a test checks it on the reference CSV), without importing pandas and
    pyarrow, which add ~100 MB to every scoring process. Parquet goes through `datasets`.
    """
    suffix = path.suffix.lower()
    if suffix not in _DATASETS_BUILDERS:
        raise DataError(
            f"cannot read {path}: unknown file type {path.suffix!r}; "
            "use CSV, TSV, JSON, JSONL, Parquet or TXT"
        )
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix in (".json", ".jsonl"):
            return _read_json_rows(path)
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    try:
        dataset = load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for malformed files
        raise DataError(
            f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    return [dict(row) for row in dataset]


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects, or JSON lines (one object per line), as `datasets` accepts."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(stripped)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise DataError(f"cannot read {path}: expected a JSON list of objects or JSON lines")
    return rows


def _supply_hint(entry: NamedSet) -> str:
    return (
        f"download {entry.remote} elsewhere and pass it with --data FILE, or put it in "
        f"--data-dir as {entry.local_files[0]}"
    )


def _load_remote(entry: NamedSet) -> tuple[list[dict[str, Any]], str]:
    """Rows of a named set from its public source: a file URL (downloaded once into the
    cache) or a hub dataset."""
    if entry.remote.startswith("https://"):
        path = _download_once(entry)
        return _load_table(path), sha256_file(path)
    if offline():
        raise DataError(
            f"named set {entry.name!r} is not shipped and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is "
            f"set: {_supply_hint(entry)}"
        )
    from datasets import load_dataset

    try:
        with quiet_hub_clients():
            dataset = load_dataset(entry.remote, entry.remote_config, split=entry.remote_split)
    except Exception as exc:  # hub errors come in many types
        raise DataError(
            f"cannot fetch named set {entry.name!r} from the hub ({entry.remote}): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            f"{_supply_hint(entry)}"
        ) from exc
    return [dict(row) for row in dataset], str(getattr(dataset, "_fingerprint", entry.remote))


def _download_once(entry: NamedSet) -> Path:
    """A named set's file in the wandacli cache, downloaded atomically the first time, with a
    progress bar."""
    import urllib.error
    import urllib.request

    from wandacli.core.console import download_progress
    from wandacli.core.paths import cache_root

    url = entry.remote
    target = cache_root() / "data" / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    if offline():
        raise DataError(
            f"named set {entry.name!r} is not shipped and not in the cache, and "
            f"HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: {_supply_hint(entry)}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as handle:
            size = int(response.headers.get("Content-Length") or 0) or None
            with download_progress(f"downloading {entry.name}", size) as advance:
                while block := response.read(1 << 20):
                    handle.write(block)
                    advance(len(block))
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DataError(
            f"cannot download named set {entry.name!r} from {url} ({reason}): {_supply_hint(entry)}"
        ) from exc
    return target


def _check_columns(
    rows: list[dict[str, Any]], needed: Sequence[str], source: str, flags: str
) -> None:
    if not rows:
        raise DataError(f"{source} has no rows: pass a file with data")
    available = list(rows[0].keys())
    for column in needed:
        if column not in rows[0]:
            raise DataError(
                f"column {column!r} not in {source} (columns: {', '.join(available)}): pass {flags}"
            )


def load_raw(
    data: str,
    *,
    purpose: Literal["calibration", "prompts"] = "calibration",
    columns: Columns | None = None,
    directory: Path | None = None,
) -> RawData:
    """Read a named set or a local file. Calibration data becomes pairs or text; prompt data
    becomes a list of prompts."""
    columns = columns or Columns()
    entry = named_set(data)
    if entry is not None:
        return _load_named(entry, purpose, directory)
    path = Path(data).expanduser()
    if path.is_dir():
        raise DataError(
            f"--data {data} is a directory: pass a file (CSV, JSON, JSONL, Parquet, TXT)"
        )
    if not path.is_file():
        names = ", ".join(
            e.name for e in NAMED_SETS if (e.kind == "prompts") == (purpose == "prompts")
        )
        raise DataError(f"unknown data set {data!r}: not a file and not one of {names}")
    return _load_file(path, purpose, columns)


def _load_named(entry: NamedSet, purpose: str, directory: Path | None) -> RawData:
    """Data directory, then the shipped copy, then the public source (see the module doc)."""
    if (entry.kind == "prompts") != (purpose == "prompts"):
        wanted = "attack prompts" if purpose == "prompts" else "calibration data"
        raise DataError(f"{entry.name!r} is not {wanted} ({entry.description})")
    candidates: list[Path] = []
    folder = data_dir(directory)
    if folder is not None:
        candidates += [folder / name for name in entry.local_files]
    if entry.shipped is not None:
        candidates.append(shipped_data_dir() / entry.shipped)
    for path in candidates:
        if path.is_file():
            raw = _load_file(path, purpose, _named_columns(entry), to_pair=entry.to_pair)
            raw.name = entry.name
            return raw
    rows, fingerprint = _load_remote(entry)
    return _rows_to_raw(
        entry.name,
        entry.remote,
        fingerprint,
        rows,
        entry.kind,
        _named_columns(entry),
        entry.to_pair,
    )


def _named_columns(entry: NamedSet) -> Columns:
    if entry.kind == "prompts":
        return Columns(prompt=entry.column or "prompt")
    return Columns(text=entry.column or "text")


def _load_file(
    path: Path,
    purpose: str,
    columns: Columns,
    to_pair: Callable[[dict[str, Any]], Pair] | None = None,
) -> RawData:
    content_hash = sha256_file(path)
    suffix = path.suffix.lower()
    if suffix in _TEXT_SUFFIXES:
        text = path.read_text(encoding="utf-8", errors="replace")
        if purpose == "prompts":
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
            if not prompts:
                raise DataError(f"{path} has no prompts (no non-empty lines)")
            return RawData(path.stem, str(path), "prompts", content_hash, texts=prompts)
        if not text.strip():
            raise DataError(f"{path} is empty: pass a file with text")
        return RawData(path.stem, str(path), "text", content_hash, texts=[text])
    rows = _load_table(path)
    if purpose == "prompts":
        return _rows_to_raw(path.stem, str(path), content_hash, rows, "prompts", columns, None)
    if to_pair is not None:
        kind: SetKind = "pairs"
    elif rows and columns.prompt in rows[0] and columns.response in rows[0]:
        kind = "pairs"
    elif rows and isinstance(rows[0].get("messages"), list):
        kind, to_pair = "pairs", _pair_from_messages
    elif rows and columns.text in rows[0]:
        kind = "text"
    else:
        available = ", ".join(rows[0].keys()) if rows else "none"
        raise DataError(
            f"{path} has neither columns {columns.prompt!r}+{columns.response!r} nor "
            f"{columns.text!r} (columns: {available}): pass --prompt-column and "
            "--response-column, or --text-column"
        )
    return _rows_to_raw(path.stem, str(path), content_hash, rows, kind, columns, to_pair)


def _rows_to_raw(
    name: str,
    source: str,
    content_hash: str,
    rows: list[dict[str, Any]],
    kind: SetKind,
    columns: Columns,
    to_pair: Callable[[dict[str, Any]], Pair] | None,
) -> RawData:
    raw = RawData(name, source, kind, content_hash)
    if kind == "prompts":
        if rows and isinstance(rows[0], dict) and columns.prompt not in rows[0]:
            # Prompt files commonly use one of these; take the first present.
            for fallback in ("prompt", "goal", "Goal", "instruction", "behavior", "text"):
                if fallback in rows[0]:
                    columns = Columns(prompt=fallback)
                    break
        _check_columns(rows, [columns.prompt], source, "--prompt-column")
        raw.texts = [str(row[columns.prompt]) for row in rows]
    elif kind == "text":
        _check_columns(rows, [columns.text], source, "--text-column")
        # Rows joined as the reference joins WikiText's ("\n\n") for perplexity.
        raw.texts = ["\n\n".join(str(row[columns.text]) for row in rows)]
    elif to_pair is not None:
        if not rows:
            raise DataError(f"{source} has no rows: pass a file with data")
        try:
            raw.pairs = [to_pair(row) for row in rows]
        except (KeyError, IndexError, TypeError) as exc:
            raise DataError(
                f"{source} does not have the columns of {name!r}: missing {exc}"
            ) from exc
    else:
        _check_columns(
            rows, [columns.prompt, columns.response], source, "--prompt-column/--response-column"
        )
        raw.pairs = [Pair(str(row[columns.prompt]), str(row[columns.response])) for row in rows]
        if columns.text in rows[0]:
            raw.texts = [str(row[columns.text]) for row in rows]
    return raw


def describe_named_sets(purpose: Literal["calibration", "prompts"] = "calibration") -> str:
    """One line per named set, for --help."""
    wanted = {"calibration": ("pairs", "text"), "prompts": ("prompts",)}[purpose]
    return "; ".join(f"{e.name}: {e.description}" for e in NAMED_SETS if e.kind in wanted)
