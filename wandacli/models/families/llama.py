"""Llama and the decoders built like it (Mistral, Qwen2/2.5/3, Granite, SmolLM): pre-norm
layers whose attention output and MLP down projection add straight into the stream."""

from wandacli.models.families.base import Family

FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "granite", "smollm3"),
    writers=("self_attn.o_proj", "mlp.down_proj"),
)
