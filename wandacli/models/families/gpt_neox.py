"""GPT-NeoX and Pythia: attention and MLP in parallel from the same stream, LayerNorms with
biases, and writers with biases (attention.dense, mlp.dense_4h_to_h): each bias adds to the
stream as the writer's output does."""

from wandacli.models.families.base import Family, FusedMatrix

FAMILY = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    writers=("attention.dense", "mlp.dense_4h_to_h"),
    layers_path="gpt_neox.layers",
    # query_key_value [3 · heads · head_size, d] holds, head by head, that head's query, key
    # and value rows (its forward views the output as [..., heads, 3 · head_size]).
    fused={
        "attention.query_key_value": FusedMatrix(
            ("attention.query", "attention.key", "attention.value"), per_head=True
        )
    },
)
