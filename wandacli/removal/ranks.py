"""Rank-level attribution (the reference's ActSVD) as pure tensor functions.

For a linear layer with weight W [d_out, d_in] and the inputs X [N, d_in] of its counted
calibration tokens, the outputs are A = X Wᵀ [N, d_out]. ActSVD keeps or removes the top right
singular directions of A, V_r [d_out, r], with Π_r = V_r V_rᵀ:

    remove the top r ranks:    W ← (I − Π_r) W
    keep only the top k ranks: W ← Π_k W
    orthogonal projection:     W ← W − (I − Π_u) Π_s W   (Π_s on safety data, Π_u on utility)

Everything follows from the inputs' second moment C = (1/N) Σ x xᵀ [d_in, d_in], because
AᵀA = N · W C Wᵀ has the same eigenvectors as W C Wᵀ: a rank-statistics set stores C once per
distinct input, and any rank, any edit is computed from it and W without running the model.

The eigenvectors come from an exact symmetric eigendecomposition in float64 (`torch.linalg.eigh`),
not the reference's randomised `torch.svd_lowrank(q=r, niter=20)`: the same subspace wherever
the spectrum separates the top r directions, without sampling noise (docs/reference-differences.md, "deliberate
differences").
"""

from __future__ import annotations

import torch


def output_eigenbasis(weight: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """Every direction of the layer's outputs, [d_out, min(d_out, d_in)] in float64: the
    eigenvectors of W C Wᵀ (the right singular vectors of A = X Wᵀ) ordered by decreasing
    eigenvalue, so that the top r of any rank are its first r columns. One decomposition serves
    every rank: `prune` slices it once, `search` once per trial.

    When d_out > d_in (gate/up projections), W C Wᵀ has rank ≤ d_in: with C = L Lᵀ and
    B = W L, the eigenvectors of B Bᵀ are B u / σ for the eigenpairs (σ², u) of the d_in-sized
    BᵀB, so the smaller problem is solved and mapped back.

    A matrix no data reached (C = 0: an expert no counted token was routed to) has no output
    directions: [d_out, 0], and every rank edit leaves it as it is, where any basis of the
    zero matrix's eigenvectors would remove arbitrary directions.
    """
    w = weight.detach().to(torch.float64)
    c = second_moment.detach().to(device=w.device, dtype=torch.float64)
    d_out, d_in = w.shape
    if not bool(torch.any(c != 0)):
        return w.new_zeros((d_out, 0))
    if d_out <= d_in:
        m = w @ c @ w.T
        m = (m + m.T) / 2  # exactly symmetric: eigh reads one triangle
        _, vectors = torch.linalg.eigh(m)
        return vectors.flip(-1)
    c_values, c_vectors = torch.linalg.eigh((c + c.T) / 2)
    root = c_vectors * c_values.clamp_min(0).sqrt()  # L with C = L Lᵀ
    b = w @ root  # [d_out, d_in]
    small = b.T @ b
    values, vectors = torch.linalg.eigh((small + small.T) / 2)
    values, vectors = values.flip(-1), vectors.flip(-1)
    directions = b @ vectors / values.clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    # Re-orthonormalise: where σ is tiny, B u / σ loses orthogonality to rounding. Q's first r
    # columns span the first r directions, so every top r is still the top-r subspace.
    q, r = torch.linalg.qr(directions)
    return q * torch.sign(torch.diagonal(r)).reshape(1, -1)


def top_output_directions(
    weight: torch.Tensor, second_moment: torch.Tensor, rank: int
) -> torch.Tensor:
    """V_r [d_out, rank]: the top `rank` columns of `output_eigenbasis`, in float64."""
    d_out, d_in = weight.shape
    if not 0 <= rank <= min(d_out, d_in):
        raise ValueError(f"rank {rank} outside [0, {min(d_out, d_in)}]")
    if rank == 0:
        return weight.new_zeros((d_out, 0), dtype=torch.float64)
    return output_eigenbasis(weight, second_moment)[:, :rank]


def project(directions: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Π W = V (Vᵀ W) without forming the d_out × d_out projector."""
    return directions @ (directions.T @ weight)


def remove_top_ranks(weight: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """(I − Π_r) W."""
    w = weight.to(torch.float64)
    return w - project(directions, w)


def keep_top_ranks(weight: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Π_k W."""
    return project(directions, weight.to(torch.float64))


def orthogonal_projection_delta(
    weight: torch.Tensor, safety_directions: torch.Tensor, utility_directions: torch.Tensor
) -> torch.Tensor:
    """ΔW = (I − Π_u) Π_s W: the safety ranks outside the utility subspace (rank ≤ r_s). The
    edited weight is W − ΔW."""
    safety_part = project(safety_directions, weight.to(torch.float64))
    return safety_part - project(utility_directions, safety_part)


def subspace_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """φ = ‖V_aᵀ V_b‖_F² / min(r_a, r_b): 1 when one subspace contains the other, r/d for
    random ones. Both bases orthonormal, [d, r_a] and [d, r_b]."""
    smaller = min(a.shape[1], b.shape[1])
    if smaller == 0:
        return float("nan")
    overlap = a.to(torch.float64).T @ b.to(torch.float64)
    return float((overlap * overlap).sum() / smaller)


def in_float64(
    weight: torch.Tensor, bases: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A weight and its edit's bases in float64 on the weight's device, where every edit is
    computed."""
    w = weight.to(torch.float64)
    return w, {role: b.to(device=w.device, dtype=torch.float64) for role, b in bases.items()}


def random_orthonormal(rows: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthonormal basis [rows, rank] in float64: a Gaussian matrix, then QR. The
    random controls of rank edits (`search`'s and `prune --match-ranks`) draw it the same way,
    module by module in the store's order, so one seed gives both the same directions."""
    gaussian = torch.randn((rows, rank), generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)
    return q


# The sines of the principal angles between the safety subspace and the utility subspace
# count as removed directions above this. They lie in [0, 1] whatever the weights' scale, so the
# tolerance is absolute: a relative one (numpy's matrix_rank rule) counted rounding noise as
# rank whenever the largest sine was small, and float32 bases carry noise near 1e-7 (a
# direction removed by less than 1e-6 of W changes no float32 weight measurably).
REMOVED_DIRECTION_TOLERANCE = 1e-6


def removed_directions(residual: torch.Tensor) -> int:
    """The rank of the orthogonal projection's change, from `residual` = (I − Π_u) V_s or its
    coordinates U_cᵀ V_s in the utility complement: the number of its singular values (the sines
    of the principal angles) above REMOVED_DIRECTION_TOLERANCE. `prune` and `search` both
    count with this, so the fraction a search reports is the fraction its kept edit records."""
    if residual.numel() == 0:
        return 0
    values = torch.linalg.svdvals(residual.to(torch.float64))
    return int((values > REMOVED_DIRECTION_TOLERANCE).sum())
