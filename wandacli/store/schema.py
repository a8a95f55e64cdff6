"""The store: the whole on-disk schema, written down here and nowhere else (store/files.py
opens, validates and writes it; store/parts.py and store/assemble.py write sets).

A store is a directory of HDF5 files, so that no file holding hours of computation is ever
rewritten in place (an HDF5 file killed mid-write is often unreadable):

    DIR/
      .locks/<kind>--<name>.lock  one writer per file (scores--<set>, masks--<mask>,
                                edits--<edit>, searches--<search>); <...>.json names the holder
      scores/<set>.h5           a finished score set
      scores/<set>.parts/       work in progress of an unfinished score set (resumable)
        manifest.json           the settings the work was started with
        stats-<n>.h5            wanda: squared-input sums after n samples
        accum-g<k>-<n>.h5       wandg: |grad| sums of layer group k after n samples
                                (actsvd: second-moment sums, float64)
        group-<k>.h5            wandg: finished scores of layer group k (actsvd: its C)
      masks/<mask>.h5           a pruning mask
      edits/<edit>.h5           a rank edit (ActSVD): what to subtract from each weight
      searches/<search>/        a `wandacli search` (search.py writes it)
        journal.log             Optuna's journal of the study: every trial, appended and
                                fsynced as it is asked and told (a killed search resumes)
        search.json             the request, the dense model's measures, every trial's
                                parameters and objectives, the Pareto front, the random control
        kl-dense-<key>.npz      the dense model's distributions for the KL cost (a cache)
        front.png, front.svg    refusal against KL: every trial, the front, dense and control
      results/<mask or model>/  eval-attack and eval-utility results (with --store and no --out)

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

Mean-activations set (`format="wandacli-mean-activations"`, `score --method mean-activations`),
in scores/<set>.h5 beside the score sets:
    /means                      float32 [layers + 1, K, d_model]: per residual stream
                                `hidden_states[l]` of the HF model (l = 0 the embeddings' output,
                                l = layers the last layer's output after the final norm), the mean
                                over the set's prompts of the activation at each of the last K
                                prompt positions (position k of K: k − K from the end; with the
                                chat template these are the assistant cue's tokens), summed in
                                float64, fletcher32
    root attributes: format, format_version, meta (JSON, as for score sets, plus positions = K,
                     hidden_size, the prompt template and the rule that built each prompt)

Mask file (`format="wandacli-mask"`):
    /<layer>/<module>           uint8 numpy.packbits(mask, axis=-1), True = pruned,
                                attribute shape = the weight's [out, in], fletcher32
    root attributes: format, format_version, meta (JSON)

Edit file (`format="wandacli-edit"`, `prune` of an edit kind: a rank edit from rank
statistics, a refusal direction from mean activations, the control of either):
    /<layer>/<module>/<basis>   float32 [out_features, r], orthonormal columns, one per role
                                the meta's `modules[key].ranks` names; the kind of the meta's
                                `mode` (removal/kinds/) says what they do: `remove` (V_r:
                                W ← W − V_r V_rᵀ W), `keep` (V_k: W ← V_k V_kᵀ W), or `safety`
                                and `utility` (V_s, V_u: W ← W − (I − V_u V_uᵀ) V_s V_sᵀ W),
                                fletcher32. Only the modules the edit changes are present.
    /direction                  `direction` edits (the refusal direction): r [d_model, 1], to
                                which every writer's `remove` is a hard link; meta `embedding`
                                true: the token embedding is orthogonalised too, E ← E − (E r) rᵀ
    root attributes: format, format_version, meta (JSON: mode, ranks and removed rank per
                     module, the rank-statistics sets and their fingerprints, command line)

Every file is written to a temporary name in its final directory, flushed, fsynced and renamed
into place (durable.py); readers only ever see finished files. Reading validates format and
version, refuses external links, external storage, virtual datasets and unknown filters before
any data is read, and turns checksum failures into errors that name the file, layer and module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from wandacli.core.errors import (
    StoreError,
)

FORMAT_VERSION = 1
SCORES_FORMAT = "wandacli-scores"
RANK_STATS_FORMAT = "wandacli-rank-statistics"
MEANS_FORMAT = "wandacli-mean-activations"
MEANS_DATASET = "means"
# Each prompt's streams beside the means (`score --per-prompt`): [prompts, L + 1, K, d_model].
PER_PROMPT_DATASET = "per_prompt"
DIRECTION_DATASET = "direction"  # a direction edit's r [d_model, 1]; each writer links to it
MASK_FORMAT = "wandacli-mask"
EDIT_FORMAT = "wandacli-edit"
PART_FORMAT = "wandacli-part"
PARTS_MANIFEST_FORMAT = "wandacli-parts"

SCORES_DIR = "scores"
MASKS_DIR = "masks"
EDITS_DIR = "edits"
SEARCHES_DIR = "searches"
# Optimised directions (--direction-optimise), kept so that a search, its kept points and a later
# `prune` train each once: <key>.npz, the key a digest of everything the training reads.
OPTIMISED_DIR = "directions"
SEARCH_SUMMARY = "search.json"
PARTS_SUFFIX = ".parts"
LOCKS_DIR = ".locks"  # one flock and holder note per file being written (store/lock.py)

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

    @property
    def searches_dir(self) -> Path:
        return self.root / SEARCHES_DIR

    def search_dir(self, name: str) -> Path:
        return self.searches_dir / check_name(name, "search")

    def optimised_direction_path(self, key: str) -> Path:
        return self.root / OPTIMISED_DIR / f"{key}.npz"

    def search_names(self) -> list[str]:
        if not self.searches_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.searches_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / SEARCH_SUMMARY).is_file()
        )


def split_key(key: str) -> tuple[int, str]:
    layer, module = key.split("/", 1)
    return int(layer), module


def describe_key(key: str) -> str:
    layer, module = split_key(key)
    return f"layer {layer} {module}"


# ---------------------------------------------------------------------------------------------
# Layout of datasets and names of formats


def chunk_rows(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of whole rows, about CHUNK_BYTES each."""
    rows, cols = shape
    per_chunk = max(1, min(rows, CHUNK_BYTES // max(1, cols * itemsize)))
    return (per_chunk, cols)


def _format_noun(fmt: str) -> str:
    return {
        SCORES_FORMAT: "score set",
        RANK_STATS_FORMAT: "rank-statistics set",
        MEANS_FORMAT: "mean-activations set",
        MASK_FORMAT: "mask",
        EDIT_FORMAT: "edit",
        PART_FORMAT: "part file",
    }.get(fmt, "file")
