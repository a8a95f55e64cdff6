"""How much of a rank edit survives when it is applied to a bfloat16 model (#19, defect 8).

An edit is computed in float64 and rounded back into the model's dtype. On SmolLM2's real
weights (read in float32, rounded to bfloat16 as a CUDA user loads them) and the top output
directions of each weight (W Wᵀ's eigenvectors: ActSVD's W C Wᵀ with C = I), for removing the
top r ranks and for a small orthogonal projection (one direction of a random basis: the size
of a safety-minus-utility difference of a few ranks), it reports the relative error of the
change that lands in the weights, ||bf16(W - ΔW) - bf16(W) - (-ΔW)|| / ||ΔW||: 0 when the
whole edit survives, 1 when none of it does. Report only, no target."""

from __future__ import annotations

import torch

from bench.common import REPORT_ONLY, Row
from wandacli.config.settings import ModelSpec
from wandacli.models.loader import load_model

MODULES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
LAYERS = (0, 15, 29)


def _surviving_error(weight: torch.Tensor, delta: torch.Tensor) -> float:
    base = weight.to(torch.bfloat16)
    edited = (base.double() - delta).to(torch.bfloat16)
    landed = edited.double() - base.double()
    return float((landed + delta).norm() / delta.norm())


def run() -> list[Row]:
    loaded = load_model(ModelSpec(model="smollm2", device="cpu", dtype="float32"))
    by_key = {lin.key: lin for lin in loaded.linear_layers}
    generator = torch.Generator().manual_seed(0)
    errors: dict[str, list[float]] = {"top-1": [], "top-8": [], "small projection": []}
    for layer in LAYERS:
        for module in MODULES:
            w = by_key[f"{layer}/{module}"].weight_matrix().double()
            w16 = w.to(torch.bfloat16).double()  # the weights as the bfloat16 model holds them
            _, vectors = torch.linalg.eigh(w16 @ w16.T)
            for r, name in ((1, "top-1"), (8, "top-8")):
                v = vectors[:, -r:]
                errors[name].append(_surviving_error(w, v @ (v.T @ w16)))
            q, _ = torch.linalg.qr(
                torch.randn(w.shape[0], 1, generator=generator, dtype=torch.float64)
            )
            errors["small projection"].append(_surviving_error(w, q @ (q.T @ w16)))
    return [
        Row(
            f"bfloat16: relative error of a {name} edit as applied (mean over {len(v)} matrices)",
            sum(v) / len(v),
            REPORT_ONLY,
            f"mean {sum(v) / len(v):.4f}, max {max(v):.4f}",
        )
        for name, v in errors.items()
    ]
