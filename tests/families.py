"""Tiny random models of every family users run, built from transformers' own config classes,
with every norm weight and bias perturbed as training would leave them: a freshly initialised
norm is uniform (all ones, or all zeros in Gemma's 1 + w convention) and hides any error that
ignores it."""

from __future__ import annotations

import torch

COMMON = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}
EXPERTS = {
    "num_local_experts": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 24,
    "norm_topk_prob": True,
}

# config class name → extra config values
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "gemma": ("GemmaConfig", {"tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", {"tie_word_embeddings": True}),
    "gemma3_text": ("Gemma3TextConfig", {"tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {}),
    "gpt_neox": ("GPTNeoXConfig", {"use_parallel_residual": True}),
    "mixtral": ("MixtralConfig", EXPERTS),
    "qwen2_moe": ("Qwen2MoeConfig", EXPERTS | {"shared_expert_intermediate_size": 40}),
    "qwen3_moe": ("Qwen3MoeConfig", EXPERTS),
}
FAMILIES = tuple(FAMILY_CONFIGS)
MIXTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
# Families with something between a writer and the stream, or writers the old rule missed.
NOT_PLAIN = ("gemma2", "gemma3_text", "olmo2", "gpt_neox", "mixtral", "qwen2_moe", "qwen3_moe")


def build_family_model(family: str, vocab_size: int, seed: int = 0, layers: int = 2):
    """A tiny random model of `family` with `layers` decoder layers, norms and biases
    perturbed, in eval mode."""
    import transformers

    class_name, extra = FAMILY_CONFIGS[family]
    values = COMMON | extra | {"num_hidden_layers": layers}
    config = getattr(transformers, class_name)(vocab_size=vocab_size, **values)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if family in MIXTURES:
        # The tests compute in float64, which torch's grouped matmul (transformers' default
        # experts kernel) does not take: the eager loop over experts, the reference anyway.
        model.set_experts_implementation("eager")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:  # every norm's weight (and bias), every bias
                noise = torch.randn(parameter.shape, generator=generator) * 0.3
                parameter.add_(noise.to(parameter.dtype))
    return model


def fused_like_phi3(llama, vocab_size: int):
    """A Phi-3 holding a Llama's weights: q, k, v stacked into qkv_proj and gate, up into
    gate_up_proj, everything else copied; it computes what the Llama computes."""
    import transformers

    config = transformers.Phi3Config(
        vocab_size=vocab_size,
        rms_norm_eps=llama.config.rms_norm_eps,
        **COMMON,
    )
    phi3 = transformers.AutoModelForCausalLM.from_config(config).eval()
    state = llama.state_dict()
    fused = {}
    for key, value in state.items():
        if ".self_attn.q_proj." in key:
            parts = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            fused[key.replace("q_proj", "qkv_proj")] = torch.cat(parts)
        elif ".mlp.gate_proj." in key:
            parts = [state[key.replace("gate_proj", p)] for p in ("gate_proj", "up_proj")]
            fused[key.replace("gate_proj", "gate_up_proj")] = torch.cat(parts)
        elif not any(f".{p}." in key for p in ("k_proj", "v_proj", "up_proj")):
            fused[key] = value
    phi3.load_state_dict(fused, strict=True)
    return phi3
