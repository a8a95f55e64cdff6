"""The refusal direction as a weight edit (Arditi et al. 2024, "weight orthogonalisation").

From two mean-activations sets (harmful and harmless prompts, `score --method mean-activations`)
the direction at residual stream l and prompt position p is

    r = normalise(μ_harmful[l, p] − μ_harmless[l, p])

and removing it from every matrix that writes into the residual stream makes the stream carry no
component along r at any layer:

    writers (attention output, MLP down projection):   W ← W − r rᵀ W     (W is [d_model, d_in])
    the token embedding E [vocab, d_model]:            E ← E − (E r) rᵀ

Two things between a writer and the stream change what "orthogonal" means, and the edit
follows each writer's family declaration (models/families/), recording per writer what it did
(the edit's meta `writers`):

    a norm after the writer (Gemma-2/3, OLMo-2): the stream receives g ⊙ x / rms(x) (g the
        norm's scale, 1 + w for Gemma), whose dot product with r is (g ⊙ r)·x / rms(x); the
        writer is made orthogonal to u = normalise(g ⊙ r) instead of r, so that what reaches
        the stream has no component along r
    a bias on the writer (GPT-NeoX, GPT-2): it adds to the stream as the output does, so it is
        projected the same way, b ← b − α u uᵀ b

Edit files made before the record existed are applied as they were made: W − α r rᵀ W, biases
untouched.

(`--direction-scale α` removes a share of it instead: W ← W − α r rᵀ W, E ← E − α (E r) rᵀ, the
weight heretic's abliteration gives each layer, here one for all.)

The writers' change is a rank edit of rank 1 (the `remove` formula with V = r), so the edit is an
ordinary edit file; the embedding's is recorded beside it. Where the input and output embeddings
are one tensor (SmolLM2, Gemma, ...), orthogonalising E changes the output head as well: the
logits become h (E − E r rᵀ)ᵀ = h Eᵀ − (h·r)(E r)ᵀ, i.e. the head no longer reads the final
hidden state's component along r (after the final norm, which is not orthogonal to r). The
reference code's models untie nothing either; wandacli applies the same to a tied model and says
so in the edit's meta.
"""

from __future__ import annotations

import numpy as np
import torch

from wandacli.core.errors import ConfigError, StoreError
from wandacli.core.fingerprint import ModelFingerprint
from wandacli.models.families import family_named


def writer_keys(fingerprint: ModelFingerprint, hidden_size: int) -> list[str]:
    """The matrices that write into the residual stream, as the model's family declares them
    (models/families/; by name for a model of an undeclared family)."""
    return family_named(fingerprint.family).writer_keys(fingerprint.shapes, hidden_size)


def refusal_direction(
    harmful: np.ndarray, harmless: np.ndarray, layer: int, position: int
) -> torch.Tensor:
    """r̂ = normalise(μ_harmful[layer, position] − μ_harmless[layer, position]), float64 [d].
    `position` counts from the end (−1: the last prompt token), as the reference's do."""
    layers, positions, _ = harmful.shape
    if not 0 <= layer < layers:
        raise ConfigError(
            f"--direction-layer {layer} is outside the sets' residual streams 0..{layers - 1} "
            f"(0: the embeddings' output, {layers - 1}: the last layer's, after the final norm)"
        )
    if not -positions <= position <= -1:
        raise ConfigError(
            f"--direction-position {position} is outside the sets' last {positions} prompt "
            f"positions: use -{positions}..-1 (-1: the last prompt token)"
        )
    index = positions + position
    difference = torch.from_numpy(harmful[layer, index] - harmless[layer, index]).double()
    norm = float(difference.norm())
    if not np.isfinite(norm) or norm == 0.0:
        raise StoreError(
            f"the two sets' means are equal at layer {layer}, position {position}: no direction "
            "(were both scored on the same prompts?)"
        )
    return difference / norm


def projected_direction(direction: torch.Tensor, harmless_mean: np.ndarray) -> torch.Tensor:
    """r orthogonalised against the harmless mean m at its stream and position, made unit
    again: normalise(r − (r·m̂) m̂) (heretic's "projected" direction; removing it leaves the
    harmless prompts' mean stream as it was). float64, [d] for one direction; for several
    ([d, K]) each column projected, then orthonormalised again."""
    r = direction.to(torch.float64)
    m = torch.from_numpy(np.asarray(harmless_mean)).to(torch.float64).reshape(-1)
    if float(m.norm()) == 0.0:
        return r
    m = m / m.norm()
    columns = r.reshape(r.shape[0], -1)
    projected = columns - torch.outer(m, m @ columns)
    if float(projected.norm(dim=0).min()) == 0.0:
        raise StoreError(
            "the refusal direction lies along the harmless mean there: nothing is left after "
            "the projection; choose another --direction-layer, or drop --direction-projected"
        )
    return orthonormal(projected).reshape(r.shape)


def orthonormal(basis: torch.Tensor) -> torch.Tensor:
    """A basis [d] or [d, K] made orthonormal in float64 (as the file stores it, in float32, it
    is nearly so): one column normalised, several by QR with each column's sign kept."""
    b = basis.to(torch.float64)
    if b.dim() == 1 or b.shape[1] == 1:
        return b / b.norm()
    q, r = torch.linalg.qr(b)
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)


def principal_directions(
    harmful_prompts: np.ndarray, harmless_mean: np.ndarray, count: int, reference: torch.Tensor
) -> torch.Tensor:
    """The top `count` principal directions of the per-prompt differences h_i − μ_harmless at
    one stream and position (the right singular vectors of the uncentred [prompts, d] matrix,
    so that the first is near the mean difference r), orthonormal, each signed to agree with
    r; float64 [d, count]."""
    differences = torch.from_numpy(harmful_prompts - harmless_mean[None, :]).double()
    prompts, width = differences.shape
    if count > min(prompts, width):
        raise ConfigError(
            f"--directions {count}: the set has {prompts} prompts of width {width}, so at most "
            f"{min(prompts, width)} principal directions"
        )
    _, _, vh = torch.linalg.svd(differences, full_matrices=False)
    basis = vh[:count].T.contiguous()
    signs = torch.sign(reference.to(torch.float64).reshape(-1) @ basis)
    return basis * torch.where(signs == 0, 1.0, signs)


def biprojected_directions(
    direction: torch.Tensor, harmless_streams: np.ndarray, layers: set[int]
) -> dict[int, torch.Tensor]:
    """Per decoder layer i, r orthogonalised against the harmless mean of the stream its
    writers write into, hidden_states[i + 1] at the direction's position (the last layer's
    as the means record it, after the final norm): `projected_direction` at each target layer
    (the "biprojected" direction). `harmless_streams` is [L + 1, d]. float64, shaped as r."""
    return {i: projected_direction(direction, harmless_streams[i + 1]) for i in sorted(layers)}


def orthogonalised_embedding(
    embedding: torch.Tensor,
    direction: torch.Tensor,
    scale: float = 1.0,
    *,
    norm_preserving: bool = False,
) -> torch.Tensor:
    """E − α (E r) rᵀ in float64 on E's device: with α = 1 no token's embedding has a
    component along r; with α < 1 each keeps 1 − α of it. `norm_preserving`: each token's row
    rescaled to its norm before the edit (`with_norms_of`)."""
    e = embedding.detach().to(torch.float64)
    r = direction.to(device=e.device, dtype=torch.float64)
    r = r.reshape(r.shape[0], -1)  # [d, K] orthonormal: E − α (E R) Rᵀ
    edited = e - scale * ((e @ r) @ r.T)
    return with_norms_of(edited, e, dim=1) if norm_preserving else edited


def with_norms_of(edited: torch.Tensor, original: torch.Tensor, *, dim: int) -> torch.Tensor:
    """`edited` with each vector along `dim` rescaled to its norm in `original`, exactly, in
    float64: a writer [d_model, d_in] per column (dim 0: the d_model-sized vector one input
    feature writes), the embedding [vocab, d_model] per row (dim 1). Rescaling a vector keeps
    it orthogonal to whatever it was orthogonal to, so the edit still removes the direction,
    while every column keeps its magnitude (norm-preserving abliteration). A vector the edit
    left at zero (it lay along the direction) stays zero."""
    edited = edited.to(torch.float64)
    before = original.to(device=edited.device, dtype=torch.float64).norm(dim=dim, keepdim=True)
    after = edited.norm(dim=dim, keepdim=True)
    factor = torch.where(after > 0, before / after.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return edited * factor


def writer_direction(
    direction: torch.Tensor, norm_scale: torch.Tensor | None
) -> torch.Tensor | None:
    """The orthonormal basis a writer's output is made orthogonal to (float64 [d, K]): r's
    own, or, where a norm with scale g follows the writer, that of g ⊙ r (each column); None
    where g ⊙ r is zero (nothing of r can reach the stream through this writer)."""
    r = direction.to(torch.float64)
    r = r.reshape(r.shape[0], -1)
    if norm_scale is None:
        return orthonormal(r)
    scaled = norm_scale.detach().to(device=r.device, dtype=torch.float64).reshape(-1, 1) * r
    if float(scaled.norm()) == 0:
        return None
    return orthonormal(scaled)


def projected_bias(bias: torch.Tensor, direction: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """b − α U (Uᵀ b) in float64, U an orthonormal basis [d] or [d, K]."""
    b = bias.detach().to(torch.float64)
    u = direction.to(device=b.device, dtype=torch.float64)
    u = u.reshape(u.shape[0], -1)
    return b - scale * (u @ (u.T @ b))
