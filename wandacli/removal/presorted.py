"""Which entries of a score matrix a mask selects: read and selected on each call (`prune`,
`DirectRanking`), or ranked once so that a mask for any fraction up to a bound is a slice, not
a sort (a search's trials, `PresortedScores`). Mask kinds select through either, so a trial's
mask is the mask `prune` writes for the same parameters by construction of this module.

A search builds a mask per trial from the same score sets with other fractions. Each matrix's
top entries (up to the largest fraction the search may ask for) are found once with the same
selection `prune` uses (`masks.select_extreme`) and put in order: decreasing score, ties by
lower index first. The first k of that order are then exactly the k entries `select_extreme`
picks, so a trial's mask has the bits `prune` would write for the same parameters, in O(k).

Memory: 4 bytes per ranked entry (int32 positions), i.e. the bound's share of the weights:
a search up to 20% of Llama-2-7B's 6.5 billion weights holds about 5 GB per score set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from wandacli.removal.masks import matrix_count, row_count, select_extreme, top_fraction


class PresortedMatrix:
    """One matrix's top entries in selection order: over the whole matrix (`order`, flat
    positions) or per row (`row_order`, column positions [out, K])."""

    def __init__(self, scores: np.ndarray, bound: float, *, per_row: bool) -> None:
        self.shape: tuple[int, int] = (int(scores.shape[0]), int(scores.shape[1]))
        self.per_row = per_row
        self.bound = bound
        self.order: np.ndarray
        if per_row:
            k = row_count(bound, self.shape)
            chosen = select_extreme(scores, k, highest=True)
            # Row-major, columns ascending within each row: every row has exactly k.
            cols = np.nonzero(chosen)[1].reshape(self.shape[0], k)
            values = np.take_along_axis(scores, cols, axis=1)
            # Stable sort on the negated scores: decreasing score, lower column first on ties.
            by_score = np.argsort(-values, axis=1, kind="stable")
            self.order = np.take_along_axis(cols, by_score, axis=1).astype(np.int32)
        else:
            flat = scores.reshape(-1)
            k = matrix_count(bound, self.shape)
            positions = np.flatnonzero(select_extreme(flat.reshape(1, -1), k, highest=True)[0])
            by_score = np.argsort(-flat[positions], kind="stable")
            self.order = positions[by_score].astype(np.int32)

    def count(self, fraction: float) -> int:
        """How many entries the top `fraction` holds (per row, or in the matrix)."""
        return (
            row_count(fraction, self.shape) if self.per_row else matrix_count(fraction, self.shape)
        )

    def top(self, fraction: float) -> np.ndarray:
        """The bool mask [out, in] of the top `fraction`, bit for bit `masks.top_fraction`."""
        if fraction > self.bound:
            raise ValueError(f"fraction {fraction} above the ranked bound {self.bound}")
        k = self.count(fraction)
        mask = np.zeros(self.shape, dtype=bool)
        if self.per_row:
            np.put_along_axis(mask, self.order[:, :k], True, axis=1)
        else:
            mask.reshape(-1)[self.order[:k]] = True
        return mask


class DirectMatrix:
    """One matrix's scores, selected when asked."""

    def __init__(self, scores: np.ndarray, *, per_row: bool) -> None:
        self.scores = scores
        self.per_row = per_row

    def top(self, fraction: float) -> np.ndarray:
        """The bool mask [out, in] of the top `fraction` (`masks.top_fraction`)."""
        return top_fraction(self.scores, fraction, per_row=self.per_row)


class DirectRanking:
    """A score set read matrix by matrix, each selection made when asked (`prune`)."""

    def __init__(self, read: Callable[[str], np.ndarray], *, per_row: bool) -> None:
        self.read = read
        self.per_row = per_row

    def matrix(self, key: str) -> DirectMatrix:
        return DirectMatrix(self.read(key), per_row=self.per_row)


class PresortedScores:
    """A score set's matrices ranked once (`read` gives a matrix's scores by module key)."""

    def __init__(
        self,
        keys: Iterable[str],
        read: Callable[[str], np.ndarray],
        bound: float,
        *,
        per_row: bool,
        on_matrix: Callable[[], None] | None = None,
    ) -> None:
        self.matrices: dict[str, PresortedMatrix] = {}
        for key in keys:
            self.matrices[key] = PresortedMatrix(read(key), bound, per_row=per_row)
            if on_matrix is not None:
                on_matrix()

    def matrix(self, key: str) -> PresortedMatrix:
        return self.matrices[key]
