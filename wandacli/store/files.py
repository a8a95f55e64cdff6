"""Opening, validating and writing the store's HDF5 files."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Self

import h5py
import numpy as np

from wandacli.config.settings import DEFAULT_STORE
from wandacli.core.errors import (
    ChecksumError,
    NonFiniteScoresError,
    StoreError,
    first_line,
)
from wandacli.core.fingerprint import ModelFingerprint
from wandacli.store.assemble import non_finite_counts, write_array
from wandacli.store.schema import (
    ALLOWED_FILTER_IDS,
    EDIT_FORMAT,
    EDITS_DIR,
    FORMAT_VERSION,
    MASK_FORMAT,
    MASKS_DIR,
    MAX_META_BYTES,
    MEANS_DATASET,
    MEANS_FORMAT,
    PARTS_SUFFIX,
    PER_PROMPT_DATASET,
    RANK_STATS_FORMAT,
    SCORES_DIR,
    SCORES_FORMAT,
    STATS_GROUP,
    Store,
    _format_noun,
    check_name,
    describe_key,
)

# Where each kind of stored file lives in a store.
FOLDERS = {"score set": SCORES_DIR, "mask": MASKS_DIR, "edit": EDITS_DIR}


def is_path(reference: str) -> bool:
    """A reference names a file by path (an .h5, or anything with a folder in it), not by name."""
    return reference.endswith(".h5") or os.sep in reference or "/" in reference


def resolve_file(reference: str, store_root: Path | None, *kinds: str) -> Path:
    """The one rule from a name to a file: a stored file given as the path of its .h5, or by
    name, looked up in the store's folder for each of `kinds` ("score set", "mask", "edit"; a
    name two of them hold is refused as ambiguous)."""
    what = " or ".join(kinds)
    path = Path(reference).expanduser()
    if is_path(reference):
        if path.is_dir():
            raise StoreError(f"{reference} is a directory: pass the {what}'s .h5 file or its name")
        if not path.is_file():
            raise StoreError(f"{what} file {reference} does not exist")
        return path
    if store_root is None:
        raise StoreError(
            f"{what} {reference!r} given by name: pass --store, or the path of its .h5 file"
        )
    check_name(reference, kinds[0])
    found = [
        store_root / FOLDERS[kind] / f"{reference}.h5"
        for kind in kinds
        if (store_root / FOLDERS[kind] / f"{reference}.h5").is_file()
    ]
    if len(found) > 1:
        raise StoreError(
            f"{reference!r} names both a {kinds[0]} and an {kinds[1]} in {store_root}: pass the "
            f"path of the one you mean ({' or '.join(str(f) for f in found)})"
        )
    if found:
        return found[0]
    if "score set" in kinds and (store_root / SCORES_DIR / f"{reference}{PARTS_SUFFIX}").is_dir():
        raise StoreError(
            f"score set {reference!r} in {store_root} is unfinished: run the same "
            "`wandacli score` command again to finish it"
        )
    if not store_root.is_dir():
        raise StoreError(
            f"no {what} {reference!r}: the store {store_root} does not exist; pass --store, "
            "the directory your `wandacli score` wrote to (or the .h5 file's path)"
        )
    store = Store(store_root)
    listings = {
        "score set": store.score_set_names,
        "mask": store.mask_names,
        "edit": store.edit_names,
    }
    known = [name for kind in kinds for name in listings[kind]()]
    listing = ", ".join(known) if known else "none"
    raise StoreError(f"no {what} {reference!r} in {store_root} (it has: {listing})")


def store_root_for(reference: str, explicit: Path | None) -> Path:
    """--store, else the store holding a set given by path, else the default store."""
    if explicit is not None:
        return explicit
    path = Path(reference)
    if path.suffix == ".h5" and path.parent.name == SCORES_DIR:
        return path.parent.parent
    return DEFAULT_STORE


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
                f"{self.path} is truncated or damaged ({first_line(exc)}): remove it and recompute"
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
            raise StoreError(f"cannot read {self.path}:/{key} ({first_line(exc)})") from exc

    def verify(self) -> None:
        """Read every array, so that a flipped byte anywhere is found now (ChecksumError
        naming the file and array) rather than when a reader reaches it."""
        for key in self.all_dataset_keys():
            self.read_raw(key)

    def all_dataset_keys(self) -> list[str]:
        """Every dataset's path, in storage order (parts hold more than layer arrays)."""
        keys: list[str] = []
        self.handle.visititems(
            lambda name, item: keys.append(name) if isinstance(item, h5py.Dataset) else None
        )
        return keys


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


class MeanActivations(StoredFile):
    """A finished mean-activations set (`score --method mean-activations`): one array, the mean
    residual-stream activation per layer and prompt position, [layers + 1, K, d_model]."""

    noun = "mean-activations set"

    def __init__(self, path: Path) -> None:
        super().__init__(path, MEANS_FORMAT, ("float32",))
        try:
            self.fingerprint = ModelFingerprint.from_json(self.meta["model"]["fingerprint"])
            self.positions = int(self.meta["positions"])
            self.hidden_size = int(self.meta["hidden_size"])
        except (KeyError, TypeError, ValueError) as exc:
            self.close()
            raise StoreError(
                f"{self.path} has incomplete meta: not a complete {self.noun}"
            ) from exc
        if not self.has(MEANS_DATASET):
            self.close()
            raise StoreError(f"{self.path} is incomplete: missing /{MEANS_DATASET}")

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.fingerprint.num_layers + 1, self.positions, self.hidden_size)

    @property
    def template(self) -> str | None:
        return self.meta.get("template")

    def check_model(self, fingerprint: ModelFingerprint, model_id: str) -> None:
        check_made_for(self, fingerprint, model_id)

    def means(self) -> np.ndarray:
        """The means as float64, refusing NaN/Inf and a shape other than the meta's."""
        return self._checked(MEANS_DATASET, per_prompt=False)

    def per_prompt(self) -> np.ndarray | None:
        """Each prompt's streams, float64 [prompts, layers + 1, K, d_model], where the set was
        scored with --per-prompt (None where it was not)."""
        if not self.has(PER_PROMPT_DATASET):
            return None
        return self._checked(PER_PROMPT_DATASET, per_prompt=True)

    def _checked(self, dataset: str, *, per_prompt: bool) -> np.ndarray:
        """A dataset as float64, refusing NaN/Inf and a shape other than the meta's (with a
        leading prompts axis where it holds each prompt's)."""
        array = self.read_raw(dataset)
        shape = tuple(array.shape[1:] if per_prompt else array.shape)
        if shape != self.shape:
            expected = f"[prompts, {', '.join(map(str, self.shape))}]" if per_prompt else self.shape
            raise StoreError(
                f"{self.path}:/{dataset} has shape {tuple(array.shape)}, its meta says {expected}"
            )
        nan, inf = non_finite_counts(array)
        if nan or inf:
            raise NonFiniteScoresError(
                f"{self.path}:/{dataset} contains {nan} NaN and {inf} Inf values: "
                "recompute this set"
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


def open_finished_scores(path: Path) -> ScoreSet | RankStatistics | MeanActivations:
    """A finished file in scores/: a score set, a rank-statistics or a mean-activations set, by
    its format."""
    found = stored_format(path)
    if found == RANK_STATS_FORMAT:
        return RankStatistics(path)
    if found == MEANS_FORMAT:
        return MeanActivations(path)
    return ScoreSet(path)


def open_mean_activations(reference: str, store_root: Path | None) -> MeanActivations:
    """A mean-activations set by name or path; another kind of set is named as such."""
    path = resolve_file(reference, store_root, "score set")
    found = stored_format(path)
    if found != MEANS_FORMAT:
        kind = "rank statistics" if found == RANK_STATS_FORMAT else "a score set"
        raise StoreError(
            f"{reference} holds {kind}, not mean activations: a refusal direction needs two sets "
            "of `wandacli score --method mean-activations` (harmful and harmless prompts)"
        )
    return MeanActivations(path)


def open_rank_statistics(reference: str, store_root: Path | None) -> RankStatistics:
    """A rank-statistics set by name or path; a score set given instead is named as such."""
    path = resolve_file(reference, store_root, "score set")
    found = stored_format(path)
    if found in (SCORES_FORMAT, MEANS_FORMAT):
        kind = "a score set" if found == SCORES_FORMAT else "a mean-activations set"
        raise StoreError(
            f"{reference} is {kind}, not rank statistics: rank edits need "
            "`wandacli score --method actsvd`"
        )
    return RankStatistics(path)


class EditFile(StoredFile):
    """A finished edit: per changed module, the orthonormal bases that define it, each under
    its role (the meta's `modules[key].ranks` names them: `remove`, `keep`, `safety`, ...)."""

    noun = "edit"

    def __init__(self, path: Path) -> None:
        super().__init__(path, EDIT_FORMAT, ("float32",))
        try:
            self.fingerprint = ModelFingerprint.from_json(self.meta["model"]["fingerprint"])
            self.mode = str(self.meta["mode"])
            self.keys = list(self.meta["modules"])
            self._roles = {k: list(self.meta["modules"][k]["ranks"]) for k in self.keys}
        except (KeyError, TypeError, ValueError) as exc:
            self.close()
            raise StoreError(f"{self.path} has incomplete meta: not a complete edit") from exc
        missing = [
            f"{k}/{r}" for k in self.keys for r in self._roles[k] if not self.has(f"{k}/{r}")
        ]
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
        for role in self._roles[key]:
            array = self.read_raw(f"{key}/{role}")
            if array.ndim != 2 or array.shape[0] != out_features:
                raise StoreError(
                    f"{self.path}:/{key}/{role} has shape {array.shape}, expected "
                    f"({out_features}, r)"
                )
            found[role] = array
        return found


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


def open_stored_removal(reference: str, store_root: Path | None) -> MaskFile | EditFile:
    """A mask or an edit, by name (masks/, then edits/) or by path (its format decides)."""
    path = resolve_file(reference, store_root, "mask", "edit")
    return EditFile(path) if stored_format(path) == EDIT_FORMAT else MaskFile(path)


def open_score_set(reference: str, store_root: Path | None) -> ScoreSet:
    """A score set by name or path; rank statistics given instead are named as such."""
    path = resolve_file(reference, store_root, "score set")
    found = stored_format(path)
    if found == RANK_STATS_FORMAT:
        raise StoreError(
            f"{reference} holds rank statistics (actsvd), not per-weight scores: edit ranks "
            "with `prune --remove-top-ranks/--keep-top-ranks` or the orthogonal projection"
        )
    if found == MEANS_FORMAT:
        raise StoreError(
            f"{reference} holds mean activations (residual-stream means for a refusal "
            "direction), not per-weight scores: masks need wanda, wandg, magnitude or random"
        )
    return ScoreSet(path)
