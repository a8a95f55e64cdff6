"""The family table (issue #28): per family users run, a tiny random model from transformers'
config class with norms and biases perturbed (tests/families.py), in float64:

- the share of the decoder's matrix weights wandacli scores, and the share the linear layers
  alone hold (what wandacli scored before experts and routers were matrices);
- the refusal direction's residual after the edit: max over decoder layers of
  max|h·r| edited ÷ max|h·r| dense, removed as the family declares (now) and from the
  writers' weights alone, r alone (before);

Reported, not targeted: the tests assert the residual ≤ 1e-5 and every weight scored.
"""

from __future__ import annotations

import sys

import torch

from bench.common import REPORT_ONLY, Row

VOCAB = 64


def _linear_share(model) -> float:
    from wandacli.models.layers import decoder_layers

    total = linear = 0
    for layer in decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                linear += module.weight.numel()
        total += sum(p.numel() for p in layer.parameters() if p.dim() >= 2)
    return linear / total


def _scored_share(model) -> float:
    from wandacli.models.layers import decoder_layers, iter_linear_layers

    total = sum(
        p.numel() for layer in decoder_layers(model) for p in layer.parameters() if p.dim() >= 2
    )
    scored = sum(a * b for a, b in (lin.shape for lin in iter_linear_layers(model)))
    return scored / total


def _residual(family: str, *, as_families_say: bool) -> float:
    """max over layers of |h·r| after the edit ÷ before. `as_families_say=False`: what
    wandacli did before families: r removed from the writers' weights alone, experts (no
    matrices then) untouched."""
    from tests.families import build_family_model
    from tests.test_families import remove_direction, stream_components

    model = build_family_model(family, VOCAB).double()
    generator = torch.Generator().manual_seed(3)
    r = torch.randn(model.config.hidden_size, generator=generator, dtype=torch.float64)
    r = r / r.norm()
    ids = torch.randint(3, VOCAB, (1, 12), generator=generator)
    dense = stream_components(model, r, ids)
    remove_direction(model, r, as_families_say=as_families_say, experts=as_families_say)
    edited = stream_components(model, r, ids)
    return max(a / b for a, b in zip(edited, dense, strict=True))


def run() -> list[Row]:
    from tests.families import FAMILIES, build_family_model
    from wandacli.models.families import family_of_model

    rows = []
    print(f"{'family':<12} {'wandacli family':<16} {'scored':>7} {'linear':>7} "
          f"{'residual now':>13} {'writers only':>13}")  # fmt: skip
    for family in FAMILIES:
        model = build_family_model(family, VOCAB)
        scored, linear = _scored_share(model), _linear_share(model)
        now = _residual(family, as_families_say=True)
        before = _residual(family, as_families_say=False)
        print(f"{family:<12} {family_of_model(model).name:<16} {scored:>7.1%} {linear:>7.1%} "
              f"{now:>13.1e} {before:>13.1e}")  # fmt: skip
        rows.append(
            Row(
                f"families: {family} direction residual",
                now,
                REPORT_ONLY,
                f"scored {scored:.1%} of matrix weights (linear layers alone {linear:.1%}); "
                f"writers' weights alone: {before:.1e}",
            )
        )
    return rows


if __name__ == "__main__":
    run()
    sys.exit(0)
