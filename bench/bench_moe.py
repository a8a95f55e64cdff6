"""Scoring a mixture of experts (issue #28's cost targets) on a Mixtral-shaped random model
(8 experts, top 2, the intermediate 3.5 × the hidden size as Mixtral-8x7B's, 4 layers), 16
samples of 512 tokens, side by side in one run:

- wanda's statistics ÷ a bare forward pass                   target <= 1.3
  (every matrix's squared input norms; each expert's over the tokens routed to it, seen by
  models/experts.py's observing experts function instead of transformers' default kernel)
- wandg's |∇| sums ÷ a bare forward + backward               target <= 1.2
  (the same weight gradients; one accumulator per 3-D expert parameter)

The methods' per-sample work is timed without the store's write, which bench_score measures
for the whole command; the bare passes use the model's default experts implementation.
"""

from __future__ import annotations

import sys

import torch

from bench.common import Row, timed

SAMPLES = 16
TOKENS = 512


def _model():
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1792,  # 3.5 × hidden, as Mixtral-8x7B's 14336 / 4096
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def run() -> list[Row]:
    from wandacli.methods.wanda import ActivationStatistics
    from wandacli.methods.wandg import GradientAccumulator, sample_loss
    from wandacli.models.layers import iter_linear_layers

    model = _model()
    layers = list(iter_linear_layers(model))
    generator = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, 4096, (1, TOKENS), generator=generator) for _ in range(SAMPLES)]
    labels = [ids.clone() for ids in samples]

    def bare_forward() -> None:
        with torch.no_grad():
            for ids in samples:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def wanda() -> None:
        statistics = ActivationStatistics(layers)
        with statistics.recording():
            for ids in samples:
                statistics.observe(model, ids, None)

    parameters = list({lin.parameter_key: lin.weight for lin in layers}.values())

    def bare_backward() -> None:
        for weight in parameters:
            weight.requires_grad_(True)
        for ids, target in zip(samples, labels, strict=True):
            sample_loss(model, ids, target).backward()
            for weight in parameters:
                weight.grad = None
        for weight in parameters:
            weight.requires_grad_(False)

    def wandg() -> None:
        accumulator = GradientAccumulator(layers)
        with accumulator.recording():
            for ids, target in zip(samples, labels, strict=True):
                accumulator.observe(model, ids, target)

    bare_forward()  # warm-up
    forward = observed = backward = gradients = float("inf")
    for _ in range(3):  # interleaved, best of three: drift on a shared machine hits both
        forward = min(forward, timed(bare_forward))
        observed = min(observed, timed(wanda))
    for _ in range(3):
        backward = min(backward, timed(bare_backward))
        gradients = min(gradients, timed(wandg))
    experts = sum(1 for lin in layers if lin.is_expert)
    return [
        Row(
            "moe: wanda statistics / bare forward",
            observed / forward,
            "<= 1.3",
            f"{observed:.2f} s vs {forward:.2f} s, {SAMPLES}×{TOKENS} tokens, {experts} expert "
            "matrices",
        ),
        Row(
            "moe: wandg sums / bare forward+backward",
            gradients / backward,
            "<= 1.2",
            f"{gradients:.2f} s vs {backward:.2f} s",
        ),
    ]


if __name__ == "__main__":
    for row in run():
        print(f"{row.benchmark}: {row.ratio:.2f} (target {row.target}; {row.detail})")
    sys.exit(0)
