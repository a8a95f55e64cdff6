"""Qwen2-MoE and Qwen3-MoE: routed experts as 3-D parameters, a router (mlp.gate), and in
Qwen2-MoE a shared expert (an ordinary MLP) gated per token by mlp.shared_expert_gate [1, d]."""

from wandacli.models.families.base import Family

FAMILY = Family(
    name="qwen_moe",
    model_types=("qwen2_moe", "qwen3_moe"),
    writers=("self_attn.o_proj", "mlp.experts.*.down_proj", "mlp.shared_expert.down_proj"),
    routers=("mlp.gate", "mlp.shared_expert_gate"),
)
