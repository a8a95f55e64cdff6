"""Importing the reference code's score dumps (`--dump_wanda_score` pickles) into a score set,
without ever executing code from a pickle.

The reference wrote each layer's score with `pickle.dump(W_metric, f)` to
  {save}/wanda_score/{data}_weight_only_disentangle/W_metric_layer_{i}_name_{module}_{data}_weight_only_disentangle.pkl
  (and the `_weight_only`, `_weight_diff`, `_weight_diff_disentangle` variants; lib/prune.py), or
  {save}/wanda_score/W_metric_layer_{i}_name_model.layers.{i}.{module}_weight.pkl
  (and `_weight_diff`; lib/model_wrapper.py, wandg).

A pickled tensor names three functions: `torch._utils._rebuild_tensor_v2`, its storage's
`torch.storage._load_from_bytes` (which calls `torch.load(weights_only=False)`) and
`collections.OrderedDict`. The restricted unpickler below resolves exactly those, the storage
through `torch.load(weights_only=True, map_location="cpu")`, so tensors pickled on CUDA or in
bfloat16 load on a CPU-only machine, and refuses every other global before anything runs.
"""

from __future__ import annotations

import io
import pickle
import re
import shlex
import sys
import time
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wandacli.config.settings import ModelSpec
from wandacli.core.console import NullReporter, Reporter, warn
from wandacli.core.durable import check_free_space, expected_file_bytes
from wandacli.core.errors import ModelError, NonFiniteScoresError, StoreError
from wandacli.core.provenance import now_iso, software_versions
from wandacli.store.assemble import LayerArray, assemble, format_non_finite
from wandacli.store.lock import writer_lock
from wandacli.store.schema import SCORES_FORMAT, Store, describe_key, split_key

if TYPE_CHECKING:
    from wandacli.models.loader import ModelStructure

FILE_GLOB = "W_metric_layer_*_name_*.pkl"


# ---------------------------------------------------------------------------------------------
# Reading one dump safely


def _load_storage_bytes(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import torch

    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
        ("collections", "OrderedDict"): OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    # numpy arrays pickle through the multiarray module (numpy 2.x and 1.x names).
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _reconstruct
    return allowed


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a function or class that does not rebuild tensors."""


class TensorOnlyUnpickler(pickle.Unpickler):
    """Rebuilds tensors and numpy arrays; refuses any other global, so a payload's code never
    runs."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedGlobal("persistent ids (not a plain pickled tensor)")


def load_score_array(path: Path) -> np.ndarray:
    """One dumped score matrix as float32, from a plain pickle (the reference's format) or a
    torch.save file; refuses anything that is not a tensor or an array."""
    import torch

    try:
        if zipfile.is_zipfile(path):
            obj = torch.load(path, weights_only=True, map_location="cpu")
        else:
            with path.open("rb") as handle:
                obj = TensorOnlyUnpickler(handle).load()
    except pickle.UnpicklingError as exc:
        # Our unpickler names the global; torch.load(weights_only=True) says "GLOBAL <name>".
        match = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if isinstance(exc, RefusedGlobal) or match:
            what = match.group(1) if match else str(exc)
            raise StoreError(
                f"refusing {path}: it asks to run {what}, which is not part of a tensor; only "
                "tensors and arrays are read from pickles"
            ) from None
        raise StoreError(
            f"cannot read {path}: {str(exc).splitlines()[0]} (truncated or not a score dump)"
        ) from None
    except (EOFError, OSError, ValueError, RuntimeError, IndexError, TypeError) as exc:
        raise StoreError(
            f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__} (truncated or not a score dump)"
        ) from None
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(torch.float32).numpy()
    if isinstance(obj, np.ndarray) and obj.dtype.kind == "f":
        return obj.astype(np.float32)
    raise StoreError(f"{path} holds a {type(obj).__name__}, not a score tensor")


# ---------------------------------------------------------------------------------------------
# Finding the dumps of a model


@dataclass(frozen=True)
class LegacyFile:
    key: str
    path: Path
    suffix: str  # what follows the module name, e.g. "weight" or "align_weight_only_disentangle"


def find_dumps(
    directory: Path, keys: list[str], layers_path: str, suffix: str | None
) -> dict[str, LegacyFile]:
    """The dump of every linear layer, in either path format and module-name form."""
    if not directory.is_dir():
        raise StoreError(
            f"{directory} is not a directory: pass the reference's --save folder (or its wanda_score/)"
        )
    files = sorted(directory.rglob(FILE_GLOB))
    if not files:
        raise StoreError(
            f"no W_metric_layer_*_name_*.pkl files under {directory}: pass the reference's --save folder"
        )
    by_prefix: dict[str, list[LegacyFile]] = {}
    found: dict[str, list[LegacyFile]] = {}
    for key in keys:
        layer, module = split_key(key)
        for name in (module, f"{layers_path}.{layer}.{module}"):
            by_prefix.setdefault(f"W_metric_layer_{layer}_name_{name}_", [])
    for path in files:
        for prefix in by_prefix:
            if path.name.startswith(prefix) and path.name.endswith(".pkl"):
                by_prefix[prefix].append(
                    LegacyFile("", path, path.name[len(prefix) : -len(".pkl")])
                )
    suffixes = sorted({f.suffix for entries in by_prefix.values() for f in entries})
    if suffix is None and len(suffixes) > 1:
        raise StoreError(
            f"{directory} holds several score dumps (suffixes: {', '.join(suffixes)}): choose one with --suffix"
        )
    chosen = suffix if suffix is not None else (suffixes[0] if suffixes else None)
    for key in keys:
        layer, module = split_key(key)
        matches = [
            LegacyFile(key, f.path, f.suffix)
            for name in (module, f"{layers_path}.{layer}.{module}")
            for f in by_prefix[f"W_metric_layer_{layer}_name_{name}_"]
            if f.suffix == chosen
        ]
        if not matches:
            raise StoreError(
                f"no score dump for {describe_key(key)} in {directory} (looked for "
                f"W_metric_layer_{layer}_name_{module}_{chosen or '*'}.pkl and "
                f"W_metric_layer_{layer}_name_{layers_path}.{layer}.{module}_{chosen or '*'}.pkl)"
            )
        found[key] = matches
    duplicated = [k for k, v in found.items() if len({m.path for m in v}) > 1]
    if duplicated:
        paths = ", ".join(str(m.path) for m in found[duplicated[0]])
        raise StoreError(f"two dumps for {describe_key(duplicated[0])}: {paths}: keep one")
    return {key: matches[0] for key, matches in found.items()}


def infer_method(suffix: str) -> tuple[str, str | None, bool]:
    """(method, data set, use_diff) from a dump's suffix: lib/prune.py's wanda writes
    `{data}_weight_only[_disentangle]`, lib/model_wrapper.py (wandg) writes `weight`."""
    match = re.fullmatch(
        r"(?:(?P<data>.+)_)?weight(?P<diff>_only|_diff)?(?P<dis>_disentangle)?", suffix
    )
    if not match:
        return "imported", None, False
    use_diff = match.group("diff") == "_diff"
    if match.group("data"):
        return "wanda", match.group("data"), use_diff
    return "wandg", None, use_diff


# ---------------------------------------------------------------------------------------------
# The import


@dataclass
class ImportResult:
    name: str
    path: Path
    method: str
    files: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "method": self.method,
            "files": self.files,
            "seconds": round(self.seconds, 3),
        }


def import_legacy(
    directory: Path,
    *,
    model: ModelSpec,
    store: Path,
    name: str,
    suffix: str | None = None,
    method: str | None = None,
    negate: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    command_line: list[str] | None = None,
) -> ImportResult:
    """Read the reference's pickled scores for every linear layer of `model` into a score set."""
    from wandacli.models.loader import model_structure

    reporter = reporter or NullReporter()
    started_at, started = now_iso(), time.monotonic()
    target = Store(store).score_set_path(name)
    structure = model_structure(model)
    keys = list(structure.fingerprint.shapes)
    dumps = find_dumps(directory, keys, structure.layers_path, suffix)
    chosen_suffix = next(iter(dumps.values())).suffix
    inferred, data_name, use_diff = infer_method(chosen_suffix)
    with writer_lock(store, f"scores/{name}", shlex.join(command_line or sys.argv)):
        if target.exists() and not overwrite:
            raise StoreError(
                f"score set {name!r} already exists in {store}: pass --overwrite to replace it, or --name"
            )
        total = sum(a * b for a, b in structure.fingerprint.shapes.values())
        check_free_space(store, total * 4, f"score set {name!r}")
        all_negative = True

        def arrays(key: str) -> Iterator[LayerArray]:
            nonlocal all_negative
            array = _score_array(dumps[key].path, key, structure, model.model, negate)
            all_negative = all_negative and bool((array <= 0).all())
            yield LayerArray(key, array)

        def finished_meta() -> dict[str, Any]:
            return {
                "method": method or inferred,
                "name": name,
                "model": {
                    "id": structure.source.model_id,
                    "source": structure.source.kind,
                    "layers_path": structure.layers_path,
                    "fingerprint": structure.fingerprint.to_json(),
                },
                "data": {"name": data_name, "source": "reference dump"} if data_name else None,
                "use_diff": use_diff,
                "score_dtype": "float32",
                "imported_from": {
                    "directory": str(directory),
                    "suffix": chosen_suffix,
                    "files": len(dumps),
                    "negated": negate,
                },
                "versions": software_versions(),
                "command_line": shlex.join(command_line or sys.argv),
                "started": started_at,
                "finished": now_iso(),
            }

        assemble(
            target,
            (arrays(key) for key in keys),
            total=len(keys),
            reserve_bytes=expected_file_bytes(total * 4, len(keys)),
            file_format=SCORES_FORMAT,
            meta=finished_meta,
            non_finite_error=lambda non_finite: NonFiniteScoresError(
                f"score set {name!r} not written: non-finite scores ({format_non_finite(non_finite)})"
            ),
            reporter=reporter,
            label="importing",
        )
    if all_negative:
        warn(
            "every imported score is ≤ 0: the dump was probably made with --neg_prune; pass --negate to flip it"
        )
    return ImportResult(name, target, method or inferred, len(dumps), time.monotonic() - started)


def _score_array(
    path: Path, key: str, structure: ModelStructure, model_name: str, negate: bool
) -> np.ndarray:
    """One dump as the weight's [out, in] scores (a Conv1D's [in, out] dump transposed),
    refused when its shape is another model's."""
    array = load_score_array(path)
    expected = structure.fingerprint.shapes[key]
    if key in structure.transposed and array.shape == expected[::-1]:
        array = array.T  # a Conv1D weight's layout
    if tuple(array.shape) != expected:
        raise ModelError(
            f"{path} holds shape {tuple(array.shape)}; {describe_key(key)} of "
            f"{model_name} is {expected}: the dumps come from another model"
        )
    return -array if negate else array
