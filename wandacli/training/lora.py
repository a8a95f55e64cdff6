"""LoRA for `wandacli finetune --lora-rank R`: peft's adapters on the decoder's linear layers,
and what a mask means for them.

A LoRA attack trains a low-rank update ΔW = (alpha / R) · B A of each targeted matrix and leaves
W itself untouched, so a mask cannot act on W's entries during training. It acts on the merged
delta instead:

    --freeze M   the masked entries of ΔW are zero in every forward pass (the attack trains
                 through the other entries only), and the saved model's masked weights are W's
                 own, bitwise
    --rewind M   the adapters train freely; the saved model's masked weights are put back to W's
                 (the merged delta with M's entries dropped, the reference's rewind)

Only whole `nn.Linear`/Conv1D matrices take adapters (a fused matrix takes one for all its
parts); an expert's slice of a 3-D parameter and a router of its own module type (both as
transformers 5 has them) take none, so they are not trained at all. The norms, embeddings and
head stay as they are, as in any LoRA.

The model is saved merged (W + ΔW, masked entries as above), a plain model directory every
command reads; `merged()` gives that model for a step's save and puts the adapters back after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ADAPTER = "default"  # peft's adapter name: one adapter per model here


def _targets(loaded: Any) -> dict[str, Any]:
    """The modules that take an adapter, by their name in the model: every whole 2-D matrix
    of the decoder layers' linear layers (a fused matrix once)."""
    from torch import nn

    names = {id(module): name for name, module in loaded.model.named_modules()}
    targets: dict[str, Any] = {}
    for lin in loaded.linear_layers:
        if lin.expert is not None or lin.parameter != "weight":
            continue
        if not isinstance(lin.module, nn.Linear) and type(lin.module).__name__ != "Conv1D":
            continue
        targets.setdefault(names[id(lin.module)], lin.module)
    return targets


class LoraAdapters:
    """peft's LoRA adapters injected into a loaded model in place (`loaded.model` stays the
    transformers model), the only trainable parameters."""

    def __init__(self, loaded: Any, rank: int, alpha: int, frozen: Any | None = None) -> None:
        """`frozen`: a MaskedWeights whose entries the adapters' delta never reaches."""
        from peft import LoraConfig, inject_adapter_in_model

        self.model = loaded.model
        bases = _targets(loaded)
        if not bases:
            from wandacli.core.errors import ModelError

            raise ModelError(
                f"{loaded.model_id} has no linear layer LoRA can adapt: fine-tune it in full "
                "(--lora-rank 0)"
            )
        keep = _keep_masks(frozen, bases) if frozen is not None else {}
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=0.0,
            bias="none",
            target_modules=sorted(bases),
            fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in bases.values()),
        )
        self.model.requires_grad_(False)
        inject_adapter_in_model(config, self.model, ADAPTER)
        self.adapted = {name: self.model.get_submodule(name) for name in bases}
        for name, module in self.adapted.items():
            for part in (module.lora_A[ADAPTER], module.lora_B[ADAPTER]):
                part.requires_grad_(True)
            if name in keep:
                module.forward = _masked_forward(module, keep[name])

    def _parent(self, name: str) -> tuple[Any, str]:
        parent, _, attribute = name.rpartition(".")
        return self.model.get_submodule(parent), attribute

    def _delta(self, module: Any) -> Any:
        """ΔW of one adapted module, in its weight's layout and dtype."""
        base = module.get_base_layer()
        return module.get_delta_weight(ADAPTER).to(base.weight.dtype)

    def _fold(self, masked: Any | None, keep_originals: bool) -> dict[str, Any]:
        """W + ΔW written into each adapted weight and the plain module put back in its
        parent; with `masked`, the mask's entries as they were before training (the mask on
        the merged delta). The weights as they were, where asked."""
        import torch

        originals = {}
        with torch.no_grad():
            for name, module in self.adapted.items():
                base = module.get_base_layer()
                if keep_originals:
                    originals[name] = base.weight.detach().clone()
                base.weight.add_(self._delta(module))
                parent, attribute = self._parent(name)
                setattr(parent, attribute, base)
            if masked is not None:
                masked.restore()
        return originals

    @contextmanager
    def merged(self, masked: Any | None = None) -> Iterator[None]:
        """The model as a plain transformers model with the adapters folded in (`_fold`); the
        adapters and W put back after, bitwise."""
        import torch

        originals = self._fold(masked, keep_originals=True)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, module in self.adapted.items():
                    module.get_base_layer().weight.copy_(originals[name])
                    parent, attribute = self._parent(name)
                    setattr(parent, attribute, module)

    def merge(self, masked: Any | None = None) -> None:
        """For good: the adapters folded in (`_fold`) and gone."""
        self._fold(masked, keep_originals=False)
        self.adapted = {}


def _keep_masks(frozen: Any, bases: dict[str, Any]) -> dict[str, Any]:
    """Per adapted module, a bool tensor shaped like its weight: False where the mask holds an
    entry (ΔW is zero there), True elsewhere."""
    import torch

    by_module = {id(module): name for name, module in bases.items()}
    keep: dict[str, Any] = {}
    for key, selector in frozen.selectors.items():
        lin = frozen.layers[key]
        name = by_module.get(id(lin.module))
        if name is None:  # an expert's slice: it takes no adapter, so it is not trained
            continue
        whole = keep.setdefault(name, torch.ones_like(lin.weight, dtype=torch.bool))
        matrix = lin.matrix_of(whole).clone()
        matrix[selector.to(matrix.device)] = False
        lin.place(whole, matrix)
    return keep


def _masked_forward(module: Any, keep: Any) -> Any:
    """The adapted module's forward with ΔW's masked entries zero: W x + (ΔW ⊙ keep) x. It
    builds ΔW as a matrix, one weight's worth of memory per layer while it is needed."""
    import torch

    conv1d = bool(module.fan_in_fan_out)

    def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
        result = module.base_layer(x, *args, **kwargs)
        dropout = module.lora_dropout[ADAPTER]
        delta = module.get_delta_weight(ADAPTER) * keep.to(result.device)
        if conv1d:  # [in, out], as Conv1D stores it
            delta = delta.t()
        update = torch.nn.functional.linear(dropout(x).to(delta.dtype), delta)
        return result + update.to(result.dtype)

    return forward
