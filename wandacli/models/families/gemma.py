"""Gemma 1: Llama's layout with RMSNorm scaling by 1 + w and the embeddings scaled by √d (a
scalar: the direction edit of the embedding is unchanged by it)."""

from wandacli.models.families.base import Family

FAMILY = Family(
    name="gemma",
    model_types=("gemma",),
    writers=("self_attn.o_proj", "mlp.down_proj"),
)
