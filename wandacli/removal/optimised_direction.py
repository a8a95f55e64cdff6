"""Refusal direction optimisation (RDO; Wollschläger et al. 2025, "The Geometry of Refusal in
Large Language Models"): the difference-in-means direction, or the K principal directions of
`--directions K` (a cone's span), refined by gradient on three losses, on the prompts of the
two mean-activations sets it came from:

- ablation: with the span removed from every writer's output and from the embedding (the edit
  `prune` makes of it, at full weight), the cross-entropy of the harmful prompts' targets,
  the responses the model gives with the starting span removed (it should still comply);
- addition: with α v added to the residual stream at the direction's layer, v a random
  direction of the cone (a basis vector when K = 1) and α the norm of the difference of the
  means there, the cross-entropy of the harmless prompts' targets, the responses the model
  gives with the starting direction added (it should still refuse: the span stays one that
  carries refusal, not any span that keeps the harmless prompts as they were);
- retain: with the span removed, KL(dense ‖ edited) of the next-token distributions over the
  harmless prompts' own greedy responses, the cost the search measures.

The model's weights stay as they are: the removal and the addition are forward hooks, and only
the [d, K] basis has a gradient (Adam; the basis orthonormalised by QR in every step).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from wandacli.core.console import info
from wandacli.core.errors import ConfigError
from wandacli.removal.direction import orthonormal

RULE = (
    "the starting r (or the K directions) refined by Adam on λ_ablation · CE(harmful prompts' "
    "responses with the starting span removed | span removed from every writer and the "
    "embedding) + λ_addition · CE(harmless prompts' responses with α r added | α v added to the "
    "stream at the direction's layer, v a random direction of the cone, α = ‖μ_harmful − "
    "μ_harmless‖ there) + λ_retain · KL(dense ‖ span removed) over the harmless prompts' "
    "greedy responses; the basis orthonormalised by QR every step (Wollschläger et al. 2025's "
    "refusal direction optimisation)"
)


def sliced_writer(writer: Any) -> ConfigError:
    """The refusal of a writer that is a slice of a parameter (an expert's matrix): the
    training's hooks project whole modules' outputs."""
    return ConfigError(
        f"--direction-optimise removes the span from whole writer modules; {writer.key} is "
        f"part of {writer.module_name} (experts, fused matrices): leave --direction-optimise "
        "out for this model"
    )


@dataclasses.dataclass(frozen=True)
class Optimisation:
    """How the direction is refined: its steps, Adam's learning rate, the three losses'
    weights, the targets' length and the prompts per loss and step."""

    steps: int
    learning_rate: float = 0.01
    ablation_weight: float = 1.0
    addition_weight: float = 0.2
    retain_weight: float = 1.0
    target_tokens: int = 24
    batch_size: int = 8
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rule": RULE}


def cache_key(
    loaded: Any,
    sets: Any,
    start: torch.Tensor,
    layer: int,
    embedding: bool,
    settings: Optimisation,
) -> str:
    """A digest of everything the training reads: the model (its shapes and a sample of its
    weights rounded to bfloat16, so that a search in one dtype and the `prune` of its kept point
    in the checkpoint's own read one training: the kept point is the trial), the two sets (their
    names and when they finished), the writers, the start, the layer and the settings."""
    import hashlib
    import json

    from wandacli.models.pretrained import weights_sample_digest

    described = {
        "model": loaded.model_id,
        "fingerprint": loaded.fingerprint.digest,
        "weights": weights_sample_digest(loaded, rounded_to=torch.bfloat16),
        "sets": [(s.name, s.meta.get("finished")) for s in (sets.primary, sets.secondary)],
        "writers": sorted(sets.keys),
        "layer": layer,
        "embedding": embedding,
        "settings": settings.to_json(),
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    digest.update(start.double().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def read_cached(path: Path) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """A basis trained before (None where there is none, or it cannot be read)."""
    import json

    import numpy as np

    if not path.is_file():
        return None
    try:
        with np.load(path) as stored:
            basis = torch.from_numpy(stored["basis"].astype(np.float64))
            record = json.loads(str(stored["record"]))
    except (OSError, ValueError, KeyError):
        return None
    return basis, record


def write_cached(path: Path, basis: torch.Tensor, record: dict[str, Any]) -> None:
    import io
    import json

    import numpy as np

    from wandacli.core.durable import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, basis=basis.numpy(), record=np.array(json.dumps(record)))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def set_prompt_ids(means: Any, tokenizer: Any) -> list[list[int]]:
    """The token ids of the prompts a mean-activations set averaged over, rebuilt from the
    data, rows and template its file records (as `score` built them)."""
    from wandacli.config.settings import Columns
    from wandacli.data.sources import load_raw
    from wandacli.data.templates import build_prompt, strip_llama2_tags

    meta = means.meta
    config, data = meta.get("config") or {}, meta.get("data") or {}
    indices = data.get("indices")
    if not config.get("data") or indices is None:
        raise ConfigError(
            f"{means.name} does not record its prompts' rows (made by an older wandacli): score "
            "it again to optimise a direction from it"
        )
    columns = Columns(**config["columns"]) if config.get("columns") else None
    directory = config.get("data_dir")
    raw = load_raw(
        config["data"], columns=columns, directory=Path(directory) if directory else None
    )
    prompts = [pair.prompt for pair in raw.pairs] if raw.kind == "pairs" else list(raw.texts)
    template = "chat" if meta.get("template", config.get("template")) == "chat" else "llama2"
    rows = []
    for index in indices:
        _, user = strip_llama2_tags(prompts[int(index)])
        text, special = build_prompt(
            tokenizer, user, template=template, system=None, inst=True, suffix=None
        )
        rows.append(list(tokenizer(text, add_special_tokens=special).input_ids))
    return rows


def optimise(
    loaded: Any,
    start: torch.Tensor,
    *,
    harmful: Sequence[list[int]],
    harmless: Sequence[list[int]],
    writers: Sequence[Any],
    layer: int,
    addition_norm: float,
    embedding: bool,
    settings: Optimisation,
    reporter: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The refined basis [d, K] (float64, orthonormal, each column signed to agree with the
    start's) and a record of the losses before and after. `writers` are the modules whose
    outputs lose the span (`LinearLayer`s of whole modules); `layer` is the residual stream
    (hidden_states index) the addition goes into."""
    model = loaded.model
    basis0 = orthonormal(start.reshape(start.shape[0], -1))
    generator = torch.Generator().manual_seed(settings.seed)
    pad = int(loaded.tokenizer.pad_token_id)
    hooks = SpanHooks(
        model, writers, family=loaded.fingerprint.family, layer=layer, embedding=embedding
    )
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    info(
        f"direction optimisation: {settings.steps} steps at stream {layer} on "
        f"{len(harmful)} harmful and {len(harmless)} harmless prompts (once; kept in the store)"
    )
    try:
        reporter.start("direction optimisation: targets", total=3)
        with hooks.removing(basis0):
            harmful_targets = _greedy(loaded, harmful, settings.target_tokens, pad)
        reporter.advance()
        r0 = basis0[:, 0]
        with hooks.adding(r0 * addition_norm):
            refusal_targets = _greedy(loaded, harmless, settings.target_tokens, pad)
        reporter.advance()
        retain_targets = _greedy(loaded, harmless, settings.target_tokens, pad)
        with torch.no_grad():
            dense = [
                _log_probs(loaded, batch, pad).detach()
                for batch in _batches(retain_targets, settings.batch_size)
            ]
        reporter.advance()
        reporter.finish()

        parameter = torch.nn.Parameter(basis0.float().clone())
        optimiser = torch.optim.Adam([parameter], lr=settings.learning_rate)
        losses: dict[str, list[float]] = {"ablation": [], "addition": [], "retain": []}
        reporter.start("direction optimisation: steps", total=settings.steps)
        for _ in range(settings.steps):
            # Each column signed as the parameter's (QR's own sign is free): the addition
            # needs the direction's own sign.
            q = orthonormal(parameter)
            picked = _pick(len(harmful_targets), settings.batch_size, generator)
            with hooks.removing(q):
                ablation = _cross_entropy(loaded, [harmful_targets[i] for i in picked], pad)
            weights = torch.rand(q.shape[1], generator=generator, dtype=torch.float32)
            v = q @ weights.to(q.dtype)
            v = v / v.norm()
            picked = _pick(len(refusal_targets), settings.batch_size, generator)
            with hooks.adding(v * addition_norm):
                addition = _cross_entropy(loaded, [refusal_targets[i] for i in picked], pad)
            picked = _pick(len(retain_targets), settings.batch_size, generator)
            with hooks.removing(q):
                retain = _retain(loaded, retain_targets, dense, picked, settings.batch_size, pad)
            loss = (
                settings.ablation_weight * ablation
                + settings.addition_weight * addition
                + settings.retain_weight * retain
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            for name, value in (("ablation", ablation), ("addition", addition), ("retain", retain)):
                losses[name].append(float(value.detach()))
            reporter.advance()
        reporter.finish()
        info(
            f"direction optimisation: {settings.steps} steps; ablation "
            f"{_span(losses['ablation'])}, addition {_span(losses['addition'])}, retain "
            f"{_span(losses['retain'])} (first → last)"
        )
    finally:
        hooks.close()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    refined = orthonormal(parameter.detach())
    record = {
        **settings.to_json(),
        "layer": layer,
        "trained_in": str(loaded.dtype).removeprefix("torch."),
        "addition_norm": addition_norm,
        "prompts": {"harmful": len(harmful), "harmless": len(harmless)},
        "losses_first": {k: v[0] for k, v in losses.items() if v},
        "losses_last": {k: v[-1] for k, v in losses.items() if v},
        "cosine_to_start": [float(c) for c in (refined * basis0).sum(0)],
    }
    return refined, record


class SpanHooks:
    """The forward hooks of one optimisation: the span removed from every writer's output
    (and the embedding's) as the edit removes it, or a vector added to the residual stream at
    one layer. A writer followed by a norm of scale g (Gemma-2/3, OLMo-2) loses the span of
    g ⊙ R, as its family's treatment says; its bias is part of its output, projected the same
    way, as the edit projects it; a tied output head reads the edited embedding."""

    def __init__(
        self, model: Any, writers: Sequence[Any], *, family: str, layer: int, embedding: bool
    ) -> None:
        from wandacli.models.families import family_named
        from wandacli.models.layers import decoder_layers
        from wandacli.removal.in_memory import writer_norm_scale

        declared = family_named(family)
        self.writers: list[tuple[Any, torch.Tensor | None]] = []
        for writer in writers:
            if writer.module_name is not None:
                raise sliced_writer(writer)
            treatment = declared.writer_treatment(writer.key.split("/", 1)[1])
            self.writers.append((writer.module, writer_norm_scale(model, writer.layer, treatment)))
        self.embedding = model.get_input_embeddings() if embedding else None
        # A tied output head is the embedding's tensor: the edit changes it with the embedding.
        head = model.get_output_embeddings()
        tied = (
            self.embedding is not None
            and head is not None
            and head.weight.data_ptr() == self.embedding.weight.data_ptr()
        )
        self.tied_head = head if tied else None
        layers = decoder_layers(model)
        if not 0 <= layer <= len(layers):
            raise ConfigError(f"--direction-layer {layer} is outside the streams 0..{len(layers)}")
        self.stream = model.get_input_embeddings() if layer == 0 else layers[layer - 1]
        self.handles: list[Any] = []

    @contextlib.contextmanager
    def removing(self, basis: torch.Tensor) -> Iterator[None]:
        """Each writer's output made orthogonal to its basis (writer_direction, the edit's):
        R's own, or that of g ⊙ R behind a norm; the embedding's to R."""
        from wandacli.removal.direction import writer_direction

        def remover(u: torch.Tensor) -> Any:
            def remove(module: Any, args: Any, output: Any) -> Any:
                def project(t: torch.Tensor) -> torch.Tensor:
                    q = u.to(t.device, t.dtype)
                    return t - (t @ q) @ q.T

                return _map_first(output, project)

            return remove

        hooks = [
            (module, remover(u))
            for module, scale in self.writers
            if (u := writer_direction(basis, scale)) is not None
        ]
        if self.embedding is not None:
            span = writer_direction(basis, None)  # R itself, orthonormal, [d, K]
            assert span is not None
            hooks.append((self.embedding, remover(span)))
            if self.tied_head is not None:
                # h (E − E R Rᵀ)ᵀ = h Eᵀ − (h R)(E R)ᵀ: the edited head, R keeping its gradient.
                def head(module: Any, args: Any, output: Any) -> Any:
                    h, q = args[0], span.to(output.device, output.dtype)
                    return output - (h.to(output.dtype) @ q) @ (module.weight.to(q.dtype) @ q).T

                hooks.append((self.tied_head, head))
        with self._hooked(hooks):
            yield

    @contextlib.contextmanager
    def adding(self, vector: torch.Tensor) -> Iterator[None]:
        def add(module: Any, args: Any, output: Any) -> Any:
            return _map_first(output, lambda t: t + vector.to(t.device, t.dtype))

        with self._hooked([(self.stream, add)]):
            yield

    @contextlib.contextmanager
    def _hooked(self, hooks: list[tuple[Any, Any]]) -> Iterator[None]:
        handles = [module.register_forward_hook(hook) for module, hook in hooks]
        self.handles.extend(handles)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
                self.handles.remove(handle)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _map_first(output: Any, change: Any) -> Any:
    """A module's output with its tensor (or its tuple's first tensor) changed."""
    if torch.is_tensor(output):
        return change(output)
    return (change(output[0]), *output[1:])


@dataclasses.dataclass(frozen=True)
class _Target:
    prompt: list[int]
    response: list[int]  # never empty: at least the first generated token


def _greedy(loaded: Any, prompts: Sequence[list[int]], tokens: int, pad: int) -> list[_Target]:
    """Each prompt and the model's greedy response (as the hooks in force make it), up to
    `tokens` tokens, cut after its end of sequence."""
    from transformers import GenerationConfig

    from wandacli.models.pretrained import end_of_sequence_ids

    ends = set(end_of_sequence_ids(loaded))
    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, pad_token_id=pad)
    targets = []
    for batch in _batches(list(prompts), 8):
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        with torch.no_grad():
            out = loaded.model.generate(
                input_ids=ids.to(loaded.input_device),
                attention_mask=mask.to(loaded.input_device),
                generation_config=config,
            ).cpu()
        for prompt, row in zip(batch, out[:, width:].tolist(), strict=True):
            response = []
            for token in row:
                response.append(int(token))
                if int(token) in ends:
                    break
            targets.append(_Target(list(prompt), response))
    return targets


def _right_padded(targets: Sequence[_Target], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts and responses, padded on the right, and which positions predict a
    response token (position j predicts token j + 1)."""
    rows = [t.prompt + t.response for t in targets]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    predicts = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (target, row) in enumerate(zip(targets, rows, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        start = len(target.prompt) - 1
        predicts[i, start : start + len(target.response)] = True
    return ids, predicts


def _logits(loaded: Any, ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    out = loaded.model(
        input_ids=ids.to(loaded.input_device),
        attention_mask=mask.to(loaded.input_device),
        use_cache=False,
    )
    return out.logits.float()


def _log_probs(loaded: Any, targets: Sequence[_Target], pad: int) -> torch.Tensor:
    """Log-probabilities [positions, vocab] at the response-predicting positions, in order."""
    ids, predicts = _right_padded(targets, pad)
    logits = _logits(loaded, ids)
    return torch.log_softmax(logits[predicts.to(logits.device)], dim=-1)


def _cross_entropy(loaded: Any, targets: Sequence[_Target], pad: int) -> torch.Tensor:
    ids, predicts = _right_padded(targets, pad)
    logits = _logits(loaded, ids)
    following = torch.roll(ids, -1, dims=1).to(logits.device)
    chosen = predicts.to(logits.device)
    return torch.nn.functional.cross_entropy(logits[chosen], following[chosen])


def _retain(
    loaded: Any,
    targets: Sequence[_Target],
    dense: list[torch.Tensor],
    picked: list[int],
    batch_size: int,
    pad: int,
) -> torch.Tensor:
    """KL(dense ‖ edited) per response position, averaged, over the picked harmless prompts
    (the dense log-probabilities were computed in batches of `batch_size`)."""
    rows = [dense[i // batch_size] for i in picked]
    offsets = []
    for i in picked:
        batch = targets[(i // batch_size) * batch_size : (i // batch_size + 1) * batch_size]
        before = sum(len(t.response) for t in batch[: i % batch_size])
        offsets.append((before, len(targets[i].response)))
    reference = torch.cat(
        [row[start : start + count] for row, (start, count) in zip(rows, offsets, strict=True)]
    )
    edited = _log_probs(loaded, [targets[i] for i in picked], pad)
    reference = reference.to(edited.device)
    return (reference.exp() * (reference - edited)).sum(-1).mean()


def _span(values: list[float]) -> str:
    return f"{values[0]:.4f} → {values[-1]:.4f}" if values else "-"


def _pick(count: int, size: int, generator: torch.Generator) -> list[int]:
    return sorted(torch.randperm(count, generator=generator)[: min(size, count)].tolist())


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
