"""GPT-2: Conv1D layers (weights stored [in, out]), writers attn.c_proj and mlp.c_proj with
biases."""

from wandacli.models.families.base import Family

FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    writers=("attn.c_proj", "mlp.c_proj"),
    layers_path="transformer.h",
)
