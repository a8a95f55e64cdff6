"""Mixtral: routed experts as 3-D parameters (transformers 5: mlp.experts.gate_up_proj
[E, 2I, d], mlp.experts.down_proj [E, d, I]) and a router (mlp.gate, [E, d]). Each expert's
down projection writes into the stream, weighted by its routing weight."""

from wandacli.models.families.base import Family

FAMILY = Family(
    name="mixtral",
    model_types=("mixtral", "minimax"),
    writers=("self_attn.o_proj", "mlp.experts.*.down_proj"),
    routers=("mlp.gate",),
)
