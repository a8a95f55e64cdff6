"""mean-activations: the mean residual stream over a set's prompts, per layer and per prompt
position from the end, for a refusal direction (Arditi et al. 2024: the difference of the
means on harmful and harmless prompts at one layer and one post-instruction position).

Every `hidden_states[l]` of the HF model (l = 0: the embeddings' output; l = 1..L: each
decoder layer's output, the last after the final norm, as transformers returns them) at the
last K positions of each prompt, summed in float64 over the prompts, stored float32
[L + 1, K, d_model]. The reference records block inputs with forward pre-hooks: the same
tensors for l < L; hidden_states come from the model itself, with no hooks and no
TransformerLens (whose activations differ from the HF model's).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from wandacli.config.score import ScoreConfig
from wandacli.data.calibration import CalibrationSet, build_prompt_samples
from wandacli.data.sources import RawData
from wandacli.methods.base import RunContext, ScoreMethod
from wandacli.models.layers import LinearLayer
from wandacli.models.pretrained import LoadedModel, accepts_logits_to_keep
from wandacli.store.assemble import LayerArray, LayerLink
from wandacli.store.schema import MEANS_DATASET, MEANS_FORMAT, PER_PROMPT_DATASET

SUMS = "sums"
PROMPTS = "per_prompt"  # each prompt's streams (--per-prompt), zero where not yet observed


class MeanActivationsMethod(ScoreMethod):
    """Σ over prompts of hidden_states[l][last K positions], one forward pass per prompt."""

    name = "mean-activations"
    file_format = MEANS_FORMAT
    noun = "mean-activations set"

    def __init__(self, run: RunContext) -> None:
        super().__init__(run)
        self.sums: torch.Tensor | None = None
        self.per_prompt: torch.Tensor | None = None
        self.prompts = 0

    def settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"positions": self.config.positions}
        if self.config.per_prompt:  # as before the option, where it is off
            settings["per_prompt"] = True
        return settings

    def meta(self) -> dict[str, Any]:
        assert self.sums is not None
        return {
            "positions": self.config.positions,
            "hidden_size": int(self.sums.shape[2]),
            "prompts": self.prompts,
            "means_are": "hidden_states[l] of the HF model (l = 0 the embeddings' output, l = L "
            "after the final norm) at the last `positions` prompt tokens, position k of K being "
            "k − K from the end, averaged over the prompts in float64",
            "prompt_rule": "each prompt's Llama-2 tags stripped, then as eval-attack shows it "
            "with instruction tags and no system prompt in the set's template",
            **(
                {
                    "per_prompt": f"/{PER_PROMPT_DATASET}: each prompt's streams, [prompts, L + 1, "
                    "K, d_model] float32, in the calibration set's order"
                }
                if self.per_prompt is not None
                else {}
            ),
        }

    def _shape(self, loaded: LoadedModel) -> tuple[int, int, int]:
        hidden = int(loaded.model.get_input_embeddings().weight.shape[1])
        return (loaded.fingerprint.num_layers + 1, self.config.positions, hidden)

    def calibration(
        self, raw: RawData, tokenizer: Any, config: ScoreConfig, seqlen: int
    ) -> CalibrationSet:
        """Prompts only, each as the model sees it attacked; the last K positions count."""
        return build_prompt_samples(
            raw,
            tokenizer,
            nsamples=config.nsamples,
            seed=config.seed,
            template=config.template,
            positions=config.positions,
        )

    def array_bytes(self, loaded: LoadedModel) -> int:
        layers, positions, hidden = self._shape(loaded)
        prompts = 1 + (self.config.nsamples if self.config.per_prompt else 0)
        return prompts * layers * positions * hidden * 4

    def datasets(self, loaded: LoadedModel) -> int:
        return 2 if self.config.per_prompt else 1

    def gather(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
        groups: list[list[LinearLayer]],
    ) -> None:
        assert calibration is not None
        run = self.run
        # float64 on the CPU: a few hundred kB, read once per prompt; the collective moves it
        # through the group's device when there is one.
        sums = torch.zeros(self._shape(loaded), dtype=torch.float64)
        kept = (
            torch.zeros((len(calibration.samples), *self._shape(loaded)), dtype=torch.float32)
            if self.config.per_prompt
            else None
        )
        index_of = {id(sample): i for i, sample in enumerate(calibration.samples)}

        def arrays() -> dict[str, torch.Tensor]:
            return {SUMS: sums} | ({PROMPTS: kept} if kept is not None else {})

        def load(stored: dict[str, torch.Tensor]) -> None:
            sums.copy_(stored[SUMS])
            if kept is not None:
                kept.copy_(stored[PROMPTS])

        done = run.dist.broadcast_int(run.restore(load, "means-*.h5") if run.dist.is_main else 0)
        extra = {"logits_to_keep": 1} if accepts_logits_to_keep(loaded.model) else {}
        positions = self.config.positions

        def observe(sample: Any) -> None:
            with torch.no_grad():
                out = loaded.model(
                    input_ids=sample.input_ids.to(loaded.input_device),
                    output_hidden_states=True,
                    use_cache=False,
                    **extra,
                )
            stacked = torch.stack(
                [h[0, -positions:].to("cpu", torch.float64) for h in out.hidden_states]
            )
            if stacked.shape != sums.shape:
                raise RuntimeError(
                    f"hidden states of shape {tuple(stacked.shape)}, expected {tuple(sums.shape)}"
                )
            sums.add_(stacked)
            if kept is not None:
                kept[index_of[id(sample)]] = stacked.float()

        def checkpoint(step: int, *, reduced: bool = False) -> None:
            run.checkpoint(
                arrays(),
                f"means-{step:06d}.h5",
                "means-*.h5",
                {"samples": step, "kind": "mean-activation-sums"},
                reduced=reduced,
            )

        steps = run.sample_loop(calibration, done, "mean activations: prompts", observe, checkpoint)
        # Each prompt's row is written by one rank and zero on the others: a sum gathers them.
        run.dist.all_reduce_sum(list(arrays().values()))
        if done < steps:  # the sums over every prompt on disk before assembly
            checkpoint(steps, reduced=True)
        self.sums = sums
        self.per_prompt = kept
        self.prompts = len(calibration.samples)

    def assembly(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
    ) -> tuple[Iterator[Iterator[LayerArray | LayerLink]], int]:
        """One array, not one per linear layer."""
        assert self.sums is not None and self.prompts > 0
        means = (self.sums / self.prompts).float().numpy()
        arrays = [LayerArray(MEANS_DATASET, np.ascontiguousarray(means))]
        if self.per_prompt is not None:
            arrays.append(LayerArray(PER_PROMPT_DATASET, self.per_prompt.numpy()))
        return iter([iter(arrays)]), 1
