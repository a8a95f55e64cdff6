"""What one model family's architecture means for wandacli, declared once per family.

A family module (one per family, registered in `models/families/__init__.py`) says:

    writers       the matrices whose output joins the residual stream (a refusal direction is
                  removed from them), as patterns over a matrix's name in its decoder layer
    norms_after   a norm applied to a writer's output before it joins the stream (Gemma-2/3,
                  OLMo-2), with its weight convention (Gemma's RMSNorm scales by 1 + w)
    routers       the matrices that route tokens to experts: scored, left out of masks unless
                  asked (pruning a router row changes which experts a token reaches)
    fused         a weight holding several matrices (Phi-3's qkv_proj and gate_up_proj,
                  GPT-NeoX's query_key_value): scored, masked and edited per part, named as the
                  parts' own modules would be, so that a fused model gets what the same weights
                  unfused would get
    experts       how a 3-D expert parameter (transformers 5: [E, out, in]) splits into one
                  matrix per expert, and what each reads (the routed hidden states, or its
                  expert's intermediate activation)

Every command asks the family of the model it runs on (or the one a stored set records) and
never a family's name; a model of a family nobody declared gets `generic`, the rule wandacli
used before families existed (a writer is a module called o_proj, down_proj, dense, ... whose
output is as wide as the stream).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

# Where a per-expert matrix reads from, in the experts' forward pass.
READS_HIDDEN = "hidden"  # the hidden states routed to the expert (gate and up projections)
READS_INTERMEDIATE = "intermediate"  # the expert's activation (the down projection)


@dataclass(frozen=True)
class NormAfter:
    """A norm between a writer and the residual stream: the stream receives
    (offset + weight) ⊙ x / rms(x), x the writer's output."""

    norm: str  # the norm's module name within the decoder layer
    offset: float = 0.0  # Gemma's RMSNorm scales by 1 + weight; most by weight itself


@dataclass(frozen=True)
class ExpertParameter:
    """One 3-D expert parameter ([E, out, in], or [E, in, out] where the experts module says
    `is_transposed`) and the matrices each expert's slice holds, in row order: gate_up_proj
    holds gate_proj then up_proj (or interleaved row by row where the module says it is not
    `is_concatenated`)."""

    parameter: str
    parts: tuple[str, ...]
    reads: str  # READS_HIDDEN or READS_INTERMEDIATE


# transformers 5's experts modules (Mixtral, Qwen2-MoE, Qwen3-MoE, ...): gate and up fused.
GATED_EXPERTS = (
    ExpertParameter("gate_up_proj", ("gate_proj", "up_proj"), READS_HIDDEN),
    ExpertParameter("up_proj", ("up_proj",), READS_HIDDEN),  # experts without a gate
    ExpertParameter("down_proj", ("down_proj",), READS_INTERMEDIATE),
)

# Where decoder layers live in common architectures, tried in order after the family's own
# path (wrappers and undeclared families); models/layers.py then falls back to a search for a
# ModuleList as long as the config's layer count.
GENERIC_LAYER_PATHS = (
    "model.layers",  # Llama-like decoders
    "model.language_model.layers",  # multimodal wrappers around a Llama-style decoder
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.layers",
)

# The leaf names of residual writers across the architectures wandacli has met, for models of
# an undeclared family: Llama-like (o_proj, down_proj), GPT-2 (c_proj), GPT-NeoX (dense,
# dense_4h_to_h), OPT (out_proj, fc2), T5-like (o, wo), Mixtral in transformers 4 (w2).
GENERIC_WRITER_LEAVES = (
    "o_proj",
    "down_proj",
    "c_proj",
    "dense",
    "dense_4h_to_h",
    "out_proj",
    "fc2",
    "wo",
    "w2",
)


# A part of a fused weight: its name, and its rows as a slice (start, stop, step) or an index.
PartRows = tuple[str, tuple[int, int, int] | None, tuple[int, ...] | None]


@dataclass(frozen=True)
class FusedMatrix:
    """A weight holding several matrices, by rows: `parts` (their names in the decoder
    layer) in order, each `sizes(config)` rows (equal shares where None), or, `per_head`,
    interleaved head by head (GPT-NeoX: [q_h; k_h; v_h] for each head h)."""

    parts: tuple[str, ...]
    sizes: Callable[[Any], tuple[int, ...]] | None = None
    per_head: bool = False

    def part_rows(self, out_features: int, config: Any) -> list[PartRows]:
        """Per part: its name, and its rows as a slice (start, stop, step) or an index."""
        count = len(self.parts)
        if self.per_head:
            heads = int(config.num_attention_heads)
            size = out_features // (heads * count)
            return [
                (
                    name,
                    None,
                    tuple(
                        row
                        for head in range(heads)
                        for row in range(
                            (head * count + part) * size, (head * count + part + 1) * size
                        )
                    ),
                )
                for part, name in enumerate(self.parts)
            ]
        sizes = self.sizes(config) if self.sizes else (out_features // count,) * count
        if sum(sizes) != out_features:
            return []  # a layout this declaration does not describe: kept whole
        found: list[PartRows] = []
        start = 0
        for name, size in zip(self.parts, sizes, strict=True):
            found.append((name, (start, start + size, 1), None))
            start += size
        return found


@dataclass(frozen=True)
class Family:
    """One model family's architecture, as wandacli needs to know it."""

    name: str
    model_types: tuple[str, ...]  # transformers' `config.model_type` values
    writers: tuple[str, ...]  # fnmatch patterns over a matrix's name in its decoder layer
    norms_after: dict[str, NormAfter] = field(default_factory=dict)  # writer pattern → norm
    routers: tuple[str, ...] = ()
    experts: tuple[ExpertParameter, ...] = GATED_EXPERTS
    fused: dict[str, FusedMatrix] = field(default_factory=dict)  # matrix name → its parts
    layers_path: str = "model.layers"  # the decoder layers' module path in the model
    # The writers of the attention block (a direction's per-layer weights shape them apart
    # from the MLP's and the experts'), as fnmatch patterns; every other writer is the MLP's.
    attention_writers: tuple[str, ...] = ("*attn.*", "*attention.*")

    def is_writer(self, name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in self.writers)

    def writer_keys(self, shapes: dict[str, tuple[int, int]], hidden_size: int) -> list[str]:
        """The stored keys (`<layer>/<name>`) of the matrices writing into the stream: a
        writer's name and an output as wide as the stream."""
        return [
            key
            for key, (d_out, _) in shapes.items()
            if d_out == hidden_size and self.is_writer(key.split("/", 1)[1])
        ]

    def writer_component(self, name: str) -> str:
        """`attention` or `mlp`: which block a writer (by its name in its decoder layer)
        belongs to."""
        return "attention" if any(fnmatchcase(name, p) for p in self.attention_writers) else "mlp"

    def norm_after(self, name: str) -> NormAfter | None:
        for pattern, norm in self.norms_after.items():
            if fnmatchcase(name, pattern):
                return norm
        return None

    def is_router(self, name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in self.routers)

    def router_keys(self, keys: list[str]) -> list[str]:
        return [key for key in keys if self.is_router(key.split("/", 1)[1])]

    def has_parts(self, name: str) -> bool:
        """Whether `name` is a part of a fused weight or an expert's matrix (no module of its
        own: its weight is a share of another parameter)."""
        if any(name in fused.parts for fused in self.fused.values()):
            return True
        pieces = name.split(".")
        return len(pieces) >= 3 and pieces[-2].isdigit() and self.expert_part(pieces[-1])

    def expert_part(self, leaf: str) -> bool:
        return any(leaf in parameter.parts for parameter in self.experts)

    def expert_parameter(self, parameter: str) -> ExpertParameter | None:
        return next((p for p in self.experts if p.parameter == parameter), None)

    def writer_treatment(self, name: str) -> dict[str, Any]:
        """What a refusal-direction edit does to one writer, as its file records it: the
        vector its output is made orthogonal to; a writer's bias (GPT-NeoX, ...) adds to the
        stream as its output does, so it is projected the same way wherever there is one."""
        norm = self.norm_after(name)
        treatment: dict[str, Any] = {"orthogonal_to": "r"}
        if norm is not None:
            scale = (
                f"{norm.offset:g} + {norm.norm}.weight" if norm.offset else f"{norm.norm}.weight"
            )
            treatment = {
                "orthogonal_to": f"normalise(g ⊙ r), g = {scale}",
                "norm": norm.norm,
                "norm_offset": norm.offset,
            }
        treatment["bias"] = "projected where the writer has one"
        return treatment


def generic_family() -> Family:
    return Family(
        name="generic",
        model_types=(),
        writers=tuple(p for leaf in GENERIC_WRITER_LEAVES for p in (leaf, f"*.{leaf}")),
    )
