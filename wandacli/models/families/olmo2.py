"""OLMo 2: no norm before a sublayer, one after it (post_attention_layernorm,
post_feedforward_layernorm), RMSNorm scaling by w."""

from wandacli.models.families.base import Family, NormAfter

FAMILY = Family(
    name="olmo2",
    model_types=("olmo2", "olmo3"),
    writers=("self_attn.o_proj", "mlp.down_proj"),
    norms_after={
        "self_attn.o_proj": NormAfter("post_attention_layernorm"),
        "mlp.down_proj": NormAfter("post_feedforward_layernorm"),
    },
)
