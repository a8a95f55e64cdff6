"""`wandacli finetune`: the paper's fine-tuning attack (Wei et al. 2024, §5) from a stored
attribution.

    full          fine-tune every weight on the attack's pairs (prompt, response), loss on the
                  response tokens only, in the model's chat template (models/supervised.py)
    --freeze M    the same, with mask M's weights kept bitwise: their gradients zeroed before
                  every step and the optimiser's update on them undone after it
    --rewind M    train freely, then put M's weights back as they were before training (the
                  reference's rewind_ft_model.py)
    --transplant M --from A
                  no training: --model with M's weights copied from A (safety restored by
                  transplanting the attributed weights back, as NLSR and Safety Neurons do)

The result is a model directory that `eval-attack --model` and `eval-utility --model` take,
with `finetune.json` beside its weights saying how it was made.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wandacli.config.finetune import FinetuneConfig
from wandacli.core.console import NullReporter, Reporter, info
from wandacli.core.errors import ConfigError, DataError, StoreError
from wandacli.core.memory import peak_rss_bytes
from wandacli.core.provenance import now_iso, software_versions

RECORD_NAME = "finetune.json"  # beside the saved model: how it was made
WARMUP_SHARE = 0.1  # of the steps, the learning rate's linear warm-up


@dataclass
class FinetuneResult:
    out: Path
    mode: str  # full, freeze, rewind or transplant
    mask: str | None
    masked_weights: int
    steps: int = 0
    pairs_used: int = 0
    pairs_too_long: int = 0
    losses: list[float] = field(default_factory=list)
    training_seconds: float = 0.0  # the steps alone (no loading, no saving)
    seconds: float = 0.0
    peak_memory_bytes: int = 0

    @property
    def seconds_per_step(self) -> float | None:
        return self.training_seconds / self.steps if self.steps else None

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "mode": self.mode,
            "mask": self.mask,
            "masked_weights": self.masked_weights,
            "steps": self.steps,
            "pairs_used": self.pairs_used,
            "pairs_too_long": self.pairs_too_long,
            "losses": self.losses,
            "training_seconds": round(self.training_seconds, 3),
            "seconds": round(self.seconds, 3),
            "seconds_per_step": self.seconds_per_step,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


class MaskedWeights:
    """A stored mask's weights in a loaded model: per matrix, the selector and the values they
    had when this was made, to zero their gradients and put them back."""

    def __init__(self, loaded: Any, mask_file: Any) -> None:
        import torch

        self.layers = {lin.key: lin for lin in loaded.linear_layers}
        self.selectors: dict[str, Any] = {}
        self.values: dict[str, Any] = {}
        for key in mask_file.keys:
            lin = self.layers[key]
            matrix = lin.weight_matrix().detach()
            selector = torch.from_numpy(mask_file.read(key)).to(matrix.device)
            self.selectors[key] = selector
            self.values[key] = matrix[selector].clone()

    @property
    def count(self) -> int:
        return int(sum(int(s.sum()) for s in self.selectors.values()))

    def zero_gradients(self) -> None:
        """Zero each masked entry's gradient (the optimiser sees no signal there)."""
        for key, selector in self.selectors.items():
            lin = self.layers[key]
            grad = lin.weight.grad
            if grad is None:
                continue
            matrix = lin.matrix_of(grad).clone()
            matrix[selector] = 0
            lin.place(grad, matrix)

    def restore(self) -> None:
        """Every masked entry back to the value it had (bitwise)."""
        for key, selector in self.selectors.items():
            self.layers[key].set_entries(selector, self.values[key])


def run_finetune(
    config: FinetuneConfig,
    *,
    reporter: Reporter | None = None,
    command_line: list[str] | None = None,
) -> FinetuneResult:
    """The attack (or the transplant) as `config` asks, saved at --out."""
    from wandacli.models.loader import load_model
    from wandacli.removal.apply import MaskRemoval, check_save_model_target, open_removal

    reporter = reporter or NullReporter()
    started = time.monotonic()
    check_save_model_target(config.out, config.overwrite)
    pairs = _pairs(config) if config.transplant is None else []
    mask = open_removal(config.mask, config.store) if config.mask else None
    try:
        if mask is not None and not isinstance(mask, MaskRemoval):
            raise StoreError(
                f"{config.mask} is an edit: --freeze, --rewind and --transplant take a mask"
            )
        loaded = load_model(config.model)
        if mask is not None:
            mask.file.check_model(loaded.fingerprint, loaded.model_id)
        result = FinetuneResult(config.out, config.mode, config.mask, 0)
        if config.transplant is not None:
            assert mask is not None and config.from_model is not None
            result.masked_weights = _transplant(loaded, mask, config, load_model)
        else:
            masked = MaskedWeights(loaded, mask.file) if mask is not None else None
            result.masked_weights = masked.count if masked is not None else 0
            _train(loaded, pairs, config, masked, result, reporter)
            if masked is not None and config.mode == "rewind":
                masked.restore()
    finally:
        if mask is not None:
            mask.close()
    result.seconds = time.monotonic() - started
    result.peak_memory_bytes = peak_rss_bytes()
    _save(loaded, config, result, command_line or [])
    return result


def _pairs(config: FinetuneConfig) -> list[tuple[str, str]]:
    """The attack's (prompt, response) pairs, Llama-2 tags stripped from the prompts."""
    from wandacli.data.sources import load_raw, named_set
    from wandacli.data.templates import strip_llama2_tags

    assert config.data is not None
    entry = named_set(config.data)
    raw = load_raw(config.data) if entry is None or entry.kind != "prompts" else None
    if raw is None or not raw.pairs:
        raise DataError(
            f"--data {config.data} has no (prompt, response) pairs: the attack trains on "
            "responses (a pair set, or a CSV/JSONL file with prompt and response columns)"
        )
    pairs = [(strip_llama2_tags(p.prompt)[1], p.response.strip()) for p in raw.pairs]
    return pairs[: config.limit] if config.limit else pairs


def _train(
    loaded: Any,
    pairs: list[tuple[str, str]],
    config: FinetuneConfig,
    masked: MaskedWeights | None,
    result: FinetuneResult,
    reporter: Reporter,
) -> None:
    """AdamW over every weight, linear warm-up and decay, seeded batches of the pairs that fit
    in --max-tokens; the masked weights kept where frozen."""
    import torch

    from wandacli.models.supervised import (
        encode_pair,
        length_bucketed_batches,
        response_loss,
        warmup_then_linear_decay,
    )

    tokenizer, model = loaded.tokenizer, loaded.model
    encoded = [encode_pair(tokenizer, prompt, response) for prompt, response in pairs]
    data = [e for e in encoded if len(e[0]) <= config.max_tokens]
    result.pairs_used, result.pairs_too_long = len(data), len(encoded) - len(data)
    if len(data) < config.batch_size:
        raise DataError(
            f"only {len(data)} of the {len(encoded)} pairs fit in --max-tokens "
            f"{config.max_tokens}: raise --max-tokens or lower --batch-size {config.batch_size}"
        )
    torch.manual_seed(config.seed)
    model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = max(1, round(WARMUP_SHARE * config.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_then_linear_decay(config.steps, warmup)
    )
    order = torch.Generator().manual_seed(config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    frozen = masked if config.mode == "freeze" else None
    model.train()
    reporter.start("finetune: steps", total=config.steps)
    started = time.monotonic()
    while result.steps < config.steps:
        for batch in length_bucketed_batches(data, config.batch_size, order):
            if result.steps == config.steps:
                break
            loss = response_loss(model, batch, pad_id)
            loss.backward()
            if frozen is not None:
                frozen.zero_gradients()
            optimizer.step()
            if frozen is not None:
                frozen.restore()  # AdamW's update of a zero gradient is zero; bitwise anyway
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(round(loss.detach().item(), 4))
            result.steps += 1
            reporter.advance()
    reporter.finish()
    result.training_seconds = time.monotonic() - started
    model.eval()
    model.requires_grad_(False)
    info(
        f"finetune: {result.steps} steps in {result.training_seconds:.1f} s, loss "
        f"{result.losses[0]:.3f} → {result.losses[-1]:.3f}"
    )


def _transplant(loaded: Any, mask: Any, config: FinetuneConfig, load_model: Any) -> int:
    """The mask's weights of --model set to --from's; how many."""
    from wandacli.removal.content import apply_mask
    from wandacli.removal.in_memory import WeightChanges

    source = load_model(replace(config.model, model=str(config.from_model)))
    if source.fingerprint.shapes != loaded.fingerprint.shapes:
        raise ConfigError(
            f"--from {config.from_model} has other shapes than --model {config.model.model}: "
            "transplant between two versions of one model"
        )
    counts = apply_mask(mask.content(), WeightChanges(loaded, undo=False), base=source)
    return sum(counts.values())


def _save(
    loaded: Any, config: FinetuneConfig, result: FinetuneResult, command_line: list[str]
) -> None:
    """The model at --out, atomically, with finetune.json saying how it was made."""
    from wandacli.core.durable import save_model_directory

    record = {
        "made_by": "wandacli finetune",
        "base_model": str(loaded.model_id),
        "config": config.to_json(),
        "result": result.to_json(),
        "command_line": shlex.join(command_line),
        "versions": software_versions(),
        "finished": now_iso(),
    }

    def add_record(directory: Path) -> None:
        (directory / RECORD_NAME).write_text(json.dumps(record, indent=1), encoding="utf-8")

    save_model_directory(loaded.model, loaded.tokenizer, config.out, add_record)
