"""Which path this CPU takes for bfloat16 (issue #32): the time of a SmolLM2-sized matrix
product (125 × 576 by 576 × 1536, the organism's MLP on a batch of prompts) in bfloat16 over
float32, measured side by side, and what `--dtype auto` chooses here.

A CPU with AVX-512 BF16 or AMX multiplies bfloat16 natively (about 4× float32's speed on this
project's machines); an AVX2-only CPU takes a slow path (25× slower measured on an EPYC).
"""

from __future__ import annotations

import sys

import torch

from bench.common import REPORT_ONLY, Row, timed

REPEATS = 200


def _products(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(125, 576, generator=generator).to(dtype)
    b = torch.randn(576, 1536, generator=generator).to(dtype)
    for _ in range(REPEATS):
        a @ b


def run() -> list[Row]:
    from wandacli.models.sources import cpu_multiplies_bfloat16

    _products(torch.float32)  # warm-up
    _products(torch.bfloat16)
    float32 = bfloat16 = float("inf")
    for _ in range(3):  # interleaved, best of three
        float32 = min(float32, timed(lambda: _products(torch.float32)))
        bfloat16 = min(bfloat16, timed(lambda: _products(torch.bfloat16)))
    flops = 2 * 125 * 576 * 1536 * REPEATS
    native = cpu_multiplies_bfloat16()
    return [
        Row(
            "cpu: bfloat16 / float32 matmul time",
            bfloat16 / float32,
            REPORT_ONLY,
            f"{flops / bfloat16 / 1e9:.1f} GFLOP/s bfloat16 against {flops / float32 / 1e9:.1f} "
            f"float32; --dtype auto picks {'bfloat16' if native else 'float32'} here "
            f"({torch.backends.cpu.get_cpu_capability()})",
        )
    ]


if __name__ == "__main__":
    for row in run():
        print(f"{row.benchmark}: {row.ratio:.2f} ({row.detail})")
    sys.exit(0)
