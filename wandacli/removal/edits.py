"""`wandacli prune` on rank statistics: a rank edit (ActSVD) computed from the stored second
moments and the model's weights, written atomically to DIR/edits/<name>.h5 and optionally
applied to a saved model. Never runs the model on data: `score --method actsvd` did that."""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from wandacli.config.removal import EditConfig
from wandacli.core.console import NullReporter, Reporter
from wandacli.core.durable import atomic_h5, ensure_writable_directory, expected_file_bytes
from wandacli.core.errors import ConfigError, StoreError
from wandacli.core.memory import peak_rss_bytes
from wandacli.core.naming import file_safe_name
from wandacli.core.provenance import (
    now_iso,
    refuse_other_request,
    request_differences,
    software_versions,
)
from wandacli.removal.apply import (
    EditRemoval,
    check_save_model_target,
    direction_scale,
    save_model_with,
)
from wandacli.removal.direction import refusal_direction, writer_keys
from wandacli.removal.ranks import random_orthonormal, removed_directions, top_output_directions
from wandacli.removal.requests import selected_keys, store_root_for
from wandacli.removal.results import EditResult
from wandacli.removal.sequential import SequentialMoments
from wandacli.store.assemble import set_root_attrs, write_array
from wandacli.store.files import (
    EditFile,
    RankStatistics,
    open_mean_activations,
    open_rank_statistics,
    resolve_file,
)
from wandacli.store.lock import writer_lock
from wandacli.store.schema import DIRECTION_DATASET, EDIT_FORMAT, Store, split_key


def default_edit_name(config: EditConfig, safety: str, utility: str | None) -> str:
    """A name that says how the edit was made, e.g. `actsvd-align_short.remove-top10`
    (`.seq` when made in the reference's sequential order)."""
    if config.match_ranks is not None:
        return file_safe_name(f"random.as-{Path(config.match_ranks).stem}")
    if config.direction_layer is not None:
        scale = f"a{config.direction_scale:g}" if config.direction_scale != 1.0 else ""
        return file_safe_name(
            f"{safety}-minus-{utility}.direction-l{config.direction_layer}"
            f"p{config.direction_position}{scale}"
        )
    if config.remove_top_ranks is not None:
        name = f"{safety}.remove-top{config.remove_top_ranks}"
    elif config.keep_top_ranks is not None:
        name = f"{safety}.keep-top{config.keep_top_ranks}"
    elif config.safety_ranks is not None:
        name = f"{safety}-minus-{utility}.rs{config.safety_ranks}.ru{config.utility_ranks}"
    else:
        name = f"{safety}-minus-{utility}.neg{config.rank_neg}.pos{config.rank_pos}"
    if config.layers:
        name += ".L" + config.layers.replace(",", "_")
    if config.modules:
        name += ".M" + config.modules
    if config.sequential:
        name += ".seq"
    return file_safe_name(name)


def check_ranks(config: EditConfig, keys: list[str], shapes: dict[str, tuple[int, int]]) -> None:
    """Every rank within [0, min(d_out, d_in)] of its module, before anything is loaded."""
    for key in keys:
        limit = min(shapes[key])
        for role, rank in config.ranks_for(shapes[key]).items():
            if not 0 <= rank <= limit:
                flag = {
                    "remove": "--remove-top-ranks",
                    "keep": "--keep-top-ranks",
                    "safety": "--safety-ranks" if config.safety_ranks is not None else "--rank-neg",
                    "utility": "--utility-ranks"
                    if config.utility_ranks is not None
                    else "--rank-pos",
                }[role]
                layer, module = split_key(key)
                raise ConfigError(
                    f"{flag} gives layer {layer} {module} a rank of {rank}, outside [0, {limit}] "
                    f"(its weight is {shapes[key][0]}×{shapes[key][1]}): choose a rank within it"
                    + (" or filter modules with --modules" if config.modules is None else "")
                )


def run_edit(
    config: EditConfig,
    *,
    reporter: Reporter | None = None,
    command_line: list[str] | None = None,
) -> EditResult:
    """Compute the edit's bases per module: from the stored rank statistics and the weights
    (rank edits), from two mean-activations sets (the refusal direction), or at random of a
    matched edit's size (`--match-ranks`, a control)."""
    reporter = reporter or NullReporter()
    command_line = command_line if command_line is not None else sys.argv
    started = time.monotonic()
    root = store_root_for(config.scores, config.store)
    direction = config.mode == "direction"
    opener: Any = open_mean_activations if direction else open_rank_statistics
    if config.match_ranks is not None:  # the set only names the model: rank statistics or means
        opener = _open_model_set
    with contextlib.ExitStack() as stack:
        safety = stack.enter_context(opener(config.scores, root))
        utility = None
        if config.utility_scores is not None:
            utility = stack.enter_context(opener(config.utility_scores, root))
            mismatch = safety.fingerprint.first_mismatch(
                utility.fingerprint, mine="--scores", theirs="--utility-scores"
            )
            if mismatch:
                raise StoreError(
                    f"--scores {config.scores} and --utility-scores {config.utility_scores} were "
                    f"computed on different models: {mismatch}"
                )
        matched = None
        if direction:
            assert utility is not None
            r = _direction_from(config, safety, utility)
            writers = set(writer_keys(safety.fingerprint, safety.hidden_size))
            keys = [k for k in selected_keys(config, safety.fingerprint) if k in writers]
            if not keys:
                raise ConfigError(
                    "no module that writes into the residual stream is selected: drop "
                    "--layers/--modules, or choose writers (o_proj, down_proj, ...)"
                )
        elif config.match_ranks is not None:
            matched = stack.enter_context(_open_matched_edit(config.match_ranks, root, safety))
            keys = [k for k in safety.fingerprint.shapes if k in matched.meta["modules"]]
        else:
            keys = selected_keys(config, safety.fingerprint)
            check_ranks(config, keys, safety.fingerprint.shapes)
        store = Store(root)
        name = config.name or default_edit_name(
            config, safety.name, utility.name if utility else None
        )
        final = store.edit_path(name)
        if config.save_model is not None:
            check_save_model_target(config.save_model, config.overwrite)
        ensure_writable_directory(root)
        with writer_lock(root, shlex.join(command_line)):
            if final.exists() and not config.overwrite:
                finished = _same_request(final, config, name, root, started, matched)
                if config.save_model is None or (config.save_model / "config.json").exists():
                    return finished
            if direction:
                meta = _write_direction(
                    config,
                    final,
                    keys,
                    safety,
                    r,
                    name,
                    command_line,
                    {
                        "direction": {
                            "layer": config.direction_layer,
                            "position": config.direction_position,
                            "rule": DIRECTION_RULE,
                        },
                        "direction_scale": config.direction_scale,
                        "mean_activations": [
                            _describe_means(safety, "harmful"),
                            _describe_means(utility, "harmless"),
                        ],
                    },
                )
                loaded = _load(config, safety) if config.save_model is not None else None
            elif matched is not None and matched.mode == "direction":
                # A random unit vector removed the same way: every writer and the embedding.
                generator = torch.Generator().manual_seed(config.seed)
                hidden = int(matched.read_raw(DIRECTION_DATASET).shape[0])
                random_r = random_orthonormal(hidden, 1, generator).reshape(-1)
                meta = _write_direction(
                    config,
                    final,
                    keys,
                    safety,
                    random_r,
                    name,
                    command_line,
                    {
                        "matched_edit": _describe_matched(matched),
                        "seed": config.seed,
                        "rule": "a seeded random unit vector (Gaussian, normalised), removed "
                        "from the writers and the embedding as the matched direction is",
                        "direction_scale": direction_scale(matched.meta),
                    },
                )
                loaded = _load(config, safety) if config.save_model is not None else None
            elif matched is not None:
                meta = _write_random_control(
                    config, final, keys, safety, matched, name, command_line
                )
                loaded = _load(config, safety) if config.save_model is not None else None
            else:
                loaded = _load(config, safety)
                meta = _write_edit(
                    config, final, keys, safety, utility, loaded, name, command_line, reporter
                )
            result = EditResult(
                name=name,
                path=final,
                mode=str(meta["mode"]),
                modules=len(keys),
                removed_rank_fraction=float(meta["removed_rank_fraction"]),
                seconds=0.0,
                peak_memory_bytes=0,
                meta=meta,
            )
            if config.save_model is not None:
                if not config.sequential:  # the sequential order edited the model as it went
                    with EditRemoval(EditFile(final)) as edit:
                        edit.apply(loaded)
                result.saved_model = save_model_with(
                    loaded, config.save_model, final, meta, command_line, reporter, what="edit"
                )
    result.seconds = time.monotonic() - started
    result.peak_memory_bytes = peak_rss_bytes()
    return result


def _same_request(
    final: Path,
    config: EditConfig,
    name: str,
    root: Path,
    started: float,
    matched: EditFile | None = None,
) -> EditResult:
    """The finished edit as this run's result when asked for with the same settings (and, for
    a control, from the matched edit as it is now)."""
    with EditFile(final) as finished:
        differences = request_differences(finished.meta, config.request())
        matched_created = (finished.meta.get("matched_edit") or {}).get("created")
        if matched is not None and matched_created != matched.meta.get("created"):
            differences.append(f"--match-ranks edit {matched.name!r} was remade after this edit")
        refuse_other_request("edit", name, root, differences)
        return EditResult(
            name=name,
            path=final,
            mode=finished.mode,
            modules=len(finished.keys),
            removed_rank_fraction=float(finished.meta.get("removed_rank_fraction") or 0.0),
            seconds=time.monotonic() - started,
            peak_memory_bytes=peak_rss_bytes(),
            meta=finished.meta,
            already_complete=True,
        )


def _load(config: EditConfig, safety: RankStatistics) -> Any:
    from wandacli.models.loader import load_model

    assert config.model is not None
    spec = config.model
    if config.save_model is not None and spec.dtype == "auto":
        # A saved model keeps its checkpoint's dtype.
        spec = type(spec)(**{**spec.__dict__, "dtype": "checkpoint"})
    loaded = load_model(spec)
    safety.check_model(loaded.fingerprint, loaded.model_id)
    return loaded


def _write_edit(
    config: EditConfig,
    final: Path,
    keys: list[str],
    safety: RankStatistics,
    utility: RankStatistics | None,
    loaded: Any,
    name: str,
    command_line: list[str],
    reporter: Reporter,
) -> dict[str, Any]:
    """Per module: the bases from an exact float64 eigendecomposition of W C Wᵀ, written as
    float32; the rank each removes."""
    by_key = {lin.key: lin for lin in loaded.linear_layers}
    shapes = safety.fingerprint.shapes
    modules: dict[str, dict[str, Any]] = {}
    sequential = SequentialMoments(loaded, safety, utility) if config.sequential else None
    array_bytes = sum(shapes[k][0] * sum(config.ranks_for(shapes[k]).values()) * 4 for k in keys)
    reporter.start(f"edit: {config.mode}", total=len(keys))
    with atomic_h5(final, expected_file_bytes(array_bytes, 2 * len(keys))) as handle:
        for key in keys:
            weight = by_key[key].weight_matrix().detach()
            # float64 on the weight's device: the GPU when there is one.
            w64 = weight.to(torch.float64)
            ranks = config.ranks_for(shapes[key])
            bases: dict[str, torch.Tensor] = {}
            for role, rank in ranks.items():
                source = utility if role == "utility" else safety
                assert source is not None
                if sequential is not None:  # recorded now, after the earlier layers' edits
                    second_moment = sequential.second_moment(source, key).to(w64.device)
                else:
                    second_moment = torch.from_numpy(source.read(key)).to(w64.device)
                bases[role] = top_output_directions(w64, second_moment, rank)
            if sequential is not None:  # this layer's edit in place before the next is recorded
                sequential.apply(by_key[key], config.mode, bases)
            full = min(shapes[key])
            if config.mode == "remove-top-ranks":
                removed = ranks["remove"]
            elif config.mode == "keep-top-ranks":
                removed = full - ranks["keep"]
            else:  # rank of (I − Π_u) V_s: the directions ΔW can change
                v_s, v_u = bases["safety"], bases["utility"]
                removed = removed_directions(v_s - v_u @ (v_u.T @ v_s))
            for role, basis in bases.items():
                write_array(handle, f"{key}/{role}", basis.float().cpu().numpy())
            modules[key] = {"ranks": ranks, "removed_rank": removed, "full_rank": full}
            reporter.advance()
        meta = {
            "mode": config.mode,
            "name": name,
            "modules": modules,
            "removed_rank_fraction": _removed_fraction(modules, shapes),
            "rank_statistics": [
                _describe_set(safety, "safety" if utility else "statistics"),
                *([_describe_set(utility, "utility")] if utility else []),
            ],
            "model": safety.meta["model"],
            "eigensolver": "torch.linalg.eigh, float64, of W C Wᵀ (or its d_in-sized form)",
            "order": "sequential" if config.sequential else "store",
            "search": config.search,
            "layers": config.layers,
            "modules_filter": config.modules,
        } | _provenance(config, command_line)
        set_root_attrs(handle, EDIT_FORMAT, meta)
    reporter.finish()
    return meta


def _direction_from(config: EditConfig, harmful: Any, harmless: Any) -> torch.Tensor:
    """r̂ from the two sets, which must be means of the same kind: one model (by id as well:
    two checkpoints of one architecture share a fingerprint), one template, one K."""
    for what, a, b in (
        ("models", harmful.meta["model"].get("id"), harmless.meta["model"].get("id")),
        ("templates", harmful.template, harmless.template),
        ("--positions", harmful.positions, harmless.positions),
    ):
        if a != b:
            raise StoreError(
                f"--scores {config.scores} and --utility-scores {config.utility_scores} were "
                f"taken with different {what} ({a} and {b}): score both the same way"
            )
    assert config.direction_layer is not None
    return refusal_direction(
        harmful.means(), harmless.means(), config.direction_layer, config.direction_position
    )


def _write_direction(
    config: EditConfig,
    final: Path,
    keys: list[str],
    model_set: Any,
    direction: torch.Tensor,
    name: str,
    command_line: list[str],
    described: dict[str, Any],
) -> dict[str, Any]:
    """r once, at /direction; every writer's `remove` basis a hard link to it (stored once).
    `described`: where r came from (the two mean sets, or the edit a random one controls)."""
    shapes = model_set.fingerprint.shapes
    with atomic_h5(final, expected_file_bytes(direction.numel() * 4, 1)) as handle:
        write_array(handle, DIRECTION_DATASET, direction.float().reshape(-1, 1).numpy())
        for key in keys:
            handle[f"{key}/remove"] = handle[DIRECTION_DATASET]
        modules = {
            key: {"ranks": {"remove": 1}, "removed_rank": 1, "full_rank": min(shapes[key])}
            for key in keys
        }
        meta = {
            "mode": "direction",
            "name": name,
            "modules": modules,
            "removed_rank_fraction": _removed_fraction(modules, shapes),
            "embedding": True,
            **described,
            "model": model_set.meta["model"],
            "search": config.search,
            "layers": config.layers,
            "modules_filter": config.modules,
        } | _provenance(config, command_line)
        set_root_attrs(handle, EDIT_FORMAT, meta)
    return meta


DIRECTION_RULE = (
    "r = normalise(mean_harmful[layer, position] − mean_harmless[layer, position]); writers "
    "W ← W − α r rᵀ W, token embedding E ← E − α (E r) rᵀ (α = direction_scale, 1: all of r; a "
    "tied output head changes with the embedding)"
)


def _describe_matched(matched: EditFile) -> dict[str, Any]:
    return {
        "name": matched.name,
        "path": str(matched.path),
        "mode": matched.mode,
        "created": matched.meta.get("created"),
    }


def _removed_fraction(modules: dict[str, dict[str, Any]], shapes: dict[str, Any]) -> float:
    """The rank the edit removes over every module's full rank (all modules, changed or not)."""
    total_rank = sum(min(shape) for shape in shapes.values())
    return sum(int(m["removed_rank"]) for m in modules.values()) / total_rank


def _provenance(config: EditConfig, command_line: list[str]) -> dict[str, Any]:
    """What every edit's meta ends with: the request, how it was asked for, with what, when."""
    return {
        "config": config.request(),
        "command_line": shlex.join(command_line),
        "versions": software_versions(),
        "created": now_iso(),
    }


def _describe_means(means: Any, role: str) -> dict[str, Any]:
    return {
        "role": role,
        "name": means.name,
        "path": str(means.path),
        "data": (means.meta.get("data") or {}).get("name"),
        "template": means.template,
        "positions": means.positions,
        "finished": means.meta.get("finished"),
    }


def _open_model_set(reference: str, root: Path) -> Any:
    """A rank-statistics or mean-activations set, for what it says of the model."""
    from wandacli.store.files import open_finished_scores

    return open_finished_scores(resolve_file(reference, root, "score set"))


def _open_matched_edit(reference: str, root: Path, safety: RankStatistics) -> EditFile:
    """The edit a `--match-ranks` control copies, made for the same model as `--scores`."""
    matched = EditFile(resolve_file(reference, root, "edit"))
    mismatch = safety.fingerprint.first_mismatch(
        matched.fingerprint, mine="--scores", theirs="--match-ranks edit"
    )
    if mismatch:
        matched.close()
        raise StoreError(f"--match-ranks {reference} was made for another model: {mismatch}")
    return matched


def _write_random_control(
    config: EditConfig,
    final: Path,
    keys: list[str],
    safety: RankStatistics,
    matched: EditFile,
    name: str,
    command_line: list[str],
) -> dict[str, Any]:
    """Per module of the matched edit: Q, random orthonormal [d_out, r] with r the rank that edit
    removes there (drawn module by module from one seeded generator, as `search`'s control
    does), so that W ← (I − Q Qᵀ) W removes as much rank in directions chosen without data."""
    shapes = safety.fingerprint.shapes
    generator = torch.Generator().manual_seed(config.seed)
    matched_modules = matched.meta["modules"]
    modules: dict[str, dict[str, Any]] = {}
    ranks = {k: int(matched_modules[k]["removed_rank"]) for k in keys}
    array_bytes = sum(shapes[k][0] * ranks[k] * 4 for k in keys)
    with atomic_h5(final, expected_file_bytes(array_bytes, 2 * len(keys))) as handle:
        for key in keys:
            if ranks[key] == 0:
                continue
            basis = random_orthonormal(shapes[key][0], ranks[key], generator)
            write_array(handle, f"{key}/remove", basis.float().numpy())
            modules[key] = {
                "ranks": {"remove": ranks[key]},
                "removed_rank": ranks[key],
                "full_rank": min(shapes[key]),
            }
        meta = {
            "mode": config.mode,
            "name": name,
            "modules": modules,
            "removed_rank_fraction": _removed_fraction(modules, shapes),
            "matched_edit": _describe_matched(matched),
            "seed": config.seed,
            "rule": "per module the rank the matched edit removes, in random orthonormal "
            "directions (Gaussian, then QR; float64, stored float32)",
            "model": safety.meta["model"],
            "search": config.search,
        } | _provenance(config, command_line)
        set_root_attrs(handle, EDIT_FORMAT, meta)
    return meta


def _describe_set(statistics: RankStatistics, role: str) -> dict[str, Any]:
    return {
        "role": role,
        "name": statistics.name,
        "path": str(statistics.path),
        "method": statistics.meta.get("method"),
        "data": (statistics.meta.get("data") or {}).get("name"),
        "counted_tokens": statistics.counted_tokens,
        "finished": statistics.meta.get("finished"),
    }
