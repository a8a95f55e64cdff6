"""Rank-level math (ActSVD): the top output directions from the inputs' second moment equal an
explicit SVD of the outputs, and every edit equals its formula computed here with explicit
projectors."""

from __future__ import annotations

import pytest
import torch

from wandacli.methods import actsvd
from wandacli.removal import ranks


def inputs_with_separated_spectrum(n: int, d_in: int, seed: int) -> torch.Tensor:
    """Rows whose covariance has well-separated eigenvalues (10, 9, ..., then small)."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator, dtype=torch.float64))
    scales = torch.cat(
        [torch.linspace(10, 4, min(d_in, 12)), torch.full((max(0, d_in - 12),), 0.05)]
    )
    scales = scales.to(torch.float64)[:d_in]
    return torch.randn(n, d_in, generator=generator, dtype=torch.float64) * scales @ basis.T


def explicit_top_directions(x: torch.Tensor, w: torch.Tensor, rank: int) -> torch.Tensor:
    """V_r from an SVD of the outputs A = X Wᵀ themselves."""
    _, _, vh = torch.linalg.svd(x @ w.T, full_matrices=False)
    return vh[:rank].T


@pytest.mark.parametrize(("d_out", "d_in"), [(6, 16), (16, 16), (40, 12)])
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_directions_from_the_second_moment_equal_the_svd_of_the_outputs(d_out, d_in, rank):
    x = inputs_with_separated_spectrum(200, d_in, seed=d_out)
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    second_moment = x.T @ x / x.shape[0]
    mine = ranks.top_output_directions(w, second_moment, rank)
    assert mine.shape == (d_out, rank)
    assert torch.allclose(mine.T @ mine, torch.eye(rank, dtype=torch.float64), atol=1e-10)
    expected = explicit_top_directions(x, w, rank)
    assert ranks.subspace_similarity(mine, expected) == pytest.approx(1.0, abs=1e-9)


def test_the_reference_randomised_svd_finds_the_same_subspace_when_the_spectrum_separates():
    x = inputs_with_separated_spectrum(300, 24, seed=3)
    w = torch.randn(20, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.manual_seed(0)
    _, _, v = torch.svd_lowrank((x @ w.T).float(), q=5, niter=20)
    mine = ranks.top_output_directions(w, x.T @ x / x.shape[0], 5)
    assert ranks.subspace_similarity(mine, v.double()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("d_in", [1, 5, 7, 13, 64])
def test_the_upper_block_accumulation_is_the_sum_of_outer_products(d_in):
    x = torch.randn(9, d_in, generator=torch.Generator().manual_seed(d_in))
    expected = sum(torch.outer(row, row).double() for row in x)
    accumulator = torch.zeros(d_in, d_in, dtype=torch.float64)
    actsvd.add_upper_second_moment(accumulator, x[:4])
    actsvd.add_upper_second_moment(accumulator, x[4:])
    assert torch.allclose(actsvd.symmetrize_upper(accumulator), expected, atol=1e-10)


class TestEdits:
    d_out, d_in = 10, 8

    def setup_method(self) -> None:
        generator = torch.Generator().manual_seed(5)
        self.w = torch.randn(self.d_out, self.d_in, generator=generator, dtype=torch.float64)
        self.v_s, _ = torch.linalg.qr(
            torch.randn(self.d_out, 4, generator=generator, dtype=torch.float64)
        )
        self.v_u, _ = torch.linalg.qr(
            torch.randn(self.d_out, 6, generator=generator, dtype=torch.float64)
        )
        self.eye = torch.eye(self.d_out, dtype=torch.float64)

    def test_remove_top_ranks(self):
        expected = (self.eye - self.v_s @ self.v_s.T) @ self.w
        assert torch.allclose(ranks.remove_top_ranks(self.w, self.v_s), expected, atol=1e-12)

    def test_keep_top_ranks(self):
        expected = self.v_s @ self.v_s.T @ self.w
        assert torch.allclose(ranks.keep_top_ranks(self.w, self.v_s), expected, atol=1e-12)

    def test_orthogonal_projection(self):
        p_s, p_u = self.v_s @ self.v_s.T, self.v_u @ self.v_u.T
        expected = self.w - (self.eye - p_u) @ p_s @ self.w
        delta = ranks.orthogonal_projection_delta(self.w, self.v_s, self.v_u)
        assert torch.allclose(self.w - delta, expected, atol=1e-12)
        assert int(torch.linalg.matrix_rank(delta)) <= self.v_s.shape[1]

    def test_subspace_similarity_bounds(self):
        assert ranks.subspace_similarity(self.v_s, self.v_s) == pytest.approx(1.0)
        orthogonal = self.eye[:, :2]
        other = self.eye[:, 2:5]
        assert ranks.subspace_similarity(orthogonal, other) == pytest.approx(0.0)
        assert ranks.subspace_similarity(self.eye[:, :2], self.eye[:, :5]) == pytest.approx(1.0)


def test_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match="outside"):
        ranks.top_output_directions(torch.ones(3, 4), torch.eye(4), 4)
