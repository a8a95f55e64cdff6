"""wanda: |W| times the input norm of each column, from squared-input sums per sample."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from wandacli.data.calibration import CalibrationSet
from wandacli.methods.base import RunContext, ScoreMethod
from wandacli.models.experts import observing_expert_inputs
from wandacli.models.layers import LinearLayer
from wandacli.models.pretrained import LoadedModel, accepts_logits_to_keep
from wandacli.store.assemble import LayerArray, LayerLink
from wandacli.store.schema import STATS_GROUP


class WandaMethod(ScoreMethod):
    """|W| · sqrt(s): s, the squared input norms per column, gathered in one pass."""

    name = "wanda"

    def __init__(self, run: RunContext) -> None:
        super().__init__(run)
        self.sums: dict[str, torch.Tensor] = {}

    def array_bytes(self, loaded: LoadedModel) -> int:
        stats = sum(shape[1] * 4 for shape in loaded.fingerprint.shapes.values())
        return super().array_bytes(loaded) + stats

    def datasets(self, loaded: LoadedModel) -> int:
        return 2 * len(loaded.linear_layers)

    def space_needed(self, loaded: LoadedModel) -> int:
        return super().array_bytes(loaded)

    def gather(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
        groups: list[list[LinearLayer]],
    ) -> None:
        assert calibration is not None
        run = self.run
        statistics = ActivationStatistics(loaded.linear_layers)
        done = run.dist.broadcast_int(
            run.restore(statistics.load, "stats-*.h5") if run.dist.is_main else 0
        )

        def observe(sample: Any) -> None:
            counted = sample.counted.to(loaded.input_device) if calibration.disentangle else None
            statistics.observe(loaded.model, sample.input_ids.to(loaded.input_device), counted)

        def checkpoint(step: int, *, reduced: bool = False) -> None:
            run.checkpoint(
                statistics.sums,
                f"stats-{step:06d}.h5",
                "stats-*.h5",
                {"samples": step, "kind": "wanda-sums"},
                reduced=reduced,
            )

        with statistics.recording():
            steps = run.sample_loop(calibration, done, "wanda: samples", observe, checkpoint)
        run.dist.all_reduce_sum(statistics.sums.values())
        if done < steps:  # keep every statistic before assembly
            checkpoint(steps, reduced=True)
        self.sums = statistics.sums

    def layer_arrays(
        self,
        lin: LinearLayer,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
    ) -> Iterator[LayerArray | LayerLink]:
        assert calibration is not None
        nsamples = len(calibration.samples)
        magnitude = self.magnitude(lin, base_layers)
        sums = self.sums[lin.key]
        scores = wanda_scores(magnitude, sums.to(magnitude.device), nsamples)
        yield LayerArray(lin.key, scores.cpu().numpy(), is_scores=True)
        mean_sq = (sums.float() / float(nsamples)).cpu().numpy()
        yield LayerArray(f"{STATS_GROUP}/{lin.key}", mean_sq)


def wanda_scores(magnitude: torch.Tensor, sq_norm_sum: torch.Tensor, nsamples: int) -> torch.Tensor:
    """Wanda: |W| · sqrt(s) with s = (sum over samples of squared input norms per column) / N."""
    mean_sq_norm = sq_norm_sum.float() / float(nsamples)
    return magnitude * torch.sqrt(mean_sq_norm).reshape(1, -1)


# ---------------------------------------------------------------------------------------------
# Wanda: squared input norms through forward pre-hooks


class ActivationStatistics:
    """Sums of squared inputs per column, per weight matrix, over the counted tokens.

    One forward pass over a sample updates every matrix at once. Layers that share an input
    (q/k/v, gate/up) compute it once per sample. An expert's matrices count the tokens routed
    to that expert: its gate and up projections the routed hidden states, its down projection
    its own intermediate activation (models/experts.py shows them as the experts run).
    """

    def __init__(self, layers: list[LinearLayer]) -> None:
        self.layers = layers
        self.sums: dict[str, torch.Tensor] = {
            lin.key: torch.zeros(lin.shape[1], dtype=torch.float32, device=lin.weight.device)
            for lin in layers
        }
        self._counted: torch.Tensor | None = None  # [T] bool, or None when every token counts
        # The last input seen and its column sums; held strongly so that `is` cannot match a
        # new tensor allocated at a freed address.
        self._last_input: torch.Tensor | None = None
        self._last_sum: torch.Tensor | None = None

    def load(self, sums: dict[str, torch.Tensor]) -> None:
        """Restore sums from a checkpoint (keys and lengths must match)."""
        for key, value in sums.items():
            self.sums[key].copy_(value.to(self.sums[key].device))

    def _hook(self, key: str) -> Any:
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if x is not self._last_input or self._last_sum is None:
                flat = x.detach().reshape(-1, x.shape[-1])
                if self._counted is not None:
                    flat = flat[self._counted.to(flat.device)]
                flat = flat.float()
                self._last_sum = (flat * flat).sum(dim=0)
                self._last_input = x
            accumulator = self.sums[key]
            accumulator.add_(self._last_sum.to(accumulator.device))

        return pre_hook

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Hooks attached for the duration of the block."""
        hooked = [lin for lin in self.layers if not lin.is_expert]
        handles = [lin.module.register_forward_pre_hook(self._hook(lin.key)) for lin in hooked]
        try:
            with observing_expert_inputs(
                self.layers, self._add_expert_inputs, lambda: self._counted
            ):
                yield
        finally:
            for handle in handles:
                handle.remove()
            self._last_input = self._last_sum = None

    def _add_expert_inputs(self, keys: list[str], inputs: torch.Tensor) -> None:
        flat = inputs.float()
        squares = (flat * flat).sum(dim=0)
        for key in keys:
            self.sums[key].add_(squares.to(self.sums[key].device))

    def observe(self, model: Any, input_ids: torch.Tensor, counted: torch.Tensor | None) -> None:
        """One forward pass over one sample; `counted` ([1, T] bool) selects the tokens that count."""
        self._counted = counted.reshape(-1) if counted is not None else None
        self._last_input = self._last_sum = None
        # Only the linear layers' inputs matter: skip the vocabulary projection (a fifth of a
        # small model's forward pass) by asking for a single position's logits.
        extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False, **extra)
        self._counted = None
