"""GPT-NeoX and Pythia: attention and MLP in parallel from the same stream, LayerNorms with
biases, and writers with biases (attention.dense, mlp.dense_4h_to_h): each bias adds to the
stream as the writer's output does."""

from wandacli.models.families.base import Family

FAMILY = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    writers=("attention.dense", "mlp.dense_4h_to_h"),
    what="parallel residual; writers with biases (projected with the weights)",
)
