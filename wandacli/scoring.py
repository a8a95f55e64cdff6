"""Score math as pure tensor functions, and the hooks that gather the statistics it needs.

Every score is shaped like the weight it scores, [out_features, in_features], float32.

- wanda:     |W| · sqrt(s),  s_j = (1/N) Σ_samples Σ_counted tokens x_j²  (x: the layer's input)
- wandg:     |W| · Σ_samples |∂L_n/∂W|  (SNIP; L_n: mean cross-entropy over sample n's
             counted tokens)
- magnitude: |W|
- random:    uniform [0, 1), seeded per (seed, layer, module) so any subset can be recomputed

`|W|` is `|W - W_base|` under `--use-diff`.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from wandacli.data import IGNORE_INDEX
from wandacli.models import LinearLayer

# ---------------------------------------------------------------------------------------------
# Pure math


def weight_magnitude(weight: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """|W| (or |W - W_base|) in float32."""
    weight = weight.detach().float()
    if base_weight is not None:
        return (weight - base_weight.detach().to(weight.device).float()).abs_()
    return weight.abs()


def wanda_scores(magnitude: torch.Tensor, sq_norm_sum: torch.Tensor, nsamples: int) -> torch.Tensor:
    """Wanda: |W| · sqrt(s) with s = (sum over samples of squared input norms per column) / N."""
    mean_sq_norm = sq_norm_sum.float() / float(nsamples)
    return magnitude * torch.sqrt(mean_sq_norm).reshape(1, -1)


def snip_scores(magnitude: torch.Tensor, grad_abs_sum: torch.Tensor) -> torch.Tensor:
    """SNIP (wandg): |W| · Σ|∂L/∂W|."""
    return magnitude * grad_abs_sum.float()


def random_scores(shape: tuple[int, int], seed: int, key: str) -> torch.Tensor:
    """Uniform [0, 1) scores from a generator seeded by (seed, layer/module), so a layer's scores
    do not depend on which layers were computed before it (resume, filters)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    generator = torch.Generator().manual_seed(
        int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    )
    return torch.rand(shape, generator=generator, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Forward passes


_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model can compute logits for chosen positions only (transformers ≥ 4.50)."""
    cls = type(model)
    if cls not in _FORWARD_PARAMETERS:
        _FORWARD_PARAMETERS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return "logits_to_keep" in _FORWARD_PARAMETERS[cls]


def sample_loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not -100: the loss transformers
    computes from `labels`, with logits computed only at the positions that predict a counted
    token (prompt positions would cost a vocabulary projection each and count for nothing)."""
    if not accepts_logits_to_keep(model):
        return model(input_ids=input_ids, labels=labels, use_cache=False).loss
    # Position t predicts token t+1: keep the positions whose next label counts.
    positions = torch.nonzero(labels[0, 1:].ne(IGNORE_INDEX)).squeeze(1)
    targets = labels[0, positions + 1]
    logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=positions).logits
    # Under a device map the head may sit on another device than the inputs.
    return torch.nn.functional.cross_entropy(logits[0].float(), targets.to(logits.device))


# ---------------------------------------------------------------------------------------------
# Wanda: squared input norms through forward pre-hooks


class ActivationStatistics:
    """Sums of squared inputs per column, per linear layer, over the counted tokens.

    One forward pass over a sample updates every layer at once. Layers that share an input
    (q/k/v, gate/up) compute it once per sample.
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
        handles = [lin.module.register_forward_pre_hook(self._hook(lin.key)) for lin in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._last_input = self._last_sum = None

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


# ---------------------------------------------------------------------------------------------
# wandg: |grad| summed as each gradient arrives


class GradientAccumulator:
    """Σ_samples |∂L_n/∂W| in float32 for a group of linear layers.

    Each weight's gradient is added to its accumulator the moment autograd finishes it and is
    then freed, so peak memory stays near weights + accumulators + one gradient.
    """

    def __init__(self, layers: list[LinearLayer], *, offload: bool = False) -> None:
        self.layers = layers
        # Accumulators in the module's own weight layout (Conv1D: transposed); see
        # `scores_layout`. With `offload`, in CPU memory: each gradient is copied there as it
        # arrives (slower, but a GPU then holds only the model and one gradient).
        self.sums: dict[str, torch.Tensor] = {
            lin.key: torch.zeros_like(
                lin.weight, dtype=torch.float32, device="cpu" if offload else None
            )
            for lin in layers
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
        for lin in self.layers:
            weight = lin.weight
            weight.requires_grad_(True)
            weight.grad = None
            handles.append(weight.register_post_accumulate_grad_hook(self._hook(lin.key)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for lin in self.layers:
                lin.weight.requires_grad_(False)
                lin.weight.grad = None

    def observe(self, model: Any, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        """One forward and backward over one sample; the loss is the model's mean cross-entropy
        over the tokens whose label is not -100."""
        with torch.enable_grad():
            sample_loss(model, input_ids, labels).backward()

    def scores_layout(self, lin: LinearLayer) -> torch.Tensor:
        """The accumulator as [out_features, in_features]."""
        total = self.sums[lin.key]
        return total.t() if lin.transposed else total


# ---------------------------------------------------------------------------------------------
# actsvd: second moments of the linear layers' inputs


class _GroupDone(Exception):
    """Raised by the last hook of a layer group: the rest of the forward pass is not needed."""


def shared_inputs(model: Any, layers: list[LinearLayer], device: Any) -> dict[str, str]:
    """Which linear layers read the same input tensor (q/k/v, gate/up, ...): key → the key of the
    first layer, in model order, that reads it. Found with one forward pass over two tokens, so
    it holds for any architecture the loader knows."""
    first_reader: dict[int, str] = {}
    owner: dict[str, str] = {}
    seen: list[torch.Tensor] = []  # held so that no id is reused during the pass

    def hook(key: str) -> Any:
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            seen.append(x)
            owner[key] = first_reader.setdefault(id(x), key)

        return pre_hook

    handles = [lin.module.register_forward_pre_hook(hook(lin.key)) for lin in layers]
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
        self._blocks = {
            lin.key: torch.zeros(
                (lin.shape[1], lin.shape[1]), dtype=torch.float32, device=lin.weight.device
            )
            for lin in self.readers
        }
        self._pending = 0  # samples in the float32 blocks
        self._counted: torch.Tensor | None = None
        self._last_key = self.readers[-1].key if stop_early and self.readers else None

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
        from wandacli.ranks import symmetrize_upper

        for key, block in self._blocks.items():
            self.sums[key].add_(symmetrize_upper(block).to(torch.float64))
            block.zero_()
        self._pending = 0

    def _hook(self, key: str) -> Any:
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            from wandacli.ranks import add_upper_second_moment

            flat = args[0].detach().reshape(-1, args[0].shape[-1])
            if self._counted is not None:
                flat = flat[self._counted.to(flat.device)]
            block = self._blocks[key]
            add_upper_second_moment(block, flat.to(block.device))
            if key == self._last_key:
                raise _GroupDone

        return pre_hook

    @contextmanager
    def recording(self) -> Iterator[None]:
        handles = [
            lin.module.register_forward_pre_hook(self._hook(lin.key)) for lin in self.readers
        ]
        try:
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
        """C = (1/N) Σ x xᵀ for the input layer `key` reads (float64)."""
        self.flush()
        return self.sums[self.owners[key]] / max(self.tokens, 1)
