"""Each expert's inputs, seen as the experts run: the routed hidden states an expert's gate and
up projections read, and the intermediate activation its down projection reads.

transformers 5 computes a mixture of experts from 3-D parameters inside one module (no
`nn.Linear` per expert to hook), dispatching on `config._experts_implementation` to the
registered experts functions (`ExpertsInterface`, transformers' own extension point). While
`observing_experts` is active, the experts modules it is given run a function registered
here: the eager computation (each expert over the tokens routed to it, a loop over experts,
never over tokens), which hands each expert's inputs to an observer on the way. The output
is the eager implementation's, so the rest of the forward pass is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from wandacli.core.errors import ModelError
from wandacli.models.families.base import READS_HIDDEN, READS_INTERMEDIATE

OBSERVING = "wandacli_observing"

# expert module → what sees each expert's inputs: (module, expert, token_indices, hidden, intermediate)
Observer = Callable[[nn.Module, int, torch.Tensor, torch.Tensor, torch.Tensor], None]
_OBSERVERS: dict[int, Observer] = {}


def _linear(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return x @ weight if transposed else nn.functional.linear(x, weight)


def observed_experts_forward(
    self: Any,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts' eager forward pass, showing each expert's inputs to its observer."""
    observer = _OBSERVERS.get(id(self))
    transposed = bool(getattr(self, "is_transposed", False))
    has_gate = bool(getattr(self, "has_gate", True))
    has_bias = bool(getattr(self, "has_bias", False))
    first = "gate_up_proj" if has_gate else "up_proj"
    final = torch.zeros_like(hidden_states)
    for expert in torch.unique(top_k_index).tolist():
        if expert >= self.num_experts:  # an expert-parallel sentinel: not this rank's expert
            continue
        token_index, position = torch.where(top_k_index == expert)
        routed = hidden_states[token_index]
        projected = _linear(routed, getattr(self, first)[expert], transposed)
        if has_bias:
            projected = projected + getattr(self, f"{first}_bias")[expert]
        intermediate = self._apply_gate(projected) if has_gate else self.act_fn(projected)
        if observer is not None:
            observer(self, expert, token_index, routed, intermediate)
        out = _linear(intermediate, self.down_proj[expert], transposed)
        if has_bias:
            out = out + self.down_proj_bias[expert]
        if getattr(self, "has_post_expert_norm", False):
            out = self.post_expert_norm(out)
        out = out * top_k_weights[token_index, position, None]
        final.index_add_(0, token_index, out.to(final.dtype))
    return final


def _register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(OBSERVING, observed_experts_forward)


class _ObservingConfig:
    """The experts module's config, but naming the observing function as its implementation
    (the model's own config, shared by every module, is left as it is)."""

    def __init__(self, config: Any) -> None:
        self._config = config

    @property
    def _experts_implementation(self) -> str:
        return OBSERVING

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def dispatches_experts(module: nn.Module) -> bool:
    """Whether transformers dispatches this experts module's forward (`use_experts_implementation`)."""
    return hasattr(module, "_apply_gate") and hasattr(module, "config")


@contextlib.contextmanager
def observing_experts(observers: dict[nn.Module, Observer]) -> Iterator[None]:
    """Each experts module shows each expert's inputs to its observer while the block runs."""
    for module in observers:
        if not dispatches_experts(module):
            raise ModelError(
                f"the experts module {type(module).__name__} does not dispatch through "
                "transformers' experts interface, so its per-expert inputs cannot be observed: "
                "use --method magnitude, random or wandg for this model, or a transformers "
                "release whose experts use `use_experts_implementation`"
            )
    _register()
    saved = {module: getattr(module, "config") for module in observers}  # noqa: B009
    try:
        for module, observer in observers.items():
            _OBSERVERS[id(module)] = observer
            setattr(module, "config", _ObservingConfig(saved[module]))  # noqa: B010
        yield
    finally:
        for module, config in saved.items():
            setattr(module, "config", config)  # noqa: B010
            _OBSERVERS.pop(id(module), None)


# What a method does with the inputs an expert's matrices read: the keys of the matrices that
# read them (an expert's gate and up projections read the same) and the inputs, counted tokens
# only, [n, d_in].
ExpertInputs = Callable[[list[str], torch.Tensor], None]


@contextlib.contextmanager
def observing_expert_inputs(
    layers: list[Any], record: ExpertInputs, counted: Callable[[], torch.Tensor | None]
) -> Iterator[None]:
    """While the block runs, every expert's matrices among `layers` (models/layers.LinearLayer)
    hand `record` the inputs they read: the routed hidden states, or the expert's
    intermediate activation, keeping the tokens `counted()` ([T] bool, None: all) selects."""
    by_module: dict[nn.Module, dict[tuple[int, str], list[str]]] = {}
    for lin in layers:
        if lin.is_expert:
            readers = by_module.setdefault(lin.module, {})
            readers.setdefault((lin.expert, lin.reads), []).append(lin.key)

    def observer_of(readers: dict[tuple[int, str], list[str]]) -> Observer:
        def observe(
            module: nn.Module,
            expert: int,
            token_index: torch.Tensor,
            hidden: torch.Tensor,
            intermediate: torch.Tensor,
        ) -> None:
            chosen = counted()
            kept = chosen.to(token_index.device)[token_index] if chosen is not None else None
            for reads, inputs in ((READS_HIDDEN, hidden), (READS_INTERMEDIATE, intermediate)):
                keys = readers.get((expert, reads))
                if keys:
                    flat = inputs.detach()
                    record(keys, flat[kept] if kept is not None else flat)

        return observe

    with observing_experts({m: observer_of(r) for m, r in by_module.items()}):
        yield
