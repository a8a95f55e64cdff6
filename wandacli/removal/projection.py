"""The orthogonal projection for any ranks, from eigenbases computed once per module.

`prune` computes ΔW = (I − Π_u) Π_s W for one (r_s, r_u): V_s V_sᵀ W and V_u V_uᵀ (…), a cost
of ~8·d_out·d_in·r. At the reference's ranks (r close to the full rank) that is ~14 s per trial
on the demo's organism. Here each module's full safety and utility eigenbases B_s, B_u
(`ranks.output_eigenbasis`) and the weight's coordinates in them, P = Bᵀ W, are computed once.
Where the bases span W's columns (always when d_out ≤ d_in; checked otherwise) the projection
is written with the complements S_c = B_s[:, r_s:] and U_c = B_u[:, r_u:]:

    Π_s W = W − S_c P_s[r_s:]        (I − Π_u) X = U_c U_cᵀ X
    ΔW    = U_c (P_u[r_u:] − (U_cᵀ S_c) P_s[r_s:])

a cost of ~2·d_out·d_in·(d_out − r_u): the removed ranks, not the kept ones. Where the bases do
not span W (a rank-deficient weight or second moment) the direct formula is used. Bases and
coordinates are held in float32, the precision the edit file stores its bases in; ΔW is computed
in float32 (`prune`'s edit in float64): the weights agree within about 1e-6 of their scale.
"""

from __future__ import annotations

import torch

from wandacli.removal.ranks import output_eigenbasis, random_orthonormal, removed_directions

_SPAN_TOLERANCE = 1e-6


class ProjectionModule:
    """One module's bases for the orthogonal projection at any (r_s, r_u)."""

    def __init__(
        self, weight: torch.Tensor, safety_moment: torch.Tensor, utility_moment: torch.Tensor
    ) -> None:
        w64 = weight.detach().to(torch.float64)
        self.shape = tuple(w64.shape)
        self.full = min(self.shape)
        # float32 bases, as `prune` stores them; the coordinates from those rounded bases.
        self.safety = output_eigenbasis(w64, safety_moment).float()
        self.utility = output_eigenbasis(w64, utility_moment).float()
        self.safety_coordinates = (self.safety.double().T @ w64).float()
        self.utility_coordinates = (self.utility.double().T @ w64).float()
        self.spans = self._bases_span(w64)

    def _bases_span(self, w64: torch.Tensor) -> bool:
        """Whether W = B Bᵀ W for both bases and they span one subspace."""
        if self.shape[0] <= self.shape[1]:
            return True  # square orthogonal bases of the output space
        scale = float(torch.linalg.matrix_norm(w64)) or 1.0
        for basis, coordinates in (
            (self.safety, self.safety_coordinates),
            (self.utility, self.utility_coordinates),
        ):
            residual = w64 - basis.double() @ coordinates.double()
            if float(torch.linalg.matrix_norm(residual)) > _SPAN_TOLERANCE * 100 * scale:
                return False
        s, u = self.safety.double(), self.utility.double()
        outside = s - u @ (u.T @ s)
        return float(torch.linalg.matrix_norm(outside)) <= _SPAN_TOLERANCE * 100 * self.full**0.5

    def delta(self, safety_rank: int, utility_rank: int) -> torch.Tensor:
        """ΔW = (I − Π_u) Π_s W [d_out, d_in], float32."""
        if self.spans:
            s_rest = self.safety[:, safety_rank:]
            u_rest = self.utility[:, utility_rank:]
            inner = (
                self.utility_coordinates[utility_rank:]
                - (u_rest.T @ s_rest) @ (self.safety_coordinates[safety_rank:])
            )
            return u_rest @ inner
        v_s = self.safety[:, :safety_rank]
        v_u = self.utility[:, :utility_rank]
        safety_part = v_s @ self.safety_coordinates[:safety_rank]
        return safety_part - v_u @ (v_u.T @ safety_part)

    def removed_rank(self, safety_rank: int, utility_rank: int) -> int:
        """The rank of ΔW: of (I − Π_u) V_s, whose singular values are those of U_cᵀ V_s."""
        v_s = self.safety[:, :safety_rank].double()
        if self.spans:
            return removed_directions(self.utility[:, utility_rank:].double().T @ v_s)
        v_u = self.utility[:, :utility_rank].double()
        return removed_directions(v_s - v_u @ (v_u.T @ v_s))

    def random_delta(
        self, rank: int, generator: torch.Generator, weight: torch.Tensor
    ) -> torch.Tensor:
        """A control: Q Qᵀ W for Q a random orthonormal [d_out, rank] (Gaussian, then QR), the
        same rank removed in random directions."""
        if rank == 0:
            return torch.zeros(self.shape, dtype=torch.float32)
        q = random_orthonormal(self.shape[0], rank, generator)
        w64 = weight.detach().to(torch.float64).cpu()
        return (q @ (q.T @ w64)).float()
