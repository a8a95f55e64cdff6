"""The refusal direction as a weight edit (Arditi et al. 2024, "weight orthogonalisation").

From two mean-activations sets (harmful and harmless prompts, `score --method mean-activations`)
the direction at residual stream l and prompt position p is

    r = normalise(μ_harmful[l, p] − μ_harmless[l, p])

and removing it from every matrix that writes into the residual stream makes the stream carry no
component along r at any layer:

    writers (attention output, MLP down projection):   W ← W − r rᵀ W     (W is [d_model, d_in])
    the token embedding E [vocab, d_model]:            E ← E − (E r) rᵀ

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

import re

import numpy as np
import torch

from wandacli.core.errors import ConfigError, StoreError
from wandacli.core.fingerprint import ModelFingerprint

# The last part of the name of a module that writes into the residual stream, per architecture
# the loader knows: Llama/Mistral/Qwen/Gemma (o_proj, down_proj), GPT-2 (attn.c_proj,
# mlp.c_proj), GPT-NeoX (attention.dense, mlp.dense_4h_to_h), OPT/BART-like (out_proj, fc2),
# Phi (dense, fc2), T5-like (o, wo), Mixtral's experts (w2).
WRITER_NAMES = frozenset(
    {"o_proj", "down_proj", "c_proj", "dense", "dense_4h_to_h", "out_proj", "fc2", "wo", "w2"}
)
_LEAF = re.compile(r"[^.]+$")


def writer_keys(fingerprint: ModelFingerprint, hidden_size: int) -> list[str]:
    """The linear layers that write into the residual stream: a writer's name, and an output
    as wide as the stream (which rules out e.g. GPT-2's fused c_attn, or a 4h-wide `dense`)."""
    keys = []
    for key, (d_out, _) in fingerprint.shapes.items():
        match = _LEAF.search(key)
        if match and match.group(0) in WRITER_NAMES and d_out == hidden_size:
            keys.append(key)
    return keys


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


def orthogonalised_embedding(
    embedding: torch.Tensor, direction: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """E − α (E r) rᵀ in float64 on E's device: with α = 1 no token's embedding has a
    component along r; with α < 1 each keeps 1 − α of it."""
    e = embedding.detach().to(torch.float64)
    r = direction.to(device=e.device, dtype=torch.float64).reshape(-1, 1)
    return e - scale * ((e @ r) @ r.T)
