"""Gemma 2 and 3: a norm after each sublayer (post_attention_layernorm after the attention
output, post_feedforward_layernorm after the MLP), RMSNorm scaling by 1 + w. What reaches the
stream is (1 + w) ⊙ x / rms(x), so the writers are made orthogonal to normalise((1 + w) ⊙ r)."""

from wandacli.models.families.base import Family, NormAfter

FAMILY = Family(
    name="gemma2",
    model_types=("gemma2", "gemma3_text", "gemma3"),
    writers=("self_attn.o_proj", "mlp.down_proj"),
    norms_after={
        "self_attn.o_proj": NormAfter("post_attention_layernorm", offset=1.0),
        "mlp.down_proj": NormAfter("post_feedforward_layernorm", offset=1.0),
    },
)
