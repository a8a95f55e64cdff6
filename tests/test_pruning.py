"""Mask construction against independent computations (stable sorts, explicit set arithmetic,
the reference's variant verbatim), on random arrays with ties and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wandacli.config.settings import parse_nm
from wandacli.removal import masks as pruning
from wandacli.store.files import pack_mask, unpack_mask


def scores_with_ties(rng: np.random.Generator, shape, levels: int = 7) -> np.ndarray:
    """Few distinct values, so ties are everywhere."""
    return rng.integers(0, levels, size=shape).astype(np.float32) / levels


def stable_lowest(values: np.ndarray, k: int) -> np.ndarray:
    """Reference rule: the first k indices of a stable ascending sort, per row."""
    order = torch.sort(torch.from_numpy(values), dim=-1, stable=True).indices[..., :k]
    mask = torch.zeros(values.shape, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.numpy()


def largest_first(values: np.ndarray, k: int) -> set[int]:
    """Flat indices of the k largest, ties by lower index first, by plain Python sorting."""
    flat = values.ravel().tolist()
    return set(sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k])


class TestRowMask:
    @pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.73, 0.99])
    def test_equals_a_stable_sort(self, ratio):
        rng = np.random.default_rng(0)
        scores = scores_with_ties(rng, (17, 29))
        expected = stable_lowest(scores, int(29 * ratio))
        np.testing.assert_array_equal(pruning.row_mask(scores, ratio), expected)

    def test_prune_highest_equals_sorting_negated_scores(self):
        rng = np.random.default_rng(1)
        scores = scores_with_ties(rng, (9, 40))
        expected = stable_lowest(-scores, 12)
        mask = pruning.row_mask(scores, 12 / 40, prune_highest=True)
        np.testing.assert_array_equal(mask, expected)
        assert not np.array_equal(mask, pruning.row_mask(scores, 12 / 40))

    def test_continuous_scores_and_exact_counts(self):
        rng = np.random.default_rng(2)
        scores = rng.random((64, 576), dtype=np.float32)
        mask = pruning.row_mask(scores, 0.5)
        assert (mask.sum(axis=1) == 288).all()
        for row in range(64):
            assert scores[row][mask[row]].max() <= scores[row][~mask[row]].min()

    def test_tiny_matrices(self):
        assert pruning.row_mask(np.array([[3.0]], np.float32), 0.5).tolist() == [[False]]
        assert pruning.row_mask(np.array([[2.0, 1.0]], np.float32), 0.5).tolist() == [[False, True]]
        assert pruning.row_mask(np.array([[1.0, 1.0, 1.0]], np.float32), 0.67).tolist() == [
            [True, True, False]
        ]


class TestMatrixMask:
    def test_equals_a_flat_stable_sort(self):
        rng = np.random.default_rng(3)
        scores = scores_with_ties(rng, (13, 21))
        k = int(scores.size * 0.3)
        expected = stable_lowest(scores.reshape(1, -1), k).reshape(scores.shape)
        np.testing.assert_array_equal(pruning.matrix_mask(scores, 0.3), expected)
        assert pruning.matrix_mask(scores, 0.3).sum() == k


class TestNMMask:
    @pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 3)])
    def test_exactly_n_per_group_lowest_first(self, n, m):
        rng = np.random.default_rng(4)
        scores = scores_with_ties(rng, (6, m * 5), levels=3)
        mask = pruning.nm_mask(scores, n, m)
        groups = mask.reshape(6, 5, m)
        assert (groups.sum(axis=-1) == n).all()
        for row in range(6):
            for group in range(5):
                values = scores[row, group * m : (group + 1) * m]
                chosen = sorted(range(m), key=lambda i: (values[i], i))[:n]
                assert set(np.flatnonzero(groups[row, group])) == set(chosen)

    def test_highest(self):
        scores = np.array([[1, 4, 3, 2, 5, 5, 0, 9]], np.float32)
        assert pruning.nm_mask(scores, 2, 4, prune_highest=True).tolist() == [
            [False, True, True, False, True, True, False, False][:4] + [True, False, False, True]
        ]


class TestSetDifference:
    @pytest.mark.parametrize(("p", "q"), [(0.1, 0.1), (0.05, 0.2), (1.0, 0.5), (0.3, 1.0)])
    def test_equals_explicit_set_arithmetic(self, p, q):
        rng = np.random.default_rng(5)
        safety = scores_with_ties(rng, (11, 19), levels=5)
        utility = scores_with_ties(rng, (11, 19), levels=5)
        numel = safety.size
        top_q = largest_first(safety, int(q * 19 * 11))
        top_p = largest_first(utility, int(p * 19 * 11))
        expected = np.zeros(numel, dtype=bool)
        expected[sorted(top_q - top_p)] = True
        mask = pruning.set_difference_mask(safety, utility, p, q)
        np.testing.assert_array_equal(mask.ravel(), expected)

    def test_identical_sets_prune_nothing_when_p_covers_q(self):
        scores = np.random.default_rng(6).random((8, 8), dtype=np.float32)
        assert not pruning.set_difference_mask(scores, scores, 0.5, 0.5).any()


def reference_variant(metric: torch.Tensor, ratio: float) -> torch.Tensor:
    """The reference's return_given_alpha loop, verbatim in behaviour."""
    sort_res = torch.sort(metric, dim=-1, stable=True)
    tmp_metric = torch.cumsum(sort_res[0], dim=1)
    sum_before = metric.sum(dim=1)

    def given_alpha(alpha):
        thres_cumsum = sum_before * alpha
        sort_mask = tmp_metric <= thres_cumsum.reshape((-1, 1))
        thres = torch.gather(sort_res[0], dim=1, index=sort_mask.sum(dim=1, keepdims=True) - 1)
        mask = metric <= thres
        return mask, (mask == True).sum() / mask.numel()  # noqa: E712

    alpha, hist = 0.4, [0.0, 0.8]
    mask, sparsity = given_alpha(alpha)
    while torch.abs(sparsity - ratio) > 0.001 and hist[1] - hist[0] >= 0.001:
        if sparsity > ratio:
            alpha_new = (alpha + hist[0]) / 2.0
            hist[1] = alpha
        else:
            alpha_new = (alpha + hist[1]) / 2.0
            hist[0] = alpha
        alpha = alpha_new
        mask, sparsity = given_alpha(alpha)
    return mask


class TestVariant:
    @pytest.mark.parametrize("ratio", [0.2, 0.5])
    def test_matches_the_reference_bisection(self, ratio):
        scores = np.random.default_rng(7).random((32, 64), dtype=np.float32) + 0.01
        expected = reference_variant(torch.from_numpy(scores), ratio).numpy()
        mask = pruning.variant_mask(scores, ratio)
        np.testing.assert_array_equal(mask, expected)
        assert abs(mask.mean() - ratio) < 0.02


class TestPacking:
    @pytest.mark.parametrize("in_features", [1, 7, 8, 13, 64, 11008])
    def test_round_trip(self, in_features):
        mask = np.random.default_rng(in_features).random((5, in_features)) < 0.3
        packed = pack_mask(mask)
        assert packed.dtype == np.uint8 and packed.shape == (5, (in_features + 7) // 8)
        np.testing.assert_array_equal(unpack_mask(packed, mask.shape), mask)


class TestParsing:
    def test_nm(self):
        assert parse_nm("2:4") == (2, 4)
        assert parse_nm("unstructured") is None
        for bad in ("4:4", "5:4", "0:4", "2-4", "x"):
            with pytest.raises(ValueError):
                parse_nm(bad)

    def test_layers(self):
        assert pruning.parse_layers("0-3,10", 32) == {0, 1, 2, 3, 10}
        for bad in ("3-1", "40", "a", "1,,2"):
            with pytest.raises(ValueError):
                pruning.parse_layers(bad, 32)


# Property-based: random shapes, ratios, N:M patterns and p/q.
shapes = st.tuples(st.integers(1, 9), st.integers(1, 40))


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    ratio=st.floats(0, 0.999),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    highest=st.booleans(),
)
def test_row_masks_have_exact_counts_and_respect_the_order(shape, ratio, levels, seed, highest):
    scores = scores_with_ties(np.random.default_rng(seed), shape, levels)
    mask = pruning.row_mask(scores, ratio, prune_highest=highest)
    k = int(shape[1] * ratio)
    assert (mask.sum(axis=1) == k).all()
    signed = -scores if highest else scores
    for row in range(shape[0]):
        if 0 < k < shape[1]:
            assert signed[row][mask[row]].max() <= signed[row][~mask[row]].min()
    np.testing.assert_array_equal(
        mask, pruning.row_mask(scores, ratio, prune_highest=highest)
    )  # deterministic
    np.testing.assert_array_equal(mask, stable_lowest(signed, k))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 6),
    nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (3, 5)]),
    seed=st.integers(0, 2**16),
)
def test_nm_masks_have_n_per_group(rows, groups, nm, seed):
    n, m = nm
    scores = scores_with_ties(np.random.default_rng(seed), (rows, groups * m), 3)
    mask = pruning.nm_mask(scores, n, m)
    assert (mask.reshape(rows, groups, m).sum(-1) == n).all()


@settings(max_examples=40, deadline=None)
@given(shape=shapes, p=st.floats(0.01, 1), q=st.floats(0.01, 1), seed=st.integers(0, 2**16))
def test_set_difference_is_top_q_minus_top_p(shape, p, q, seed):
    rng = np.random.default_rng(seed)
    safety, utility = scores_with_ties(rng, shape, 4), scores_with_ties(rng, shape, 4)
    mask = pruning.set_difference_mask(safety, utility, p, q)
    top_q = pruning.top_fraction(safety, q)
    top_p = pruning.top_fraction(utility, p)
    assert top_q.sum() == int(q * shape[1] * shape[0])
    np.testing.assert_array_equal(mask, top_q & ~top_p)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 4),
    in_features=st.sampled_from([1, 3, 8, 13, 100, 11008]),
    seed=st.integers(0, 99),
)
def test_packing_is_lossless(rows, in_features, seed):
    mask = np.random.default_rng(seed).random((rows, in_features)) < 0.5
    np.testing.assert_array_equal(unpack_mask(pack_mask(mask), mask.shape), mask)
