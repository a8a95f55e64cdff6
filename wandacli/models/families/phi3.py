"""Phi-3: Llama's layout with fused weights: self_attn.qkv_proj holds q, k and v ([q; k; v] by
rows: heads · head_dim, then kv_heads · head_dim twice) and mlp.gate_up_proj holds gate and up
(halves). Each part is a matrix of its own, named as Llama's unfused modules are."""

from typing import Any

from wandacli.models.families.base import Family, FusedMatrix


def _qkv_rows(config: Any) -> tuple[int, int, int]:
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return heads * head_dim, kv, kv


FAMILY = Family(
    name="phi3",
    model_types=("phi3",),
    writers=("self_attn.o_proj", "mlp.down_proj"),
    fused={
        "self_attn.qkv_proj": FusedMatrix(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), sizes=_qkv_rows
        ),
        "mlp.gate_up_proj": FusedMatrix(("mlp.gate_proj", "mlp.up_proj")),
    },
)
