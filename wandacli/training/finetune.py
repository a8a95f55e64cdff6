"""`wandacli finetune`: the paper's fine-tuning attack (Wei et al. 2024, §5) from a stored
attribution.

    full          fine-tune every weight on the attack's pairs (prompt, response), loss on the
                  response tokens only, in the model's chat template (models/supervised.py)
    --freeze M    the same, with mask M's weights kept bitwise: their gradients zeroed before
                  every step and the optimiser's update on them undone after it
    --rewind M    train freely, then put M's weights back as they were before training (the
                  reference's rewind_ft_model.py)
    --lora-rank R peft's LoRA adapters trained instead of every weight, saved merged; a mask
                  acts on the merged delta (training/lora.py)
    --transplant M --from A
                  no training: --model with M's weights copied from A (safety restored by
                  transplanting the attributed weights back, as NLSR and Safety Neurons do)

The result is a model directory that `eval-attack --model` and `eval-utility --model` take,
with `finetune.json` beside its weights saying how it was made.

Several GPUs: `torchrun --nproc-per-node N -m wandacli finetune ...` (or `accelerate launch`)
trains data-parallel (core/distributed.py). Every process holds the model and draws the same
batches from the seed; each takes every N-th pair of a batch, its loss the summed cross-entropy
of its pairs over the whole batch's response tokens, and the gradients are summed across the
processes before each step: the step one process takes on the whole batch, up to the order of
the sums. Rank 0 generates the pairs, writes the checkpoints and saves the models. A model too
large for one GPU is spread over several by one process with --device-map instead.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wandacli.config.finetune import FinetuneConfig
from wandacli.core.console import NullReporter, Reporter, info, warn
from wandacli.core.errors import ConfigError, DataError, StoreError
from wandacli.core.memory import peak_rss_bytes
from wandacli.core.provenance import now_iso, software_versions
from wandacli.training.attack_pairs import attack_pairs

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
    trained_parameters: int = 0  # every weight in full fine-tuning; the adapters' in LoRA
    losses: list[float] = field(default_factory=list)
    training_seconds: float = 0.0  # the steps alone (no loading, no saving)
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    processes: int = 1  # torchrun's processes, each training on its share of every batch
    rank: int = 0  # this process's (rank 0 reports)
    data: dict[str, Any] = field(default_factory=dict)  # where the pairs came from
    saved_steps: list[str] = field(default_factory=list)  # --save-steps' model directories

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
            "data": self.data,
            "pairs_used": self.pairs_used,
            "pairs_too_long": self.pairs_too_long,
            "trained_parameters": self.trained_parameters,
            "losses": self.losses,
            "saved_steps": self.saved_steps,
            "training_seconds": round(self.training_seconds, 3),
            "seconds": round(self.seconds, 3),
            "seconds_per_step": self.seconds_per_step,
            "peak_memory_bytes": self.peak_memory_bytes,
            "processes": self.processes,
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
        self.put(self.values)

    def current(self) -> dict[str, Any]:
        """The masked entries' values as they are now."""
        return {
            key: self.layers[key].weight_matrix().detach()[selector].clone()
            for key, selector in self.selectors.items()
        }

    def put(self, values: dict[str, Any]) -> None:
        for key, selector in self.selectors.items():
            self.layers[key].set_entries(selector, values[key])


def run_finetune(
    config: FinetuneConfig,
    *,
    reporter: Reporter | None = None,
    command_line: list[str] | None = None,
) -> FinetuneResult:
    """The attack (or the transplant) as `config` asks, saved at --out (by rank 0 of a
    multi-process run; every rank returns its result)."""
    from wandacli.core import distributed
    from wandacli.removal.apply import check_save_model_target

    reporter = reporter or NullReporter()
    started = time.monotonic()
    check_save_model_target(config.out, config.overwrite)
    group = distributed.from_environment(config.model.device)
    try:
        _check_processes(config, group)
        return _attack_or_transplant(config, group, reporter, command_line or [], started)
    finally:
        if group.active:
            distributed.shutdown()


def _check_processes(config: FinetuneConfig, group: Any) -> None:
    """What an attack over torchrun's processes cannot do, refused in one line on every
    rank."""
    if not group.active:
        return
    if config.transplant is not None:
        raise ConfigError("--transplant trains nothing: run it as one process, without torchrun")
    if config.model.device_map is not None:
        raise ConfigError(
            "each of torchrun's processes holds the whole model: drop --device-map, or run one "
            "process with --device-map to spread the model over the GPUs"
        )
    if config.batch_size < group.world_size:
        raise ConfigError(
            f"--batch-size {config.batch_size} is split across {group.world_size} processes: "
            f"give at least {group.world_size}"
        )


def _attack_or_transplant(
    config: FinetuneConfig, group: Any, reporter: Reporter, command_line: list[str], started: float
) -> FinetuneResult:
    from wandacli.models.loader import load_model
    from wandacli.removal.apply import MaskRemoval, open_removal

    spec = config.model
    if group.device.startswith("cuda"):  # this rank's own GPU
        spec = replace(spec, device=group.device)
    if config.transplant is None and config.model.dtype in ("bfloat16", "float16"):
        warn(
            f"--dtype {config.model.dtype}: the weights take AdamW's steps in {config.model.dtype}, "
            "where updates much smaller than a weight are lost; --dtype auto trains in float32"
        )
    if config.ignored_by_transplant:
        warn(f"--transplant trains on nothing: {', '.join(config.ignored_by_transplant)} not read")
    mask = open_removal(config.mask, config.store) if config.mask else None
    try:
        if mask is not None and not isinstance(mask, MaskRemoval):
            raise StoreError(
                f"{config.mask} is an edit: --freeze, --rewind and --transplant take a mask"
            )
        data = None
        if config.transplant is None:  # rank 0 generates (and caches) them, the others read
            if not group.is_main:
                group.barrier()
            data = attack_pairs(config, reporter)
            if group.is_main:
                group.barrier()
        loaded = load_model(spec)
        if mask is not None:
            mask.file.check_model(loaded.fingerprint, loaded.model_id)
        result = FinetuneResult(config.out, config.mode, config.mask, 0)
        result.processes, result.rank = group.world_size, group.rank
        if config.transplant is not None:
            assert mask is not None and config.from_model is not None
            result.masked_weights = _transplant(loaded, mask, config, load_model)
        else:
            masked = MaskedWeights(loaded, mask.file) if mask is not None else None
            result.masked_weights = masked.count if masked is not None else 0
            assert data is not None
            result.data = data.source
            _train(loaded, data.pairs, config, masked, result, reporter, group)
    finally:
        if mask is not None:
            mask.close()
    result.seconds = time.monotonic() - started
    result.peak_memory_bytes = peak_rss_bytes()
    if group.is_main:
        _save(loaded, config, result, command_line)
        TrainingCheckpoint(config).remove()  # the model is saved: nothing left to resume
    group.barrier()  # no rank ends before the model is saved
    return result


def _train(
    loaded: Any,
    pairs: list[tuple[str, str]],
    config: FinetuneConfig,
    masked: MaskedWeights | None,
    result: FinetuneResult,
    reporter: Reporter,
    group: Any,
) -> None:
    """AdamW over every weight, linear warm-up and decay, seeded batches of the pairs that fit
    in --max-tokens; the masked weights kept where frozen. Resumed from --out's checkpoint
    when one of the same request is there; the models `--save-steps` asks for saved on the
    way."""
    import torch

    from wandacli.core.errors import interruptible
    from wandacli.models.supervised import (
        encode_pair,
        length_bucketed_batches,
        response_loss,
        response_tokens,
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
    torch.manual_seed(config.seed)  # the adapters' initialisation, then dropout
    lora = _adapters(loaded, config, masked)
    if lora is None:
        model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    result.trained_parameters = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = max(1, round(WARMUP_SHARE * config.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_then_linear_decay(config.steps, warmup)
    )
    checkpoint = TrainingCheckpoint(config)
    skip = checkpoint.resume(model, optimizer, scheduler, result)
    order = torch.Generator().manual_seed(config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Full fine-tuning keeps frozen weights by their gradients; LoRA by its masked delta.
    frozen = masked if config.mode == "freeze" and lora is None else None
    model.train()
    reporter.start("finetune: steps", total=config.steps)
    reporter.advance(result.steps)
    started = time.monotonic() - result.training_seconds
    with interruptible(checkpoint.what_is_kept):
        while result.steps < config.steps:
            for batch in length_bucketed_batches(data, config.batch_size, order):
                if skip:  # a resumed run: the batches the checkpoint had trained on
                    skip -= 1
                    continue
                if result.steps == config.steps:
                    break
                if group.active:
                    share = batch[group.rank :: group.world_size]
                    loss = response_loss(model, share, pad_id, out_of=response_tokens(batch))
                    loss.backward()
                    loss = _sum_over_processes(group, params, loss)
                else:
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
                result.training_seconds = time.monotonic() - started
                reporter.advance()
                if result.steps in config.save_steps and group.is_main:
                    _save_step(loaded, config, masked, result, lora)
                every = config.checkpoint_every
                due = every and result.steps % every == 0 and result.steps < config.steps
                if due and group.is_main:
                    checkpoint.write(model, optimizer, scheduler, result)
    reporter.finish()
    model.eval()
    if lora is not None:
        lora.merge()
    model.requires_grad_(False)
    if masked is not None and config.mode in ("freeze", "rewind"):
        masked.restore()  # rewound; frozen weights are already theirs (bitwise), except in LoRA
    info(
        f"finetune: {result.steps} steps in {result.training_seconds:.1f} s, loss "
        f"{result.losses[0]:.3f} → {result.losses[-1]:.3f}"
    )


def _sum_over_processes(group: Any, params: list[Any], loss: Any) -> Any:
    """Each trainable parameter's gradient, and the loss, summed over the processes (each
    process's part of the batch's loss is already divided by the whole batch's tokens)."""
    import torch

    for p in params:
        if p.grad is None:  # a parameter this process's pairs did not reach
            p.grad = torch.zeros_like(p)
    total = loss.detach().clone()
    group.all_reduce_sum([p.grad for p in params] + [total])
    return total


def _adapters(loaded: Any, config: FinetuneConfig, masked: MaskedWeights | None) -> Any:
    """LoRA's adapters injected into the model (training/lora.py), or None for full
    fine-tuning."""
    if not config.lora_rank:
        return None
    from wandacli.training.lora import LoraAdapters

    frozen = masked if config.mode == "freeze" else None
    return LoraAdapters(loaded, config.lora_rank, config.lora_scale_alpha, frozen)


def _trainable(model: Any) -> dict[str, Any]:
    """The parameters training changes, by name: every one in full fine-tuning, the adapters'
    in LoRA. A checkpoint holds these alone."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


class TrainingCheckpoint:
    """The training state at a step, beside --out (OUT.checkpoint/state.pt, written atomically):
    weights, optimiser, schedule, torch's random state and the losses so far, with the request
    it belongs to. The batches are not stored: they are drawn again from the seed and the ones
    already trained on skipped, so a resumed run trains on the same batches in the same order."""

    FILE = "state.pt"

    def __init__(self, config: FinetuneConfig) -> None:
        self.directory = config.checkpoint_dir
        # What changes the weights: a checkpoint of any other request is not resumed.
        ignored = {"out", "overwrite", "checkpoint_every", "save_steps"}
        self.request = {k: v for k, v in config.to_json().items() if k not in ignored}
        self.step: int | None = None

    def what_is_kept(self) -> str:
        if self.step is None:
            return "no training state was kept yet (--checkpoint-every); rerun from the start"
        return (
            f"the training state after step {self.step} is kept in {self.directory}; "
            "the same command resumes from it"
        )

    def resume(self, model: Any, optimizer: Any, scheduler: Any, result: FinetuneResult) -> int:
        """Load the state when one of this request is there; the batches to skip."""
        import torch

        path = self.directory / self.FILE
        if not path.is_file():
            return 0
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("request") != self.request:
            raise ConfigError(
                f"{self.directory} holds the training state of another request: rerun that "
                "command to resume it, or delete the folder to start this one"
            )
        trainable = _trainable(model)
        if set(state["trainable"]) != set(trainable):
            raise ConfigError(
                f"{self.directory} holds other parameters than this model trains: delete the "
                "folder to start again"
            )
        with torch.no_grad():
            for name, value in state["trainable"].items():
                trainable[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        result.steps, result.losses = state["steps"], list(state["losses"])
        result.training_seconds = state["training_seconds"]
        result.saved_steps = list(state["saved_steps"])
        self.step = result.steps
        info(f"finetune: resumed from step {result.steps} ({self.directory})")
        return result.steps

    def write(self, model: Any, optimizer: Any, scheduler: Any, result: FinetuneResult) -> None:
        import os

        import torch

        self.directory.mkdir(parents=True, exist_ok=True)
        state = {
            "request": self.request,
            "steps": result.steps,
            "losses": result.losses,
            "training_seconds": result.training_seconds,
            "saved_steps": result.saved_steps,
            "trainable": _trainable(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        partial = self.directory / (self.FILE + ".partial")
        torch.save(state, partial)
        os.replace(partial, self.directory / self.FILE)
        self.step = result.steps

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)


def _save_step(
    loaded: Any,
    config: FinetuneConfig,
    masked: MaskedWeights | None,
    result: FinetuneResult,
    lora: Any | None,
) -> None:
    """The model after this step as the attack leaves it (its masked weights rewound where
    --rewind; LoRA's adapters merged, the mask on their delta), saved as OUT-stepK; training
    goes on from the weights as they were."""
    if lora is not None:
        restored = masked if config.mode in ("freeze", "rewind") else None
        with lora.merged(restored):
            _save_step(loaded, config, None, result, None)
        return

    import shutil

    rewound = masked if config.mode == "rewind" else None
    trained = rewound.current() if rewound is not None else None
    if rewound is not None:
        rewound.restore()
    record = {
        "made_by": "wandacli finetune",
        "base_model": str(loaded.model_id),
        "config": config.to_json(),
        "step": result.steps,
        "losses": list(result.losses),
    }
    target = config.step_dir(result.steps)
    shutil.rmtree(target, ignore_errors=True)  # a resumed run saves the step again
    _save_model(loaded, config, target, record, result.steps)
    if rewound is not None and trained is not None:
        rewound.put(trained)
    result.saved_steps.append(str(target))


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
    record = {
        "made_by": "wandacli finetune",
        "base_model": str(loaded.model_id),
        "config": config.to_json(),
        "result": result.to_json(),
        "command_line": shlex.join(command_line),
        "versions": software_versions(),
        "finished": now_iso(),
    }
    _save_model(loaded, config, config.out, record, _steps_behind(config, result))


def _save_model(
    loaded: Any, config: FinetuneConfig, out: Path, record: dict[str, Any], step: int
) -> None:
    """A model directory with finetune.json (`record`) and the provenance every eval command
    reads (removal/apply.py): which aligned model it was made from, which measures its word
    salad and its KL, and what the attack was, which `report` draws against the steps."""
    from wandacli.core.durable import save_model_directory
    from wandacli.removal.apply import DENSE_MODEL_KEY, FINETUNE_KEY, PROVENANCE_NAME

    aligned = _aligned_model(loaded, config)
    provenance = {
        DENSE_MODEL_KEY: aligned,
        FINETUNE_KEY: {
            "aligned_model": aligned,  # the attack's step 0, which `report` draws it from
            "mode": config.mode,
            "mask": config.mask,
            "step": step,
            "steps": config.steps,
            "out": str(config.out),
        },
    }

    def add_record(directory: Path) -> None:
        (directory / RECORD_NAME).write_text(json.dumps(record, indent=1), encoding="utf-8")
        (directory / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=1), encoding="utf-8")

    save_model_directory(loaded.model, loaded.tokenizer, out, add_record)


def _steps_behind(config: FinetuneConfig, result: FinetuneResult) -> int:
    """The fine-tuning steps the saved model is after: its own, or for a transplant, those of
    the attacked model it restored (so that `report` draws it at the attack's end)."""
    from wandacli.removal.apply import FINETUNE_KEY, read_provenance

    if config.transplant is None:
        return result.steps
    attack = (read_provenance(Path(config.model.model)) or {}).get(FINETUNE_KEY) or {}
    return int(attack.get("step", 0))


def _aligned_model(loaded: Any, config: FinetuneConfig) -> str:
    """The model before any attack: --from for a transplant; else the one --model was made
    from where it records one (an attacked or pruned model), else --model itself."""
    from wandacli.removal.apply import DENSE_MODEL_KEY, read_provenance

    if config.from_model is not None:
        return str(config.from_model)
    recorded = (read_provenance(Path(config.model.model)) or {}).get(DENSE_MODEL_KEY)
    return str(recorded or loaded.model_id)
