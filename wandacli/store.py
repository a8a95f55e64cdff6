"""The store: the whole on-disk schema, written down here and nowhere else.

A store is a directory of HDF5 files, so that no file holding hours of computation is ever
rewritten in place (an HDF5 file killed mid-write is often unreadable):

    DIR/
      .wandacli.lock            writer lock (one writer at a time); .wandacli.lock.json names it
      scores/<set>.h5           a finished score set
      scores/<set>.parts/       work in progress of an unfinished score set (resumable)
        manifest.json           the settings the work was started with
        stats-<n>.h5            wanda: squared-input sums after n samples
        accum-g<k>-<n>.h5       wandg: |grad| sums of layer group k after n samples
                                (actsvd: second-moment sums, float64)
        group-<k>.h5            wandg: finished scores of layer group k (actsvd: its C)
      masks/<mask>.h5           a pruning mask
      edits/<edit>.h5           a rank edit (ActSVD): what to subtract from each weight

Score set file (`format="wandacli-scores"`):
    /<layer>/<module>           float32 (float16 only by choice) [out_features, in_features],
                                chunked by rows, fletcher32 checksum
    /stats/<layer>/<module>     wanda only: s, the mean squared input norm per column [in]
    root attributes: format, format_version, meta (JSON: method, model id and fingerprint,
                     data set, its hash and sample indices, nsamples, seed, seqlen, ...)

Rank-statistics set (`format="wandacli-rank-statistics"`, `score --method actsvd`), in
scores/<set>.h5 beside the score sets (it is looked up by name the same way):
    /<layer>/<module>           float32 [in_features, in_features]: C = (1/N) Σ x xᵀ, the
                                second moment of the module's input over the N counted tokens,
                                fletcher32. Modules that read the same input (q/k/v, gate/up)
                                are HDF5 hard links to one dataset: stored once.
    root attributes: format, format_version, meta (JSON, as for score sets, plus
                     counted_tokens = N and shared_inputs = {module key: the key it links to})
    parts: accum-g<k>-<n>.h5 hold float64 sums Σ x xᵀ and the counted-token count;
           group-<k>.h5 a finished layer group's C.

Mask file (`format="wandacli-mask"`):
    /<layer>/<module>           uint8 numpy.packbits(mask, axis=-1), True = pruned,
                                attribute shape = the weight's [out, in], fletcher32
    root attributes: format, format_version, meta (JSON)

Edit file (`format="wandacli-edit"`, `prune --remove-top-ranks/--keep-top-ranks` or the
orthogonal projection from rank statistics):
    /<layer>/<module>/<basis>   float32 [out_features, r], orthonormal columns: `remove` (V_r:
                                W ← W − V_r V_rᵀ W), `keep` (V_k: W ← V_k V_kᵀ W), or `safety`
                                and `utility` (V_s, V_u: W ← W − (I − V_u V_uᵀ) V_s V_sᵀ W),
                                fletcher32. Only the modules the edit changes are present.
    root attributes: format, format_version, meta (JSON: mode, ranks and removed rank per
                     module, the rank-statistics sets and their fingerprints, command line)

Every file is written to a temporary name in its final directory, flushed, fsynced and renamed
into place (durable.py); readers only ever see finished files. Reading validates format and
version, refuses external links, external storage, virtual datasets and unknown filters before
any data is read, and turns checksum failures into errors that name the file, layer and module.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import h5py
import numpy as np

from wandacli.durable import (
    WriteFailed,
    atomic_h5,
    atomic_write_text,
    ensure_writable_directory,
    remove_orphan_temporaries,
)
from wandacli.errors import (
    ChecksumError,
    NonFiniteScoresError,
    ResumeMismatchError,
    StoreError,
    StoreLockedError,
)
from wandacli.fingerprint import ModelFingerprint

FORMAT_VERSION = 1
SCORES_FORMAT = "wandacli-scores"
RANK_STATS_FORMAT = "wandacli-rank-statistics"
MASK_FORMAT = "wandacli-mask"
EDIT_FORMAT = "wandacli-edit"
PART_FORMAT = "wandacli-part"
PARTS_MANIFEST_FORMAT = "wandacli-parts"

SCORES_DIR = "scores"
MASKS_DIR = "masks"
EDITS_DIR = "edits"
PARTS_SUFFIX = ".parts"
LOCK_NAME = ".wandacli.lock"
LOCK_HOLDER_NAME = ".wandacli.lock.json"

STATS_GROUP = "stats"
# HDF5 filters a store file may use: deflate (1), shuffle (2), fletcher32 (3). Anything else
# could be a plugin we do not want to load for a file someone handed us.
ALLOWED_FILTER_IDS = frozenset({1, 2, 3})
MAX_META_BYTES = 1 << 20  # 1 MiB: meta is settings, not data
FLOAT16_MAX = 65504.0
# Target chunk size for score arrays: whole rows, about 1 MiB a chunk.
CHUNK_BYTES = 1 << 20

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,@-]*$")
_LAYER_PATTERN = re.compile(r"^\d+$")


# ---------------------------------------------------------------------------------------------
# Names and paths


def check_name(name: str, what: str = "score set") -> str:
    """A set or mask name usable as a file name on every platform."""
    if not _NAME_PATTERN.match(name) or name.endswith(PARTS_SUFFIX) or len(name) > 200:
        raise StoreError(
            f"invalid {what} name {name!r}: use letters, digits and . _ - + = , @ "
            "(not starting with a dot)"
        )
    return name


@dataclass(frozen=True)
class Store:
    """Paths inside one store directory."""

    root: Path

    @property
    def scores_dir(self) -> Path:
        return self.root / SCORES_DIR

    @property
    def masks_dir(self) -> Path:
        return self.root / MASKS_DIR

    def score_set_path(self, name: str) -> Path:
        return self.scores_dir / f"{check_name(name)}.h5"

    def parts_dir(self, name: str) -> Path:
        return self.scores_dir / f"{check_name(name)}{PARTS_SUFFIX}"

    def mask_path(self, name: str) -> Path:
        return self.masks_dir / f"{check_name(name, 'mask')}.h5"

    @property
    def edits_dir(self) -> Path:
        return self.root / EDITS_DIR

    def edit_path(self, name: str) -> Path:
        return self.edits_dir / f"{check_name(name, 'edit')}.h5"

    def edit_names(self) -> list[str]:
        if not self.edits_dir.is_dir():
            return []
        return sorted(p.stem for p in self.edits_dir.glob("*.h5") if not p.name.startswith("."))

    def score_set_names(self) -> list[str]:
        if not self.scores_dir.is_dir():
            return []
        return sorted(p.stem for p in self.scores_dir.glob("*.h5") if not p.name.startswith("."))

    def unfinished_names(self) -> list[str]:
        if not self.scores_dir.is_dir():
            return []
        return sorted(
            p.name[: -len(PARTS_SUFFIX)]
            for p in self.scores_dir.glob(f"*{PARTS_SUFFIX}")
            if p.is_dir() and not p.name.startswith(".")
        )

    def mask_names(self) -> list[str]:
        if not self.masks_dir.is_dir():
            return []
        return sorted(p.stem for p in self.masks_dir.glob("*.h5") if not p.name.startswith("."))


def resolve_file(reference: str, store_root: Path | None, kind: str) -> Path:
    """A score set, mask or edit given by name (inside the store) or as a path to its .h5."""
    folder = {"score set": SCORES_DIR, "mask": MASKS_DIR, "edit": EDITS_DIR}[kind]
    path = Path(reference).expanduser()
    if reference.endswith(".h5") or os.sep in reference:
        if path.is_dir():
            raise StoreError(f"{reference} is a directory: pass the {kind}'s .h5 file or its name")
        if not path.is_file():
            raise StoreError(f"{kind} file {reference} does not exist")
        return path
    if store_root is None:
        raise StoreError(
            f"{kind} {reference!r} given by name: pass --store, or the path of its .h5 file"
        )
    candidate = store_root / folder / f"{check_name(reference, kind)}.h5"
    if candidate.is_file():
        return candidate
    if kind == "score set" and (store_root / folder / f"{reference}{PARTS_SUFFIX}").is_dir():
        raise StoreError(
            f"score set {reference!r} in {store_root} is unfinished: run the same "
            "`wandacli score` command again to finish it"
        )
    known = {
        "score set": Store(store_root).score_set_names,
        "mask": Store(store_root).mask_names,
        "edit": Store(store_root).edit_names,
    }[kind]()
    listing = ", ".join(known) if known else "none"
    raise StoreError(f"no {kind} {reference!r} in {store_root} (it has: {listing})")


def split_key(key: str) -> tuple[int, str]:
    layer, module = key.split("/", 1)
    return int(layer), module


def describe_key(key: str) -> str:
    layer, module = split_key(key)
    return f"layer {layer} {module}"


# ---------------------------------------------------------------------------------------------
# The writer lock


def _lock_holder(root: Path) -> str:
    try:
        holder = json.loads((root / LOCK_HOLDER_NAME).read_text())
        return (
            f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"({holder.get('command')})"
        )
    except (OSError, ValueError):
        return "another process"


@contextlib.contextmanager
def writer_lock(root: Path, command: str | None = None) -> Iterator[Store]:
    """Hold the store's writer lock (created if missing), cleaning orphan temporaries on entry.

    A second writer fails at once with an error naming the holder. The lock is an flock on
    DIR/.wandacli.lock, independent of HDF5's own file locking.
    """
    from filelock import FileLock, Timeout

    ensure_writable_directory(root)
    lock = FileLock(str(root / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise StoreLockedError(
            f"store {root} is being written by {_lock_holder(root)}: wait for it to finish, "
            "or use another --store"
        ) from None
    try:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": now_iso(),
            "command": command or " ".join(sys.argv),
        }
        atomic_write_text(root / LOCK_HOLDER_NAME, json.dumps(holder))
        remove_orphan_temporaries(root)
        yield Store(root)
    finally:
        with contextlib.suppress(OSError):
            (root / LOCK_HOLDER_NAME).unlink()
        lock.release()


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def software_versions() -> dict[str, str]:
    """Versions recorded in every file's meta, read from package metadata (no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in ("wandacli", "torch", "transformers", "numpy", "h5py"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


# ---------------------------------------------------------------------------------------------
# Writing score sets, parts and masks


def chunk_rows(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of whole rows, about CHUNK_BYTES each."""
    rows, cols = shape
    per_chunk = max(1, min(rows, CHUNK_BYTES // max(1, cols * itemsize)))
    return (per_chunk, cols)


def non_finite_counts(array: np.ndarray) -> tuple[int, int]:
    return int(np.isnan(array).sum()), int(np.isinf(array).sum())


def format_non_finite(counts: dict[str, tuple[int, int]]) -> str:
    parts = [f"{describe_key(k)}: {n} NaN, {i} Inf" for k, (n, i) in counts.items()]
    shown = "; ".join(parts[:5]) + (f"; and {len(parts) - 5} more" if len(parts) > 5 else "")
    return shown


def write_array(
    handle: h5py.File | h5py.Group, name: str, array: np.ndarray, dtype: str = "float32"
) -> None:
    """One checksummed, row-chunked array."""
    array = np.ascontiguousarray(array, dtype=dtype)
    kwargs: dict[str, Any] = {"fletcher32": True}
    if array.ndim == 2 and array.size:
        kwargs["chunks"] = chunk_rows(array.shape, array.dtype.itemsize)
    try:
        handle.create_dataset(name, data=array, **kwargs)
    except (OSError, RuntimeError) as exc:  # disk full, file size limit: HDF5's I/O errors
        raise WriteFailed(str(exc)) from exc


def to_float16_checked(array: np.ndarray, key: str) -> np.ndarray:
    """float16 scores, refused when a value would overflow (ties at the cut change masks)."""
    largest = float(np.abs(array).max()) if array.size else 0.0
    if largest > FLOAT16_MAX:
        raise StoreError(
            f"{describe_key(key)}: score {largest:.4g} exceeds float16's maximum {FLOAT16_MAX:g}; "
            "use --score-dtype float32"
        )
    return array.astype(np.float16)


def set_root_attrs(handle: h5py.File, fmt: str, meta: dict[str, Any]) -> None:
    try:
        handle.attrs["format"] = fmt
        handle.attrs["format_version"] = FORMAT_VERSION
        handle.attrs["meta"] = json.dumps(meta, sort_keys=False, default=str)
    except (OSError, RuntimeError) as exc:
        raise WriteFailed(str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# Reading and validation


def _is_checksum_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        word in text
        for word in ("checksum", "fletcher", "filter returned failure", "can't read data")
    )


def _validate_tree(group: h5py.Group, path: Path, array_dtypes: tuple[str, ...]) -> None:
    """Refuse links, external storage, virtual datasets and unknown filters, before reading."""
    for name in group:
        link = group.get(name, getlink=True)
        where = f"{path}:{group.name.rstrip('/')}/{name}"
        if isinstance(link, h5py.ExternalLink):
            raise StoreError(
                f"{where} is an external link to {link.filename}: refusing to follow it"
            )
        if isinstance(link, h5py.SoftLink):
            raise StoreError(f"{where} is a soft link: not part of the wandacli format")
        if not isinstance(link, h5py.HardLink):
            raise StoreError(f"{where} is a link of unknown type: not part of the wandacli format")
        item = group[name]
        if isinstance(item, h5py.Group):
            _validate_tree(item, path, array_dtypes)
            continue
        if not isinstance(item, h5py.Dataset):
            raise StoreError(f"{where} is not a dataset or group: not part of the wandacli format")
        if item.is_virtual:
            raise StoreError(
                f"{where} is a virtual dataset: refusing to read data from other files"
            )
        if item.external:
            raise StoreError(
                f"{where} uses external storage: refusing to read data from other files"
            )
        plist = item.id.get_create_plist()
        for index in range(plist.get_nfilters()):
            filter_id = plist.get_filter(index)[0]
            if filter_id not in ALLOWED_FILTER_IDS:
                raise StoreError(
                    f"{where} uses unknown HDF5 filter {filter_id}: refusing to decode it"
                )
        if item.dtype.str.lstrip("<>|=") not in array_dtypes:
            raise StoreError(
                f"{where} has dtype {item.dtype}, expected one of {', '.join(array_dtypes)}"
            )


def _dtype_code(dtype: str) -> str:
    return np.dtype(dtype).str.lstrip("<>|=")


class StoredFile:
    """A validated, read-only store file (score set, mask or part)."""

    def __init__(self, path: Path, fmt: str, array_dtypes: tuple[str, ...]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory, not a store file")
        if not self.path.is_file():
            raise StoreError(f"{self.path} does not exist")
        try:
            is_hdf5 = h5py.is_hdf5(self.path)
        except OSError:
            is_hdf5 = False
        if not is_hdf5:
            raise StoreError(
                f"{self.path} is not a wandacli {_format_noun(fmt)} (not an HDF5 file)"
            )
        try:
            self.handle = h5py.File(self.path, "r", locking=False)
        except OSError as exc:
            raise StoreError(
                f"{self.path} is truncated or damaged ({_first_line(exc)}): remove it and recompute"
            ) from exc
        try:
            self.meta = self._validate(fmt, array_dtypes)
        except BaseException:
            self.handle.close()
            raise

    def _validate(self, fmt: str, array_dtypes: tuple[str, ...]) -> dict[str, Any]:
        attrs = self.handle.attrs
        found = attrs.get("format")
        if isinstance(found, bytes):
            found = found.decode(errors="replace")
        if found != fmt:
            raise StoreError(
                f"{self.path} is not a wandacli {_format_noun(fmt)} (format={found!r})"
            )
        version = attrs.get("format_version")
        if not isinstance(version, (int, np.integer)) or int(version) != FORMAT_VERSION:
            shown = int(version) if isinstance(version, (int, np.integer)) else repr(version)
            raise StoreError(
                f"{self.path} has format_version {shown}; this wandacli reads version "
                f"{FORMAT_VERSION}: upgrade wandacli or recompute it"
            )
        raw_meta = attrs.get("meta")
        if isinstance(raw_meta, bytes):
            raw_meta = raw_meta.decode(errors="replace")
        if not isinstance(raw_meta, str):
            raise StoreError(f"{self.path} has no meta attribute: not a complete wandacli file")
        if len(raw_meta.encode()) > MAX_META_BYTES:
            raise StoreError(
                f"{self.path} has an oversized meta attribute (> {MAX_META_BYTES} bytes): refusing it"
            )
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError as exc:
            raise StoreError(
                f"{self.path} has a meta attribute that is not JSON ({exc.msg})"
            ) from exc
        if not isinstance(meta, dict):
            raise StoreError(f"{self.path} has a meta attribute that is not a JSON object")
        _validate_tree(self.handle, self.path, tuple(_dtype_code(d) for d in array_dtypes))
        return meta

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.handle.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, key: str) -> bool:
        return key in self.handle and isinstance(self.handle[key], h5py.Dataset)

    def read_raw(self, key: str) -> np.ndarray:
        """One dataset, with checksum failures named."""
        try:
            return np.asarray(self.handle[key][()])
        except KeyError as exc:
            raise StoreError(f"{self.path} has no array for {describe_key(key)}") from exc
        except OSError as exc:
            if _is_checksum_failure(exc):
                raise ChecksumError(f"checksum mismatch in {self.path}:/{key}") from exc
            raise StoreError(f"cannot read {self.path}:/{key} ({_first_line(exc)})") from exc

    def all_dataset_keys(self) -> list[str]:
        """Every dataset's path, in storage order (parts hold more than layer arrays)."""
        keys: list[str] = []
        self.handle.visititems(
            lambda name, item: keys.append(name) if isinstance(item, h5py.Dataset) else None
        )
        return keys

    def dataset_keys(self) -> list[str]:
        """`<layer>/<module>` keys of the arrays (the stats group excluded)."""
        keys: list[str] = []
        for layer in self.handle:
            if layer == STATS_GROUP or not _LAYER_PATTERN.match(layer):
                continue
            group = self.handle[layer]
            if isinstance(group, h5py.Group):
                keys.extend(f"{layer}/{module}" for module in group)
        return keys


def _format_noun(fmt: str) -> str:
    return {
        SCORES_FORMAT: "score set",
        RANK_STATS_FORMAT: "rank-statistics set",
        MASK_FORMAT: "mask",
        EDIT_FORMAT: "edit",
        PART_FORMAT: "part file",
    }.get(fmt, "file")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def check_made_for(stored: Any, fingerprint: ModelFingerprint, model_id: str) -> None:
    """Refuse a stored file (its `noun`, `path`, `meta` and `fingerprint`) made for a model
    with other layers or shapes than `fingerprint`."""
    mismatch = stored.fingerprint.first_mismatch(fingerprint, mine="stored", theirs="model")
    if mismatch:
        raise StoreError(
            f"{stored.noun} {stored.path} was made for another model "
            f"({stored.meta['model'].get('id')}) than {model_id}: {mismatch}"
        )


class ModelFile(StoredFile):
    """A finished score set or mask: one array per linear layer of the model its meta's
    fingerprint describes, every one present."""

    noun = "file"

    def __init__(self, path: Path, fmt: str, array_dtypes: tuple[str, ...]) -> None:
        super().__init__(path, fmt, array_dtypes)
        try:
            self.fingerprint = ModelFingerprint.from_json(self.meta["model"]["fingerprint"])
        except (KeyError, TypeError, ValueError) as exc:
            self.close()
            raise StoreError(
                f"{self.path} has no model fingerprint in its meta: not a complete {self.noun}"
            ) from exc
        missing = [k for k in self.fingerprint.shapes if not self.has(k)]
        if missing:
            self.close()
            raise StoreError(
                f"{self.path} is incomplete: missing {describe_key(missing[0])}"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def keys(self) -> list[str]:
        """Every `<layer>/<module>` in model order."""
        return list(self.fingerprint.shapes)

    def check_model(self, fingerprint: ModelFingerprint, model_id: str) -> None:
        """Refuse a file made for a model with other layers or shapes."""
        check_made_for(self, fingerprint, model_id)


class ScoreSet(ModelFile):
    """A finished score set: meta, fingerprint and arrays read one at a time."""

    noun = "score set"

    def __init__(self, path: Path) -> None:
        super().__init__(path, SCORES_FORMAT, ("float32", "float16"))

    def read(self, key: str) -> np.ndarray:
        """One layer's scores as float32, refusing NaN/Inf and shapes that disagree with meta."""
        array = self.read_raw(key)
        expected = self.fingerprint.shapes.get(key)
        if expected is None or tuple(array.shape) != expected:
            raise StoreError(
                f"{self.path}:/{key} has shape {tuple(array.shape)}, its meta says {expected}"
            )
        nan, inf = non_finite_counts(array)
        if nan or inf:
            raise NonFiniteScoresError(
                f"{self.path}:/{key} contains {nan} NaN and {inf} Inf values: recompute this score set"
            )
        return array.astype(np.float32, copy=False)

    def stats(self, key: str) -> np.ndarray | None:
        name = f"{STATS_GROUP}/{key}"
        return self.read_raw(name) if name in self.handle else None


class MaskFile(ModelFile):
    """A finished mask: bit-packed rows per linear layer, read one layer at a time."""

    noun = "mask"

    def __init__(self, path: Path) -> None:
        super().__init__(path, MASK_FORMAT, ("uint8",))

    def read(self, key: str) -> np.ndarray:
        """One layer's mask as bool [out, in], True = pruned."""
        packed = self.read_raw(key)
        shape = self.fingerprint.shapes[key]
        stored_shape = tuple(int(v) for v in self.handle[key].attrs.get("shape", ()))
        if stored_shape != shape or packed.shape != (shape[0], (shape[1] + 7) // 8):
            raise StoreError(
                f"{self.path}:/{key} holds a {packed.shape} packed mask with shape attribute "
                f"{stored_shape}, the meta says {shape}"
            )
        return unpack_mask(packed, shape)


class RankStatistics(ModelFile):
    """A finished rank-statistics set (`score --method actsvd`): per module, the second moment
    C of its input, [in_features, in_features], read one at a time."""

    noun = "rank-statistics set"

    def __init__(self, path: Path) -> None:
        super().__init__(path, RANK_STATS_FORMAT, ("float32",))

    @property
    def counted_tokens(self) -> int:
        return int(self.meta.get("counted_tokens") or 0)

    def read(self, key: str) -> np.ndarray:
        """C for the input of `key` as float64, refusing NaN/Inf and wrong shapes."""
        array = self.read_raw(key)
        shape = self.fingerprint.shapes.get(key)
        expected = None if shape is None else (shape[1], shape[1])
        if expected is None or tuple(array.shape) != expected:
            raise StoreError(
                f"{self.path}:/{key} has shape {tuple(array.shape)}, its meta says {expected}"
            )
        nan, inf = non_finite_counts(array)
        if nan or inf:
            raise NonFiniteScoresError(
                f"{self.path}:/{key} contains {nan} NaN and {inf} Inf values: recompute this set"
            )
        return array.astype(np.float64)


def stored_format(path: Path) -> str | None:
    """The `format` attribute of an HDF5 store file, or None when it has none or is unreadable."""
    try:
        with h5py.File(path, "r", locking=False) as handle:
            found = handle.attrs.get("format")
    except OSError:
        return None
    return found.decode(errors="replace") if isinstance(found, bytes) else found


def open_finished_scores(path: Path) -> ScoreSet | RankStatistics:
    """A finished file in scores/: a score set or a rank-statistics set, by its format."""
    if stored_format(path) == RANK_STATS_FORMAT:
        return RankStatistics(path)
    return ScoreSet(path)


def open_rank_statistics(reference: str, store_root: Path | None) -> RankStatistics:
    """A rank-statistics set by name or path; a score set given instead is named as such."""
    path = resolve_file(reference, store_root, "score set")
    found = stored_format(path)
    if found == SCORES_FORMAT:
        raise StoreError(
            f"{reference} is a score set, not rank statistics: rank edits need "
            "`wandacli score --method actsvd` (per-weight scores give masks)"
        )
    return RankStatistics(path)


class EditFile(StoredFile):
    """A finished rank edit: per changed module, the orthonormal bases that define it."""

    noun = "edit"
    BASES = {
        "remove-top-ranks": ("remove",),
        "keep-top-ranks": ("keep",),
        "orthogonal-projection": ("safety", "utility"),
    }

    def __init__(self, path: Path) -> None:
        super().__init__(path, EDIT_FORMAT, ("float32",))
        try:
            self.fingerprint = ModelFingerprint.from_json(self.meta["model"]["fingerprint"])
            self.mode = str(self.meta["mode"])
            self.keys = list(self.meta["modules"])
            bases = self.BASES[self.mode]
        except (KeyError, TypeError, ValueError) as exc:
            self.close()
            raise StoreError(f"{self.path} has incomplete meta: not a complete edit") from exc
        missing = [f"{k}/{b}" for k in self.keys for b in bases if not self.has(f"{k}/{b}")]
        if missing:
            self.close()
            raise StoreError(f"{self.path} is incomplete: missing {missing[0]}")

    @property
    def name(self) -> str:
        return self.path.stem

    def check_model(self, fingerprint: ModelFingerprint, model_id: str) -> None:
        """Refuse an edit made for a model with other layers or shapes."""
        check_made_for(self, fingerprint, model_id)

    def bases(self, key: str) -> dict[str, np.ndarray]:
        """The module's bases by role, checked: [out_features, r] each."""
        out_features = self.fingerprint.shapes[key][0]
        found = {}
        for role in self.BASES[self.mode]:
            array = self.read_raw(f"{key}/{role}")
            if array.ndim != 2 or array.shape[0] != out_features:
                raise StoreError(
                    f"{self.path}:/{key}/{role} has shape {array.shape}, expected "
                    f"({out_features}, r)"
                )
            found[role] = array
        return found


def open_edit(reference: str, store_root: Path | None) -> EditFile:
    return EditFile(resolve_file(reference, store_root, "edit"))


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """A mask's stored form: uint8 `numpy.packbits(mask, axis=-1)`, 8 weights a byte."""
    return np.packbits(mask, axis=-1)


def unpack_mask(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The bool mask back from its packed rows."""
    return np.unpackbits(packed, axis=-1, count=shape[1]).astype(bool).reshape(shape)


def write_mask_array(handle: h5py.File, key: str, mask: np.ndarray) -> None:
    """One layer's mask: uint8 packbits(mask, axis=-1), True = pruned, with its shape."""
    write_array(handle, key, pack_mask(mask), "uint8")
    handle[key].attrs["shape"] = np.asarray(mask.shape, dtype=np.int64)


def open_mask(reference: str, store_root: Path | None) -> MaskFile:
    return MaskFile(resolve_file(reference, store_root, "mask"))


@dataclass
class ScoreSetSummary:
    """What `inspect` shows for one score set, finished or not."""

    name: str
    path: Path
    complete: bool
    meta: dict[str, Any] = field(default_factory=dict)
    progress: str = ""
    error: str | None = None


def _summaries(names: list[str], path_of: Any, opener: Any) -> list[ScoreSetSummary]:
    """Each finished file's meta, or the reason it cannot be read."""
    found: list[ScoreSetSummary] = []
    for name in names:
        path = path_of(name)
        try:
            with opener(path) as stored:
                found.append(ScoreSetSummary(name, path, True, stored.meta, "complete"))
        except StoreError as exc:
            found.append(ScoreSetSummary(name, path, False, error=str(exc)))
    return found


def summarize_store(
    root: Path,
) -> tuple[list[ScoreSetSummary], list[ScoreSetSummary], list[ScoreSetSummary]]:
    """(score and rank-statistics sets, masks, edits) in a store, each with its meta or the
    reason it cannot be read."""
    if not root.is_dir():
        raise StoreError(f"store {root} does not exist: pass the directory given to --store")
    store = Store(root)
    sets: list[ScoreSetSummary] = []
    for name in store.score_set_names():
        path = store.score_set_path(name)
        try:
            with open_finished_scores(path) as score_set:
                sets.append(ScoreSetSummary(name, path, True, score_set.meta, "complete"))
        except StoreError as exc:
            sets.append(ScoreSetSummary(name, path, False, error=str(exc)))
    for name in store.unfinished_names():
        parts = store.parts_dir(name)
        manifest = read_manifest(parts)
        progress = describe_parts(parts)
        sets.append(ScoreSetSummary(name, parts, False, manifest or {}, progress))
    masks = _summaries(store.mask_names(), store.mask_path, MaskFile)
    edits = _summaries(store.edit_names(), store.edit_path, EditFile)
    return sets, masks, edits


# ---------------------------------------------------------------------------------------------
# Parts of unfinished score sets


MANIFEST_NAME = "manifest.json"


def read_manifest(parts_dir: Path) -> dict[str, Any] | None:
    path = parts_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != PARTS_MANIFEST_FORMAT:
        return None
    return data


def write_manifest(parts_dir: Path, settings: dict[str, Any], extra: dict[str, Any]) -> None:
    atomic_write_text(
        parts_dir / MANIFEST_NAME,
        json.dumps({"format": PARTS_MANIFEST_FORMAT, "settings": settings, **extra}, indent=1),
    )


def settings_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'name: old → new' for every setting that differs."""
    differences = []
    for key in sorted(set(stored) | set(current)):
        if stored.get(key) != current.get(key):
            differences.append(f"{key}: {_short(stored.get(key))} → {_short(current.get(key))}")
    return differences


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def check_resumable(parts_dir: Path, settings: dict[str, Any], name: str) -> bool:
    """True when there is unfinished work to resume with the same settings; refuses otherwise."""
    if not parts_dir.is_dir():
        return False
    manifest = read_manifest(parts_dir)
    if manifest is None:
        # A parts directory without a readable manifest holds nothing we can trust.
        shutil.rmtree(parts_dir, ignore_errors=True)
        return False
    differences = settings_differences(manifest.get("settings", {}), settings)
    if differences:
        raise ResumeMismatchError(
            f"unfinished score set {name!r} was started with other settings "
            f"({'; '.join(differences)}): rerun with the same settings to resume, "
            "--overwrite to discard it, or --name to start another set"
        )
    return True


def describe_parts(parts_dir: Path) -> str:
    manifest = read_manifest(parts_dir) or {}
    done = []
    stats = sorted(parts_dir.glob("stats-*.h5"))
    if stats:
        done.append(f"{int(stats[-1].stem.split('-')[1])} samples of statistics")
    groups = sorted(parts_dir.glob("group-*.h5"))
    total_groups = manifest.get("groups")
    if groups or total_groups:
        done.append(f"{len(groups)}/{total_groups or '?'} layer groups")
    return "unfinished: " + (", ".join(done) if done else "nothing kept yet")


def write_part(
    path: Path,
    arrays: Iterable[tuple[str, np.ndarray]],
    attrs: dict[str, Any],
    reserve_bytes: int | None = None,
) -> None:
    """A part file: arrays under their keys (consumed one at a time, so a generator keeps
    memory at one array), attributes as meta; atomic and checksummed."""
    with atomic_h5(path, reserve_bytes) as handle:
        for key, array in arrays:
            # float64 sums (actsvd) stay float64: a resume must continue from the exact sums.
            write_array(handle, key, array, "float64" if array.dtype == np.float64 else "float32")
        set_root_attrs(handle, PART_FORMAT, attrs)


def read_part(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """A part's arrays and attributes, or None (and the file removed) when it is damaged."""
    part = open_part(path)
    if part is None:
        return None
    with part:
        try:
            arrays = {key: part.read_raw(key) for key in part.all_dataset_keys()}
        except StoreError:
            part.close()
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return arrays, part.meta


def open_part(path: Path) -> StoredFile | None:
    """A part file opened for reading one array at a time, or None (and the file removed)
    when it cannot be opened: a truncated part is recomputed, never trusted."""
    try:
        return StoredFile(path, PART_FORMAT, ("float32", "float64"))
    except StoreError:
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def open_score_set(reference: str, store_root: Path | None) -> ScoreSet:
    """A score set by name or path; rank statistics given instead are named as such."""
    path = resolve_file(reference, store_root, "score set")
    if stored_format(path) == RANK_STATS_FORMAT:
        raise StoreError(
            f"{reference} holds rank statistics (actsvd), not per-weight scores: edit ranks "
            "with `prune --remove-top-ranks/--keep-top-ranks` or the orthogonal projection"
        )
    return ScoreSet(path)
