"""actsvd: the second moments of each distinct linear input, for rank edits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from wandacli.data.calibration import CalibrationSet
from wandacli.methods.base import RunContext
from wandacli.methods.groups import LayerGroupMethod
from wandacli.models.experts import observing_expert_inputs
from wandacli.models.layers import LinearLayer
from wandacli.models.pretrained import LoadedModel, accepts_logits_to_keep
from wandacli.store.assemble import LayerArray, LayerLink
from wandacli.store.schema import RANK_STATS_FORMAT


class ActSvdMethod(LayerGroupMethod):
    """Rank statistics: per distinct linear input, C = (1/N) Σ x xᵀ over the counted tokens,
    from which any rank edit of ActSVD follows (removal/ranks.py)."""

    name = "actsvd"
    kind = "actsvd-second-moments"
    file_format = RANK_STATS_FORMAT
    noun = "rank-statistics set"

    def __init__(self, run: RunContext) -> None:
        super().__init__(run)
        self.owners: dict[str, str] = {}
        self.counted_tokens = 0
        self.has_experts = False

    def _owners(self, loaded: LoadedModel) -> dict[str, str]:
        self.has_experts = any(lin.is_expert for lin in loaded.linear_layers)
        if not self.owners:
            self.owners = shared_inputs(loaded.model, loaded.linear_layers, loaded.input_device)
        return self.owners

    def meta(self) -> dict[str, Any]:
        return super().meta() | {
            "shared_inputs": {k: v for k, v in self.owners.items() if k != v},
            "counted_tokens": self.counted_tokens,
            "experts": "each expert's C over the counted tokens routed to it"
            if self.has_experts
            else None,
        }

    def array_bytes(self, loaded: LoadedModel) -> int:
        owners = self._owners(loaded)
        return sum(
            lin.shape[1] * lin.shape[1] * 4
            for lin in loaded.linear_layers
            if owners[lin.key] == lin.key
        )

    def space_needed(self, loaded: LoadedModel) -> int:
        self._owners(loaded)  # the shared inputs, so that each is counted once
        return super().space_needed(loaded)

    def checkpoint_bytes(self, group: list[LinearLayer]) -> int:
        return 2 * self.group_bytes(group)  # the sums are float64

    def settle(self, state: Any) -> None:
        state.flush()  # the float32 blocks into the float64 sums

    def new_state(
        self, loaded: LoadedModel, group: list[LinearLayer], index: int, count: int
    ) -> Any:
        # Every group but the last stops its forward pass after its own last layer.
        return SecondMoments(group, self._owners(loaded), stop_early=index < count - 1)

    def observe(
        self, state: Any, loaded: LoadedModel, calibration: CalibrationSet, sample: Any
    ) -> None:
        counted = sample.counted.to(loaded.input_device) if calibration.disentangle else None
        state.observe(loaded.model, sample.input_ids.to(loaded.input_device), counted)

    def group_arrays(
        self, state: Any, group: list[LinearLayer], base_layers: dict[str, LinearLayer] | None
    ) -> Iterator[tuple[str, np.ndarray]]:
        self.counted_tokens = state.tokens
        for lin in state.readers:
            yield lin.key, state.second_moment(lin.key).float().cpu().numpy()

    def group_bytes(self, group: list[LinearLayer]) -> int:
        return sum(
            lin.shape[1] ** 2 * 4 for lin in group if self.owners.get(lin.key, lin.key) == lin.key
        )

    def gather(
        self,
        loaded: LoadedModel,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
        groups: list[list[LinearLayer]],
    ) -> None:
        self._owners(loaded)
        super().gather(loaded, calibration, base_layers, groups)
        if self.last is not None:
            self.counted_tokens = self.last.tokens

    def layer_arrays(
        self,
        lin: LinearLayer,
        calibration: CalibrationSet | None,
        base_layers: dict[str, LinearLayer] | None,
    ) -> Iterator[LayerArray | LayerLink]:
        owner = self.owners[lin.key]
        if owner != lin.key:
            yield LayerLink(lin.key, owner)
        elif lin.key in self.group_parts:
            yield LayerArray(lin.key, self.group_parts[lin.key].read_raw(lin.key))
        else:
            yield LayerArray(lin.key, self.last.second_moment(lin.key).float().cpu().numpy())


# ---------------------------------------------------------------------------------------------
# actsvd: second moments of the linear layers' inputs


class _GroupDone(Exception):
    """Raised by the last hook of a layer group: the rest of the forward pass is not needed."""


def shared_inputs(model: Any, layers: list[LinearLayer], device: Any) -> dict[str, str]:
    """Which matrices read the same input tensor (q/k/v, gate/up, ...): key → the key of the
    first matrix, in model order, that reads it. Found with one forward pass over two tokens,
    so it holds for any architecture the loader knows; an expert's matrices that read the
    same input (its gate and up projections) share their first one's."""
    first_reader: dict[int, str] = {}
    owner: dict[str, str] = {}
    seen: list[torch.Tensor] = []  # held so that no id is reused during the pass
    first_expert_reader: dict[tuple[int, int, str | None], str] = {}
    for lin in layers:
        if lin.is_expert:
            assert lin.expert is not None
            reader = (id(lin.module), lin.expert, lin.reads)
            owner[lin.key] = first_expert_reader.setdefault(reader, lin.key)
    hooked = [lin for lin in layers if not lin.is_expert]

    def hook(key: str) -> Any:
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            seen.append(x)
            owner[key] = first_reader.setdefault(id(x), key)

        return pre_hook

    handles = [lin.module.register_forward_pre_hook(hook(lin.key)) for lin in hooked]
    try:
        with torch.no_grad():
            extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
            model(
                input_ids=torch.ones((1, 2), dtype=torch.long, device=device),
                use_cache=False,
                **extra,
            )
    finally:
        for handle in handles:
            handle.remove()
    return {lin.key: owner.get(lin.key, lin.key) for lin in layers}


class SecondMoments:
    """Σ x xᵀ over the counted tokens, per distinct linear input of a group of layers, and the
    number of counted tokens: the rank statistics of `--method actsvd`.

    Each sample's products go into a float32 block (the upper block triangle only: XᵀX is
    symmetric), which is added to the float64 sums every FLUSH_EVERY samples and at every
    checkpoint: float32 for the matrix products, float64 where millions of terms add up. The
    flushes fall on the same samples in an interrupted and an uninterrupted run, so a resume is
    bitwise exact. Layers that read the same input (see `shared_inputs`) share one
    accumulator. A forward pass stops once the group's last input is recorded.
    """

    TOKENS_KEY = "counted_tokens"
    # An expert's C is over the tokens routed to it: its count beside it, per reading owner.
    EXPERT_TOKENS = "counted_tokens_of"
    # Samples per float32 block: ≤ 8 sequences of terms in float32 (relative error ~1e-6),
    # the d_in² conversion to float64 paid once per 8 samples.
    FLUSH_EVERY = 8

    def __init__(
        self, layers: list[LinearLayer], owners: dict[str, str], *, stop_early: bool
    ) -> None:
        self.layers = layers
        self.owners = {lin.key: owners.get(lin.key, lin.key) for lin in layers}
        self.readers = [lin for lin in layers if self.owners[lin.key] == lin.key]
        self.sums: dict[str, torch.Tensor] = {
            lin.key: torch.zeros(
                (lin.shape[1], lin.shape[1]), dtype=torch.float64, device=lin.weight.device
            )
            for lin in self.readers
        }
        self.sums[self.TOKENS_KEY] = torch.zeros(1, dtype=torch.float64)
        self.expert_readers = [lin for lin in self.readers if lin.is_expert]
        for lin in self.expert_readers:
            self.sums[self.tokens_key(lin.key)] = torch.zeros(1, dtype=torch.float64)
        self._blocks = {
            lin.key: torch.zeros(
                (lin.shape[1], lin.shape[1]), dtype=torch.float32, device=lin.weight.device
            )
            for lin in self.readers
        }
        self._pending = 0  # samples in the float32 blocks
        self._counted: torch.Tensor | None = None
        # The forward pass stops at the group's last hooked input (an expert's are observed
        # inside the experts, in no fixed order: a group ending in experts runs to the end).
        last = self.readers[-1] if self.readers else None
        self._last_key = last.key if stop_early and last and not last.is_expert else None

    @classmethod
    def tokens_key(cls, key: str) -> str:
        return f"{cls.EXPERT_TOKENS}/{key}"

    def load(self, sums: dict[str, torch.Tensor]) -> None:
        for key, value in sums.items():
            self.sums[key].copy_(value.to(self.sums[key].device))

    @property
    def tokens(self) -> int:
        return int(self.sums[self.TOKENS_KEY].item())

    def flush(self) -> None:
        """Add the float32 blocks to the float64 sums (before a checkpoint, and at the end)."""
        if self._pending == 0:
            return
        pass

        for key, block in self._blocks.items():
            self.sums[key].add_(symmetrize_upper(block).to(torch.float64))
            block.zero_()
        self._pending = 0

    def _hook(self, key: str) -> Any:
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            pass

            flat = args[0].detach().reshape(-1, args[0].shape[-1])
            if self._counted is not None:
                flat = flat[self._counted.to(flat.device)]
            block = self._blocks[key]
            add_upper_second_moment(block, flat.to(block.device))
            if key == self._last_key:
                raise _GroupDone

        return pre_hook

    def _add_expert_inputs(self, keys: list[str], inputs: torch.Tensor) -> None:
        for key in keys:  # one owner per expert input (shared_inputs)
            block = self._blocks[key]
            add_upper_second_moment(block, inputs.to(block.device))
            self.sums[self.tokens_key(key)] += inputs.shape[0]

    @contextmanager
    def recording(self) -> Iterator[None]:
        handles = [
            lin.module.register_forward_pre_hook(self._hook(lin.key))
            for lin in self.readers
            if not lin.is_expert
        ]
        try:
            with observing_expert_inputs(
                self.expert_readers, self._add_expert_inputs, lambda: self._counted
            ):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def observe(self, model: Any, input_ids: torch.Tensor, counted: torch.Tensor | None) -> None:
        """One forward pass over one sample (up to the group's last layer)."""
        self._counted = counted.reshape(-1) if counted is not None else None
        tokens = int(self._counted.sum()) if self._counted is not None else input_ids.numel()
        self.sums[self.TOKENS_KEY] += tokens
        extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        try:
            with torch.no_grad():
                model(input_ids=input_ids, use_cache=False, **extra)
        except _GroupDone:
            pass
        finally:
            self._counted = None
        self._pending += 1
        if self._pending == self.FLUSH_EVERY:
            self.flush()

    def second_moment(self, key: str) -> torch.Tensor:
        """C = (1/N) Σ x xᵀ for the input layer `key` reads (float64); an expert's over the
        N tokens routed to it."""
        self.flush()
        owner = self.owners[key]
        tokens_key = self.tokens_key(owner)
        tokens = int(self.sums[tokens_key].item()) if tokens_key in self.sums else self.tokens
        return self.sums[owner] / max(tokens, 1)


# XᵀX is symmetric: it is accumulated by row blocks from the diagonal rightwards, 5/8 of the
# full product with 4 blocks (2, 4 and 8 blocks measured on SmolLM2's sizes: 4 is fastest),
# and the lower blocks are copied from the upper ones when the block is flushed.
SYMMETRIC_BLOCKS = 4


def _row_blocks(size: int) -> list[tuple[int, int]]:
    step = -(-size // SYMMETRIC_BLOCKS)
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def add_upper_second_moment(accumulator: torch.Tensor, inputs: torch.Tensor) -> None:
    """accumulator += the upper block triangle of XᵀX (X = `inputs` [n, d_in]), in place, in
    the accumulator's precision: each row block from the diagonal block rightwards."""
    flat = inputs.reshape(-1, inputs.shape[-1]).to(accumulator.dtype)
    for start, stop in _row_blocks(flat.shape[1]):
        accumulator[start:stop, start:].addmm_(flat[:, start:stop].T, flat[:, start:])


def symmetrize_upper(accumulator: torch.Tensor) -> torch.Tensor:
    """Fill the lower blocks of an `add_upper_second_moment` accumulator from the upper ones."""
    for start, stop in _row_blocks(accumulator.shape[0])[1:]:
        accumulator[start:stop, :start] = accumulator[:start, start:stop].T
    return accumulator
