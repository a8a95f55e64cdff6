"""Masks from scores, as pure array functions, and their bit-packed storage form.

A mask is a bool array shaped like the weight, [out_features, in_features]; True = pruned.
Selections run on numpy arrays with introselect (`np.partition`, O(n)) instead of a full sort,
and break ties the way a stable sort does: among equal scores the lower index is chosen first,
on every run. (`torch.topk`, which the reference uses for N:M and the set difference, leaves
the order of ties unspecified.) numpy rather than torch keeps `prune` free of torch's ~270 MB
of memory; only `--variant`, which must repeat the reference's torch arithmetic, imports it.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from wandacli.core import reference

TIE_RULE = "among equal scores the lower index is selected first (as a stable sort orders them)"


# ---------------------------------------------------------------------------------------------
# Selection


def select_extreme(values: np.ndarray, k: int, *, highest: bool) -> np.ndarray:
    """Boolean mask of the k lowest (or highest) entries along the last axis, ties broken by
    lower index first; every leading index (row, group) selects its own k."""
    n = values.shape[-1]
    if k <= 0:
        return np.zeros(values.shape, dtype=bool)
    if k >= n:
        return np.ones(values.shape, dtype=bool)
    pivot = n - k if highest else k - 1
    kth = np.partition(values, pivot, axis=-1)[..., pivot : pivot + 1]
    beyond = values > kth if highest else values < kth
    equal = values == kth
    need = k - beyond.sum(axis=-1, keepdims=True)
    # Among the entries equal to the k-th value, take the first `need` of each row by index.
    flat_equal = equal.reshape(-1, n)
    rows, cols = np.nonzero(flat_equal)  # row-major: columns ascend within each row
    first_of_row = np.searchsorted(rows, rows, side="left")
    rank_in_row = np.arange(rows.size) - first_of_row
    take = rank_in_row < need.reshape(-1)[rows]
    mask = beyond.reshape(-1, n)
    mask[rows[take], cols[take]] = True
    return mask.reshape(values.shape)


def row_mask(
    scores: np.ndarray, sparsity_ratio: float, *, prune_highest: bool = False
) -> np.ndarray:
    """Per-row unstructured: each row prunes its int(in_features × ratio) lowest (or highest)
    scores, as the reference's stable per-row sort does."""
    return select_extreme(scores, row_count(sparsity_ratio, scores.shape), highest=prune_highest)


def matrix_mask(
    scores: np.ndarray, sparsity_ratio: float, *, prune_highest: bool = False
) -> np.ndarray:
    """All weights of the matrix ranked together: int(numel × ratio) lowest (or highest)."""
    return count_mask(scores, int(scores.size * sparsity_ratio), prune_highest=prune_highest)


def count_mask(scores: np.ndarray, count: int, *, prune_highest: bool = False) -> np.ndarray:
    """All weights of the matrix ranked together: exactly `count` lowest (or highest)."""
    return select_extreme(scores.reshape(1, -1), count, highest=prune_highest).reshape(scores.shape)


def nm_mask(scores: np.ndarray, n: int, m: int, *, prune_highest: bool = False) -> np.ndarray:
    """N:M structured: in every group of M consecutive inputs of a row, the N lowest (or
    highest) scores."""
    out_features, in_features = scores.shape
    groups = scores.reshape(out_features, in_features // m, m)
    return select_extreme(groups, n, highest=prune_highest).reshape(scores.shape)


def top_fraction(scores: np.ndarray, fraction: float, *, per_row: bool = False) -> np.ndarray:
    """The top `fraction` of scores, largest first: int(fraction · numel) over the flattened
    matrix (the set difference's rule), or int(fraction · in_features) per row."""
    if per_row:
        return select_extreme(scores, row_count(fraction, scores.shape), highest=True)
    k = matrix_count(fraction, scores.shape)
    return select_extreme(scores.reshape(1, -1), k, highest=True).reshape(scores.shape)


def matrix_count(fraction: float, shape: tuple[int, ...]) -> int:
    """How many weights the top `fraction` of a matrix holds: the reference computes
    int(p * in_features * out_features), left to right (the rounding matters at the edges)."""
    return int(fraction * shape[1] * shape[0])


def row_count(fraction: float, shape: tuple[int, ...]) -> int:
    """How many weights of each row the per-row rule selects: int(in_features × fraction)."""
    return int(shape[1] * fraction)


def set_difference_mask(safety: np.ndarray, utility: np.ndarray, p: float, q: float) -> np.ndarray:
    """Weights in the top q fraction of the safety scores that are not in the top p fraction of
    the utility scores, per matrix (the reference's `wandg_set_difference`)."""
    return top_fraction(safety, q) & ~top_fraction(utility, p)


def variant_mask(
    scores: np.ndarray,
    sparsity_ratio: float,
    *,
    prune_highest: bool = False,
    alpha_start: float = reference.VARIANT_ALPHA_START,
    alpha_bracket: tuple[float, float] = reference.VARIANT_ALPHA_BRACKET,
    sparsity_tolerance: float = reference.VARIANT_SPARSITY_TOLERANCE,
    bracket_tolerance: float = reference.VARIANT_BRACKET_TOLERANCE,
) -> np.ndarray:
    """The Wanda variant (the reference's `--use_variant`): per row, prune every score at or
    below the largest sorted score whose cumulative sum is within alpha × the row's sum; alpha
    found by the reference's bisection until the matrix's sparsity is within
    `sparsity_tolerance` of the target or the bracket is narrower than `bracket_tolerance`.

    Computed with torch, as the reference, so cumulative sums round the same way. Differs in
    one edge: a row where no score fits under alpha × sum prunes nothing, where the reference
    indexes position -1 (an error on CPU, the row's largest score on some devices).
    """
    import torch

    metric = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
    if prune_highest:
        metric = -metric
    sorted_values, _ = torch.sort(metric, dim=-1, stable=True)
    cumulative = torch.cumsum(sorted_values, dim=1)
    row_sums = metric.sum(dim=1)

    def mask_for(alpha: float) -> tuple[torch.Tensor, float]:
        fits = cumulative <= (row_sums * alpha).reshape(-1, 1)
        count = fits.sum(dim=1, keepdim=True)
        thresholds = torch.gather(sorted_values, 1, (count - 1).clamp(min=0))
        thresholds = torch.where(count > 0, thresholds, torch.full_like(thresholds, -torch.inf))
        mask = metric <= thresholds
        return mask, float(mask.sum()) / mask.numel()

    alpha = alpha_start
    low, high = alpha_bracket
    mask, sparsity = mask_for(alpha)
    while abs(sparsity - sparsity_ratio) > sparsity_tolerance and high - low >= bracket_tolerance:
        if sparsity > sparsity_ratio:
            alpha, high = (alpha + low) / 2.0, alpha
        else:
            alpha, low = (alpha + high) / 2.0, alpha
        mask, sparsity = mask_for(alpha)
    return mask.numpy()


# ---------------------------------------------------------------------------------------------
# Applying masks to a model (torch, imported only here)


def apply_mask(lin: Any, mask: np.ndarray, base: Any | None = None) -> None:
    """Zero the masked weights of one linear layer in place, or copy the base model's weights
    into them (`--recover-from-base`)."""
    import torch

    weight = lin.weight_matrix()
    selector = torch.from_numpy(mask).to(weight.device)
    if base is None:
        lin.set_entries(selector, 0.0)
    else:
        lin.set_entries(selector, base.weight_matrix().to(weight.device, weight.dtype)[selector])


def zero_fraction(loaded: Any) -> float:
    """The reference's sparsity check: exact zeros over all decoder weight matrices (each
    expert's matrices included)."""
    zeros = total = 0
    for lin in loaded.linear_layers:
        weight = lin.weight_matrix()
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total if total else 0.0


def apply_mask_file(loaded: Any, mask: Any) -> None:
    """Apply a stored mask (a MaskFile) to a loaded model in memory, one layer at a time,
    after checking it was made for this model."""
    mask.check_model(loaded.fingerprint, loaded.model_id)
    for lin in loaded.linear_layers:
        apply_mask(lin, mask.read(lin.key))


def parse_layers(spec: str, num_layers: int) -> set[int]:
    """'0-3,10' → {0, 1, 2, 3, 10}; ValueError names what is wrong."""
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"--layers {spec!r}: {part!r} is not a layer index or range like 0-3")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        if last < first:
            raise ValueError(f"--layers {spec!r}: range {part} runs backwards")
        if last >= num_layers:
            raise ValueError(
                f"--layers {spec!r}: layer {last} does not exist (the model has {num_layers}: 0-{num_layers - 1})"
            )
        chosen.update(range(first, last + 1))
    return chosen
