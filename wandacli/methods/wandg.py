"""wandg (SNIP): |W| times the summed |grad|, one forward and backward per sample."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from wandacli.data.calibration import IGNORE_INDEX, CalibrationSet
from wandacli.methods.groups import LayerGroupMethod
from wandacli.models.layers import LinearLayer
from wandacli.models.pretrained import LoadedModel, accepts_logits_to_keep
from wandacli.store.assemble import LayerArray, LayerLink


class WandgMethod(LayerGroupMethod):
    """SNIP: |W| · Σ|∂L/∂W| over the samples, one layer group at a time."""

    name = "wandg"
    kind = "wandg-accumulators"

    def meta(self) -> dict[str, Any]:
        return super().meta() | {"offload_accumulators": self.config.offload_accumulators}

    def new_state(
        self, loaded: LoadedModel, group: list[LinearLayer], index: int, count: int
    ) -> Any:
        return GradientAccumulator(group, offload=self.config.offload_accumulators)

    def observe(
        self, state: Any, loaded: LoadedModel, calibration: CalibrationSet, sample: Any
    ) -> None:
        if sample.num_counted > 0:  # a sample with no counted token has no loss
            input_ids = sample.input_ids.to(loaded.input_device)
            state.observe(loaded.model, input_ids, sample.labels.to(loaded.input_device))

    def _snip(
        self,
        lin: LinearLayer,
        state: GradientAccumulator,
        base_layers: dict[str, LinearLayer] | None,
    ) -> torch.Tensor:
        magnitude = self.magnitude(lin, base_layers)
        return snip_scores(magnitude, state.scores_layout(lin).to(magnitude.device))

    def group_arrays(
        self, state: Any, group: list[LinearLayer], base_layers: dict[str, LinearLayer] | None
    ) -> Iterator[tuple[str, np.ndarray]]:
        return ((lin.key, self._snip(lin, state, base_layers).cpu().numpy()) for lin in group)

    def group_bytes(self, group: list[LinearLayer]) -> int:
        return sum(lin.shape[0] * lin.shape[1] * 4 for lin in group)

    def layer_arrays(
        self,
        lin: LinearLayer,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
    ) -> Iterator[LayerArray | LayerLink]:
        if lin.key in self.group_parts:
            scores = self.group_parts[lin.key].read_raw(lin.key)
        else:
            scores = self._snip(lin, self.last, base_layers).cpu().numpy()
        yield LayerArray(lin.key, scores, is_scores=True)


def snip_scores(magnitude: torch.Tensor, grad_abs_sum: torch.Tensor) -> torch.Tensor:
    """SNIP (wandg): |W| · Σ|∂L/∂W|."""
    return magnitude * grad_abs_sum.float()


# ---------------------------------------------------------------------------------------------
# Forward passes


def sample_loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not -100: the loss transformers
    computes from `labels`, with logits computed only at the positions that predict a counted
    token (prompt positions would cost a vocabulary projection each and count for nothing)."""
    if not accepts_logits_to_keep(model):
        return model(input_ids=input_ids, labels=labels, use_cache=False).loss
    # Position t predicts token t+1: keep the positions whose next label counts.
    positions = torch.nonzero(labels[0, 1:].ne(IGNORE_INDEX)).squeeze(1)
    targets = labels[0, positions + 1]
    # The index goes to the CPU: under a device map transformers indexes the last device's
    # hidden states with it, and torch takes CPU indices for a tensor on any device.
    logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=positions.cpu()).logits
    # Under a device map the head may sit on another device than the inputs.
    return torch.nn.functional.cross_entropy(logits[0].float(), targets.to(logits.device))


# ---------------------------------------------------------------------------------------------
# wandg: |grad| summed as each gradient arrives


class GradientAccumulator:
    """Σ_samples |∂L_n/∂W| in float32 for a group of weight matrices.

    Each parameter's gradient is added to its accumulator the moment autograd finishes it and
    is then freed, so peak memory stays near weights + accumulators + one gradient. The
    experts' matrices share one accumulator per 3-D parameter (|∇| of the whole parameter,
    sliced per expert when scores are made): one hook per parameter, however many experts.
    """

    def __init__(self, layers: list[LinearLayer], *, offload: bool = False) -> None:
        self.layers = layers
        self.parameters = {lin.parameter_key: lin.weight for lin in layers}
        # Accumulators in the parameter's own layout (Conv1D: transposed; experts: 3-D); see
        # `scores_layout`. With `offload`, in CPU memory: each gradient is copied there as it
        # arrives (slower, but a GPU then holds only the model and one gradient).
        self.sums: dict[str, torch.Tensor] = {
            key: torch.zeros_like(weight, dtype=torch.float32, device="cpu" if offload else None)
            for key, weight in self.parameters.items()
        }

    def load(self, sums: dict[str, torch.Tensor]) -> None:
        for key, value in sums.items():
            self.sums[key].copy_(value.to(self.sums[key].device))

    def _hook(self, key: str) -> Any:
        accumulator = self.sums[key]

        def post_accumulate(param: torch.Tensor) -> None:
            grad = param.grad
            assert grad is not None
            accumulator.add_(grad.abs_().to(accumulator.device))
            param.grad = None

        return post_accumulate

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Gradients enabled for exactly this group's weights while the block runs."""
        handles = []
        for key, weight in self.parameters.items():
            weight.requires_grad_(True)
            weight.grad = None
            handles.append(weight.register_post_accumulate_grad_hook(self._hook(key)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for weight in self.parameters.values():
                weight.requires_grad_(False)
                weight.grad = None

    def observe(self, model: Any, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        """One forward and backward over one sample; the loss is the model's mean cross-entropy
        over the tokens whose label is not -100."""
        with torch.enable_grad():
            sample_loss(model, input_ids, labels).backward()

    def scores_layout(self, lin: LinearLayer) -> torch.Tensor:
        """The matrix's share of its accumulator as [out_features, in_features]."""
        return lin.matrix_of(self.sums[lin.parameter_key])
