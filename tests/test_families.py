"""Every command exact on every family users run (issue #28): a tiny random model per family
from transformers' config classes, norms and biases perturbed (tests/families.py).

Per family: every matrix weight of the decoder layers is one wandacli scores (by count); a
refusal direction removed as the family says leaves no component along r in the residual
stream after any decoder layer (≤ 1e-5 of the dense model's); masks zero exactly the entries
they name, experts' included; the experts' wanda statistics and wandg gradients equal a
computation written here."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.families import FAMILIES, MIXTURES, NOT_PLAIN, build_family_model
from wandacli.models.layers import (
    decoder_layers,
    fingerprint_of,
    iter_linear_layers,
    unmatched_matrices,
)
from wandacli.removal.content import EditShape, MaskContent, apply_edit, apply_mask
from wandacli.removal.direction import writer_keys
from wandacli.removal.in_memory import WeightChanges
from wandacli.removal.kinds.direction import removing, treatments

VOCAB = 64


def loaded_of(model):
    """What WeightChanges and the methods read of a loaded model."""
    return SimpleNamespace(model=model, linear_layers=list(iter_linear_layers(model)))


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, build_family_model(request.param, VOCAB).double()


def test_every_matrix_of_the_decoder_is_scored(family_model):
    family, model = family_model
    layers = list(iter_linear_layers(model))
    in_matrices = sum(
        p.numel() for layer in decoder_layers(model) for p in layer.parameters() if p.dim() >= 2
    )
    assert sum(a * b for a, b in fingerprint_of(layers, model).shapes.values()) == in_matrices
    assert unmatched_matrices(model) == []
    if family in MIXTURES:
        keys = {lin.key for lin in layers}
        assert {"0/mlp.experts.3.gate_proj", "0/mlp.experts.3.up_proj"} <= keys
        assert "1/mlp.experts.0.down_proj" in keys and "0/mlp.gate" in keys


def stream_components(model, r, ids):
    """max |h · r| of each decoder layer's output (the stream after it)."""
    found = []

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        found.append(float((hidden[0].double() @ r.to(hidden.device)).abs().max()))

    forward_with(model, ids, [layer.register_forward_hook(hook) for layer in decoder_layers(model)])
    return found


def forward_with(model, ids, handles) -> None:
    """One forward pass with the hooks `handles` attached, removed after it."""
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def remove_direction(model, r, *, as_families_say=True, experts=True, norm_preserving=False):
    """r removed from the model's writers: as their families say, or (`as_families_say`
    False) from the writers' weights alone; `experts` False leaves the experts' matrices out,
    as wandacli did before they were matrices (bench/bench_families.py's "before");
    `norm_preserving`: each writer column rescaled to its norm before the edit."""
    loaded = loaded_of(model)
    fingerprint = fingerprint_of(loaded.linear_layers, model)
    keys = writer_keys(fingerprint, r.shape[0])
    if not experts:
        routed = {lin.key for lin in loaded.linear_layers if lin.is_expert}
        keys = [k for k in keys if k not in routed]
    writers = treatments(keys, fingerprint.family) if as_families_say else None
    shape = EditShape(norm_preserving=norm_preserving)
    content = removing(r, keys, fingerprint.shapes, shape, writers)
    with torch.no_grad():
        for _ in apply_edit(content, WeightChanges(loaded, undo=False)):
            pass
    return keys


@pytest.mark.parametrize("norm_preserving", [False, True], ids=["plain", "norm-preserving"])
def test_the_direction_edit_leaves_no_r_in_the_stream(family_model, norm_preserving):
    """And, norm-preserving, every writer column keeps its norm (within 1e-6 relative)."""
    family, model = family_model
    generator = torch.Generator().manual_seed(3)
    r = torch.randn(model.config.hidden_size, generator=generator, dtype=torch.float64)
    r = r / r.norm()
    r = torch.from_numpy(r.float().numpy()).double()  # as the file stores it
    r = r / r.norm()
    ids = torch.randint(3, VOCAB, (1, 12), generator=generator)
    dense = stream_components(model, r, ids)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    columns = {lin.key: lin for lin in iter_linear_layers(model)}
    try:
        keys = remove_direction(model, r, norm_preserving=norm_preserving)
        edited = stream_components(model, r, ids)
        norms = {k: columns[k].weight_matrix().detach().norm(dim=0) for k in keys}
    finally:
        model.load_state_dict(original)
    assert keys
    for key in keys:
        before = columns[key].weight_matrix().detach().norm(dim=0)
        relative = ((norms[key] - before).abs() / before.clamp_min(1e-300)).max()
        if norm_preserving:
            assert relative <= 1e-6, (family, key, float(relative))
        else:  # the test has teeth: the plain edit shortens the columns
            assert relative > 1e-6 or bool((before == 0).all()), (family, key)
    for layer, (before, after) in enumerate(zip(dense, edited, strict=True)):
        assert after <= 1e-5 * before, (family, layer, after, before)


def test_heretics_row_norms_are_kept_on_every_writer(family_model):
    """`--norm-preserving 2` (heretic's rows) on every family, experts and norms after
    sublayers included: every writer row keeps its norm within 1e-6 relative, and the stream's
    component along r shrinks (rows rescaled, so not to zero)."""
    family, model = family_model
    generator = torch.Generator().manual_seed(5)
    r = torch.randn(model.config.hidden_size, generator=generator, dtype=torch.float64)
    r = r / r.norm()
    ids = torch.randint(3, VOCAB, (1, 12), generator=generator)
    dense = stream_components(model, r, ids)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {lin.key: lin for lin in iter_linear_layers(model)}
    before = {k: lin.weight_matrix().detach().norm(dim=1).clone() for k, lin in layers.items()}
    try:
        keys = remove_direction(model, r, norm_preserving=2)
        after = {k: layers[k].weight_matrix().detach().norm(dim=1) for k in keys}
        edited = stream_components(model, r, ids)
    finally:
        model.load_state_dict(original)
    assert keys
    for key in keys:
        relative = ((after[key] - before[key]).abs() / before[key].clamp_min(1e-300)).max()
        assert relative <= 1e-6, (family, key, float(relative))
    assert sum(edited[1:]) < sum(dense[1:]), family


def test_several_directions_leave_no_component_of_their_span(family_model):
    """`--directions 3`: three orthonormal directions (stored float32) removed as the family
    says leave no component in their span in the stream after any decoder layer."""
    family, model = family_model
    generator = torch.Generator().manual_seed(5)
    gaussian = torch.randn(model.config.hidden_size, 3, generator=generator, dtype=torch.float64)
    basis = torch.from_numpy(torch.linalg.qr(gaussian)[0].float().numpy()).double()
    ids = torch.randint(3, VOCAB, (1, 12), generator=generator)
    dense = stream_components(model, basis, ids)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        assert remove_direction(model, basis)
        edited = stream_components(model, basis, ids)
    finally:
        model.load_state_dict(original)
    for layer, (before, after) in enumerate(zip(dense, edited, strict=True)):
        assert after <= 1e-5 * before, (family, layer, after, before)


def test_the_optimisation_removes_what_the_edit_removes(family_model):
    """--direction-optimise's forward hooks give the edited model's logits on every family
    whose writers are whole modules (norms after sublayers, writer biases and tied heads
    included); a family whose writers are slices of a parameter (experts) is refused."""
    from wandacli.core.errors import ConfigError
    from wandacli.removal.optimised_direction import SpanHooks

    family, model = family_model
    loaded = loaded_of(model)
    fingerprint = fingerprint_of(loaded.linear_layers, model)
    hidden = model.config.hidden_size
    generator = torch.Generator().manual_seed(7)
    gaussian = torch.randn(hidden, 2, generator=generator, dtype=torch.float64)
    basis = torch.from_numpy(torch.linalg.qr(gaussian)[0].float().numpy()).double()
    keys = set(writer_keys(fingerprint, hidden))
    writers = [lin for lin in loaded.linear_layers if lin.key in keys]
    if family in MIXTURES:
        with pytest.raises(ConfigError, match="whole writer modules"):
            SpanHooks(model, writers, family=fingerprint.family, layer=1, embedding=True)
        return
    hooks = SpanHooks(model, writers, family=fingerprint.family, layer=1, embedding=True)
    ids = torch.randint(3, VOCAB, (1, 12), generator=generator)
    with torch.no_grad(), hooks.removing(basis):
        hooked = model(input_ids=ids, use_cache=False).logits
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        remove_direction(model, basis)
        with torch.no_grad():
            edited = model(input_ids=ids, use_cache=False).logits
    finally:
        model.load_state_dict(original)
    scale = float(edited.abs().max())
    assert float((hooked - edited).abs().max()) <= 1e-9 * scale, family
    assert float((dense - edited).abs().max()) > 1e-4 * scale, family


@pytest.mark.parametrize("family", [f for f in NOT_PLAIN if f not in MIXTURES])
def test_the_old_rule_left_r_in_these_streams(family):
    """The test has teeth: r removed from the writers' weights alone (edits made before
    families) leaves a measurable share in these families' streams."""
    model = build_family_model(family, VOCAB).double()
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    r = (r / r.norm()).double()
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    dense = stream_components(model, r, ids)
    remove_direction(model, r, as_families_say=False)
    edited = stream_components(model, r, ids)
    assert max(a / b for a, b in zip(edited, dense, strict=True)) > 1e-3


def test_masks_zero_exactly_what_they_say(family_model):
    family, model = family_model
    loaded = loaded_of(model)
    generator = np.random.default_rng(5)
    masks = {lin.key: generator.random(lin.shape) < 0.3 for lin in loaded.linear_layers}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            counts = apply_mask(
                MaskContent(list(masks), masks.__getitem__), WeightChanges(loaded, undo=False)
            )
        for lin in loaded.linear_layers:
            matrix = lin.weight_matrix().detach()
            chosen = torch.from_numpy(masks[lin.key])
            assert torch.all(matrix[chosen] == 0), lin.key
        changed = sum(
            int((p.detach() != before[name]).sum()) for name, p in model.named_parameters()
        )
        # Every masked entry changed, nothing else (random weights are never exactly zero).
        assert changed == sum(counts.values()) == sum(int(m.sum()) for m in masks.values())
    finally:
        model.load_state_dict(original)


def router_inputs(model, ids) -> dict[int, torch.Tensor]:
    """Per decoder layer, the hidden states its router reads ([tokens, d])."""
    seen = {}
    hooks = [
        layer.mlp.gate.register_forward_pre_hook(
            lambda module, args, i=i: seen.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))
        )
        for i, layer in enumerate(decoder_layers(model))
    ]
    forward_with(model, ids, hooks)
    return seen


@pytest.mark.parametrize("family", MIXTURES)
def test_the_experts_wanda_statistics_are_their_routed_inputs(family):
    """Each expert's gate/up sums are the squared routed hidden states, its down sums the
    squared intermediate activation act(gate) ⊙ up of the tokens routed to it; only counted
    tokens add."""
    from wandacli.methods.wanda import ActivationStatistics

    model = build_family_model(family, VOCAB)
    loaded = loaded_of(model)
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(6))
    counted = torch.ones(1, 16, dtype=torch.bool)
    counted[0, :5] = False
    statistics = ActivationStatistics(loaded.linear_layers)
    with statistics.recording():
        statistics.observe(model, ids, counted)
    # The reference: the router's input, its choices, each expert's computation by hand.
    seen = router_inputs(model, ids)
    keep = counted.reshape(-1)
    for index, layer in enumerate(decoder_layers(model)):
        hidden = seen[index]
        with torch.no_grad():
            _, _, chosen = layer.mlp.gate(hidden)
        experts = layer.mlp.experts
        for expert in range(experts.num_experts):
            routed = (chosen == expert).any(dim=-1) & keep
            x = hidden[routed]
            gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, -1)
            h = experts.act_fn(gate) * up
            expected_in = (x.float() ** 2).sum(0)
            expected_mid = (h.float() ** 2).sum(0)
            for part in ("gate_proj", "up_proj"):
                got = statistics.sums[f"{index}/mlp.experts.{expert}.{part}"]
                torch.testing.assert_close(got, expected_in, rtol=1e-5, atol=1e-6)
            got = statistics.sums[f"{index}/mlp.experts.{expert}.down_proj"]
            torch.testing.assert_close(got, expected_mid.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", MIXTURES)
def test_the_experts_wandg_sums_are_their_gradients(family):
    from wandacli.data.calibration import IGNORE_INDEX
    from wandacli.methods.wandg import GradientAccumulator, sample_loss

    model = build_family_model(family, VOCAB)
    layers = list(iter_linear_layers(model))
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    labels[0, :6] = IGNORE_INDEX
    accumulator = GradientAccumulator(layers)
    with accumulator.recording():
        accumulator.observe(model, ids, labels)
    parameters = {lin.parameter_key: lin.weight for lin in layers}
    for weight in parameters.values():
        weight.requires_grad_(True)
    with torch.enable_grad():
        grads = torch.autograd.grad(sample_loss(model, ids, labels), list(parameters.values()))
    for weight in parameters.values():
        weight.requires_grad_(False)
    by_key = dict(zip(parameters, grads, strict=True))
    for lin in layers:
        expected = lin.matrix_of(by_key[lin.parameter_key].abs())
        torch.testing.assert_close(accumulator.scores_layout(lin), expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# From the command line, as a user on these families runs it

END_TO_END = ("gemma2", "olmo2", "gpt_neox", "mixtral", "qwen2_moe")


@pytest.fixture(scope="module", params=END_TO_END)
def family_dir(request, tmp_path_factory, tokenizer):
    from tests.conftest import save_model

    model = build_family_model(request.param, len(tokenizer))
    directory = tmp_path_factory.mktemp("families") / request.param
    return request.param, save_model(model, tokenizer, directory)


def test_every_command_from_the_cli(cli, family_dir, pairs_csv, tmp_path):
    """wanda scores every matrix (each expert's with its own routed tokens), a ratio mask
    leaves the routers alone by default, wandg and compare cover every matrix, eval-attack
    runs with the mask, a direction edit saved into a model leaves no r in its stream, a
    search over the direction's layer runs its trials, and eval-utility measures the edited
    model."""
    import json

    from tests.test_mean_activations import means_args
    from tests.test_score_cli import arrays, score_args
    from wandacli.config.settings import ModelSpec
    from wandacli.models.loader import load_model
    from wandacli.store.files import EditFile, MaskFile

    family, directory = family_dir
    store = tmp_path / "store"
    made = cli(*score_args(directory, store, "--json", "--name", "w", data=pairs_csv))
    assert made.exit_code == 0, made.stderr
    scores = arrays(json.loads(made.stdout)["path"])
    loaded = load_model(ModelSpec(model=str(directory), device="cpu"))
    assert set(scores) == {lin.key for lin in loaded.linear_layers}
    unrouted = {k for k, a in scores.items() if not float(a.sum()) > 0}
    # Every matrix scored; an expert no counted token was routed to scores 0 (a random tiny
    # router may skip one), but most experts see tokens.
    assert all(".experts." in k for k in unrouted)
    assert len(unrouted) <= len([k for k in scores if ".experts." in k]) // 4
    family_routers = {k for k in scores if k.endswith(("mlp.gate", "shared_expert_gate"))}

    masked = cli("prune", "--store", store, "--scores", "w", "--sparsity-ratio", "0.5",
                 "--name", "m", "--no-progress")  # fmt: skip
    assert masked.exit_code == 0, masked.stderr
    with MaskFile(store / "masks" / "m.h5") as mask:
        pruned = {k for k in mask.keys if mask.read(k).any()}
    assert pruned == set(scores) - family_routers

    gradients = cli(*score_args(directory, store, "--name", "g", method="wandg", data=pairs_csv))
    assert gradients.exit_code == 0, gradients.stderr
    compared = cli("compare", "w", "g", "--store", store, "--json", "--no-progress")
    assert compared.exit_code == 0, compared.stderr
    compared_keys = {
        f"{row['layer']}/{row['module']}" for row in json.loads(compared.stdout)["rows"]
    }
    assert set(scores) <= compared_keys  # every matrix compared, experts' included

    attacked = cli("eval-attack", "--model", directory, "--device", "cpu", "--mask", "m",
                   "--store", store, "--prompts", "advbench", "--limit", "2",
                   "--max-new-tokens", "4", "--samples", "1", "--out", tmp_path / "attack",
                   "--json", "--no-progress")  # fmt: skip
    assert attacked.exit_code == 0, attacked.stderr

    for data, name in ((pairs_csv, "harmful"), ("utility", "harmless")):
        made = cli(*means_args(directory, store, data, "--template", "chat", "--name", name))
        assert made.exit_code == 0, made.stderr
    saved = tmp_path / "edited"
    edit = cli("prune", "--store", store, "--scores", "harmful", "--utility-scores", "harmless",
               "--direction-layer", "1", "--name", "d", "--save-model", saved, "--model",
               directory, "--no-progress")  # fmt: skip
    assert edit.exit_code == 0, edit.stderr
    with EditFile(store / "edits" / "d.h5") as stored:
        r = torch.from_numpy(stored.read_raw("direction")).double().reshape(-1)
        writers = stored.meta["writers"]
    r = r / r.norm()
    assert writers and all(w["bias"].startswith("projected") for w in writers.values())
    if family in ("gemma2", "olmo2"):
        assert all("norm" in w for w in writers.values())
    if family in MIXTURES:
        assert "1/mlp.experts.3.down_proj" in writers
    edited = load_model(ModelSpec(model=str(saved), device="cpu", dtype="float32"))
    ids = loaded.tokenizer("How do I do a thing, please?", return_tensors="pt").input_ids
    dense_along = stream_components(loaded.model, r, ids)
    edited_along = stream_components(edited.model, r, ids)
    for before, after in zip(dense_along, edited_along, strict=True):
        # float32 weights: the stream keeps rounding's share of r, far below the dense one
        assert after <= 1e-4 * before, (family, dense_along, edited_along)

    from tests.test_search import QUICK

    searched = cli("search", "--model", directory, "--store", store, "--name", "s",
                   "--scores", "harmful", "--utility-scores", "harmless",
                   "--direction-layer", "0:2", "--trials", "2", "--no-control", "--json",
                   *QUICK)  # fmt: skip
    assert searched.exit_code == 0, searched.stderr
    assert len(json.loads(searched.stdout)["trials"]) == 2

    utility = cli("eval-utility", "--model", directory, "--device", "cpu", "--mask", "d",
                  "--store", store, "--seqlen", "64", "--limit-windows", "2",
                  "--out", tmp_path / "utility", "--json", "--no-progress")  # fmt: skip
    assert utility.exit_code == 0, utility.stderr
    assert 1 < json.loads(utility.stdout)["perplexity"] < float("inf")


@pytest.mark.parametrize("family", MIXTURES)
def test_the_experts_actsvd_moments_are_over_their_routed_tokens(family):
    """Each expert's C = (1/N_e) Σ x xᵀ over the counted tokens routed to it: its gate and up
    projections share the routed hidden states' C, its down projection has its
    intermediate activation's."""
    from wandacli.methods.actsvd import SecondMoments, shared_inputs

    model = build_family_model(family, VOCAB)
    layers = list(iter_linear_layers(model))
    owners = shared_inputs(model, layers, torch.device("cpu"))
    assert owners["0/mlp.experts.2.up_proj"] == "0/mlp.experts.2.gate_proj"
    assert owners["0/mlp.experts.2.down_proj"] == "0/mlp.experts.2.down_proj"
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(9))
    counted = torch.ones(1, 16, dtype=torch.bool)
    counted[0, :4] = False
    moments = SecondMoments(layers, owners, stop_early=False)
    with moments.recording():
        moments.observe(model, ids, counted)
    seen = router_inputs(model, ids)
    for index, layer in enumerate(decoder_layers(model)):
        with torch.no_grad():
            _, _, chosen = layer.mlp.gate(seen[index])
            experts = layer.mlp.experts
            for expert in range(experts.num_experts):
                routed = (chosen == expert).any(dim=-1) & counted.reshape(-1)
                if not routed.any():
                    continue
                x = seen[index][routed].double()
                gate, up = torch.nn.functional.linear(
                    x, experts.gate_up_proj[expert].double()
                ).chunk(2, -1)
                h = experts.act_fn(gate) * up
                for part, inputs in (("up_proj", x), ("down_proj", h)):
                    got = moments.second_moment(f"{index}/mlp.experts.{expert}.{part}")
                    expected = inputs.T @ inputs / inputs.shape[0]
                    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_rank_edits_reach_every_expert_from_the_cli(cli, tmp_path, tokenizer, pairs_csv):
    from tests.conftest import save_model
    from tests.test_score_cli import score_args
    from wandacli.config.settings import ModelSpec
    from wandacli.evaluation.under_test import load_model_under_test
    from wandacli.models.loader import load_model

    directory = save_model(build_family_model("mixtral", len(tokenizer)), tokenizer, tmp_path / "m")
    store = tmp_path / "store"
    made = cli(*score_args(directory, store, "--name", "a", method="actsvd", data=pairs_csv))
    assert made.exit_code == 0, made.stderr
    edit = cli("prune", "--store", store, "--scores", "a", "--remove-top-ranks", "2",
               "--name", "e", "--model", directory, "--no-progress")  # fmt: skip
    assert edit.exit_code == 0, edit.stderr
    spec = ModelSpec(model=str(directory), device="cpu")
    dense = {lin.key: lin.weight_matrix().detach() for lin in load_model(spec).linear_layers}
    edited = load_model_under_test(spec, "e", store).loaded
    changed = {
        lin.key
        for lin in edited.linear_layers
        if not torch.equal(lin.weight_matrix().detach(), dense[lin.key])
    }
    from wandacli.store.files import open_finished_scores

    with open_finished_scores(store / "scores" / "a.h5") as statistics:
        unrouted = {k for k in statistics.keys if not statistics.read(k).any()}
    experts = {k for k in dense if ".experts." in k}
    # Every expert's matrices lose their top directions; one no token reached is left alone.
    assert experts - unrouted <= changed and not (unrouted & changed)


def test_a_tokenizer_larger_than_the_embedding_is_refused(cli, tmp_path, tokenizer):
    from tests.conftest import build_tiny_llama, save_model
    from tests.test_score_cli import assert_one_line_error, score_args

    small = build_tiny_llama(vocab_size=64)
    directory = save_model(small, tokenizer, tmp_path / "small-vocab")
    result = cli(*score_args(directory, tmp_path / "store", method="magnitude"))
    assert_one_line_error(result, f"has {len(tokenizer)} tokens but the model's embedding has 64")


# ---------------------------------------------------------------------------------------------
# Fused matrices per part: a Phi-3 holding a Llama's weights gets the Llama's masks and edits


@pytest.fixture(scope="module")
def fused_and_unfused(tmp_path_factory, tokenizer, pairs_csv):
    """A Llama and the Phi-3 fusing its weights, each scored (wanda and actsvd, on harmful
    pairs and on the utility set) into a store of its own."""
    from typer.testing import CliRunner

    from tests.conftest import save_model
    from tests.families import fused_like_phi3
    from tests.test_score_cli import score_args
    from wandacli.cli import app

    root = tmp_path_factory.mktemp("fused")
    llama = build_family_model("llama", len(tokenizer))
    phi3 = fused_like_phi3(llama, len(tokenizer))
    ids = torch.randint(3, len(tokenizer), (1, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(phi3(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)
    found = {}
    runner = CliRunner()
    for name, model in (("unfused", llama), ("fused", phi3)):
        directory = save_model(model, tokenizer, root / name)
        store = root / f"{name}-store"
        for method in ("wanda", "actsvd"):
            for data, role in ((pairs_csv, "safety"), ("utility", "utility")):
                args = score_args(directory, store, "--name", f"{method}-{role}", method=method,
                                  data=data)  # fmt: skip
                result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
                assert result.exit_code == 0, result.output
        found[name] = (directory, store)
    return found


FUSED_REMOVALS = {
    "ratio": ("--scores", "wanda-safety", "--sparsity-ratio", "0.5"),
    "set-difference": ("--scores", "wanda-safety", "--utility-scores", "wanda-utility",
                       "--p", "0.3", "--q", "0.3"),
    "rank-removal": ("--scores", "actsvd-safety", "--remove-top-ranks", "3"),
    "projection": ("--scores", "actsvd-safety", "--utility-scores", "actsvd-utility",
                   "--safety-ranks", "3", "--utility-ranks", "2"),
}  # fmt: skip


@pytest.mark.parametrize("removal", FUSED_REMOVALS)
def test_a_fused_model_gets_what_its_unfused_weights_get(cli, fused_and_unfused, removal):
    from wandacli.config.settings import ModelSpec
    from wandacli.evaluation.under_test import load_model_under_test
    from wandacli.models.loader import load_model

    edited = {}
    for name, (directory, store) in fused_and_unfused.items():
        result = cli("prune", "--store", store, *FUSED_REMOVALS[removal], "--name", removal,
                     "--model", directory, "--no-progress")  # fmt: skip
        assert result.exit_code == 0, result.stderr
        under_test = load_model_under_test(ModelSpec(model=str(directory), device="cpu"),
                                           removal, store)  # fmt: skip
        edited[name] = {
            lin.key: lin.weight_matrix().detach() for lin in under_test.loaded.linear_layers
        }
    unfused, fused = edited["unfused"], edited["fused"]
    assert set(unfused) == set(fused)  # Phi-3's parts carry the unfused modules' names
    dense = load_model(ModelSpec(model=str(fused_and_unfused["fused"][0]), device="cpu"))
    changed = [
        lin.key
        for lin in dense.linear_layers
        if not torch.equal(lin.weight_matrix().detach(), fused[lin.key])
    ]
    assert any(key.endswith(("q_proj", "k_proj", "v_proj")) for key in changed)
    for key, weight in unfused.items():
        if removal in ("ratio", "set-difference"):
            assert torch.equal(fused[key] == 0, weight == 0), key  # the same entries pruned
        torch.testing.assert_close(fused[key], weight, rtol=1e-4, atol=1e-5, msg=key)


# ---------------------------------------------------------------------------------------------
# The family matrix on a GPU in bfloat16 (skipped without one; `pytest -m gpu` runs it there)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_the_family_on_cuda_in_bfloat16(family):
    """On CUDA in bfloat16 with transformers' default kernels: wanda's statistics and wandg's
    sums cover every matrix (finite), masks zero exactly what they say, and the direction edit
    takes r from the stream down to bfloat16's rounding (≤ 2% of the dense component, where
    r removed from the writers' weights alone leaves more in the families that need more)."""
    from wandacli.data.calibration import IGNORE_INDEX
    from wandacli.methods.wanda import ActivationStatistics
    from wandacli.methods.wandg import GradientAccumulator

    model = build_family_model(family, VOCAB).to("cuda", torch.bfloat16)
    if family in MIXTURES:
        model.set_experts_implementation("grouped_mm")  # the GPU's own kernel, as users run
    loaded = loaded_of(model)
    generator = torch.Generator().manual_seed(10)
    ids = torch.randint(3, VOCAB, (1, 64), generator=generator).cuda()
    statistics = ActivationStatistics(loaded.linear_layers)
    with statistics.recording():
        statistics.observe(model, ids, None)
    assert set(statistics.sums) == {lin.key for lin in loaded.linear_layers}
    assert all(bool(torch.isfinite(s).all()) for s in statistics.sums.values())
    labels = ids.clone()
    labels[0, :8] = IGNORE_INDEX
    accumulator = GradientAccumulator(loaded.linear_layers)
    with accumulator.recording():
        accumulator.observe(model, ids, labels)
    for lin in loaded.linear_layers:
        assert bool(torch.isfinite(accumulator.scores_layout(lin)).all()), lin.key

    masks = {
        lin.key: np.random.default_rng(11).random(lin.shape) < 0.3 for lin in loaded.linear_layers
    }
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        apply_mask(MaskContent(list(masks), masks.__getitem__), WeightChanges(loaded, undo=False))
    for lin in loaded.linear_layers:
        assert torch.all(lin.weight_matrix()[torch.from_numpy(masks[lin.key]).cuda()] == 0)
    model.load_state_dict(original)

    r = torch.randn(model.config.hidden_size, generator=generator, dtype=torch.float64)
    r = r / r.norm()
    dense = stream_components(model, r, ids)
    remove_direction(model, r)
    edited = stream_components(model, r, ids)
    assert max(a / b for a, b in zip(edited, dense, strict=True)) <= 2e-2, (edited, dense)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_the_shared_prefix_equals_each_prompt_alone(family, tokenizer):
    """eval-attack's and search's generation computes a batch's shared prefix once and pads
    each prompt's own tokens among themselves: on every family (sliding windows, softcapping,
    experts) a batch of prompts of different lengths gets each prompt's greedy response
    alone, unpadded; and the sampled rows of a prompt the draws of transformers' own
    generate, the prompt repeated, with wandacli's sampler (float64). Left-padded whole prompts, as eval-attack generated
    before, gave Gemma-2's padded rows other tokens (transformers 5, eager attention)."""
    import copy

    from tests.test_attack import plain_generate
    from wandacli.core import reference
    from wandacli.evaluation.backends.hf import HFGenerator
    from wandacli.evaluation.prompts import model_texts, read_prompts

    own_tokenizer = copy.deepcopy(tokenizer)
    own_tokenizer.pad_token = own_tokenizer.eos_token
    model = build_family_model(family, len(tokenizer)).double().eval()
    loaded = SimpleNamespace(model=model, tokenizer=own_tokenizer, input_device=torch.device("cpu"))
    prompts = read_prompts("advbench", offset=0, limit=5).texts
    with_system, special = model_texts(
        own_tokenizer, prompts[:3], "chat", system=reference.SAFETY_SYSTEM_PROMPT
    )
    texts = with_system + model_texts(own_tokenizer, prompts[3:], "chat")[0]
    greedy = HFGenerator(loaded, max_new_tokens=4, batch_size=4).generate(
        texts, add_special_tokens=special, samples=1, sampling=False, seed=0
    )
    alone = [plain_generate(loaded, [t], special, max_new_tokens=4, batch_size=1)[0]
             for t in texts]  # fmt: skip
    assert greedy == alone
    sampled = HFGenerator(loaded, max_new_tokens=4, batch_size=3).generate(
        texts[:1], add_special_tokens=special, samples=3, sampling=True, seed=1
    )
    assert sampled == plain_generate(loaded, texts[:1], special, max_new_tokens=4, batch_size=3,
                                     samples=3, seed=1)  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_a_decided_row_leaves_the_batch_and_the_others_get_their_own_tokens(family, tokenizer):
    """The search's refusal rate drops a row from the batch, its keys and values with it, once
    the row is decided (here: three distinct characters): on every family each row's response is
    the one transformers' generate gives the prompt alone, unpadded, stopped by the same
    criterion; and the rows leave at different steps."""
    import copy

    from transformers import GenerationConfig, StoppingCriteriaList

    from wandacli.evaluation.backends.hf import HFGenerator, _Decided, decoded_responses
    from wandacli.evaluation.prompts import model_texts, read_prompts
    from wandacli.models.pretrained import end_of_sequence_ids

    own_tokenizer = copy.deepcopy(tokenizer)
    own_tokenizer.pad_token = own_tokenizer.eos_token
    texts, special = model_texts(own_tokenizer, read_prompts("advbench", limit=6).texts, "chat")

    def decided(text):  # true at a step that depends on the row's text
        return len(set(text)) >= 3

    def each_alone(model):
        """Each prompt's response alone, unpadded, stopped by `decided`; and its steps."""
        eos = end_of_sequence_ids(SimpleNamespace(model=model, tokenizer=own_tokenizer))
        config = GenerationConfig(max_new_tokens=6, do_sample=False,
                                  pad_token_id=own_tokenizer.pad_token_id, eos_token_id=eos)  # fmt: skip
        responses, steps = [], []
        for text in texts:
            ids = own_tokenizer(text, return_tensors="pt", add_special_tokens=special).input_ids
            with torch.no_grad():
                output = model.generate(input_ids=ids, generation_config=config,
                                        stopping_criteria=StoppingCriteriaList(
                                            [_Decided(own_tokenizer, ids.shape[1], decided)]))  # fmt: skip
            row = output[0, ids.shape[1] :].tolist()
            responses += decoded_responses(own_tokenizer, [row], set(eos))
            steps.append(len(row))
        return responses, steps

    # Random weights at the first scale where the rows leave at different steps (a tiny random
    # model often answers every prompt alike).
    for scale in (0.1, 0.3, 1.0, 3.0):
        model = build_family_model(family, len(tokenizer)).double().eval()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
        alone, steps = each_alone(model)
        if min(steps) < max(steps):
            break
    loaded = SimpleNamespace(model=model, tokenizer=own_tokenizer, input_device=torch.device("cpu"))
    live = HFGenerator(loaded, max_new_tokens=6, batch_size=6).generate(
        texts, add_special_tokens=special, samples=1, sampling=False, seed=0, decided=decided
    )
    assert [group[0] for group in live] == alone
    assert min(steps) < max(steps)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_keeps_a_frozen_mask_bitwise_on_every_family(family):
    """`finetune --lora-rank --freeze`'s adapters on every family: a few steps, merged; every
    masked entry is as it was, the adapted matrices moved elsewhere, and what takes no adapter
    (an expert's slice of a 3-D parameter, a router of its own module type, norms,
    embeddings) did not move."""
    from wandacli.training.finetune import MaskedWeights
    from wandacli.training.lora import LoraAdapters

    torch.manual_seed(0)
    model = build_family_model(family, VOCAB)
    loaded = loaded_of(model)
    generator = np.random.default_rng(3)
    masks = {lin.key: generator.random(lin.shape) < 0.3 for lin in loaded.linear_layers}
    frozen = MaskedWeights(loaded, SimpleNamespace(keys=list(masks), read=masks.__getitem__))
    before = {lin.key: lin.weight_matrix().detach().clone() for lin in loaded.linear_layers}
    others = {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if id(p) not in {id(lin.weight) for lin in loaded.linear_layers}
    }
    lora = LoraAdapters(loaded, rank=2, alpha=4, frozen=frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(3):
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapted = {id(module.get_base_layer()) for module in lora.adapted.values()}
    lora.merge(frozen)
    model.eval()
    for lin in loaded.linear_layers:
        after, chosen = lin.weight_matrix().detach(), torch.from_numpy(masks[lin.key])
        assert torch.equal(after[chosen], before[lin.key][chosen]), lin.key
        moved = not torch.equal(after[~chosen], before[lin.key][~chosen])
        assert moved == (id(lin.module) in adapted), lin.key
        assert lin.expert is None or not moved, lin.key
    assert sum(id(lin.module) in adapted for lin in loaded.linear_layers) >= 6
    now = dict(model.named_parameters())
    assert all(torch.equal(now[name].detach(), value) for name, value in others.items())


def measured_model(family, tokenizer, layers, device="cpu", dtype=torch.float64):
    """A family's model as the search's measures read it: its tokenizer padding with the end
    of sequence, its device, fingerprint, id and dtype."""
    import copy

    own_tokenizer = copy.deepcopy(tokenizer)
    own_tokenizer.pad_token = own_tokenizer.eos_token
    model = build_family_model(family, len(tokenizer), layers=layers).to(device, dtype)
    loaded = loaded_of(model)
    loaded.tokenizer = own_tokenizer
    loaded.input_device = torch.device(device)
    loaded.fingerprint = fingerprint_of(loaded.linear_layers, model)
    loaded.model_id, loaded.dtype = family, dtype
    return loaded


def add_noise_from(first, loaded, changes, generator, scale):
    """Every matrix of layers `first` and up changed by `scale` × Gaussian noise; the layers
    below and the embedding left as they are."""
    for lin in loaded.linear_layers:
        if lin.layer >= first:
            matrix = lin.weight_matrix().detach()
            noise = torch.randn(matrix.shape, generator=generator).to(matrix)
            changes.replace(lin.key, matrix + scale * noise)


def kl_from_the_first_changed_layer(family, tokenizer, device, dtype, tolerance):
    """The KL of edits to layers ≥ 2 and ≥ 3 of a 4-layer model, measured whole and from the
    first changed layer, on `device` in `dtype`: equal within `tolerance` (relative), the lower
    layers' matrices not run, and 0 for the unchanged model."""
    from wandacli.evaluation.divergence import dense_distributions, kl_divergence, recorded_streams
    from wandacli.evaluation.prompts import model_texts, read_prompts

    loaded = measured_model(family, tokenizer, 4, device, dtype)
    model = loaded.model
    texts, special = model_texts(loaded.tokenizer, read_prompts("utility", limit=7).texts, "chat")
    dense = dense_distributions(
        loaded, texts, positions=2, add_special_tokens=special, batch_size=3
    )
    streams = recorded_streams(loaded, dense)
    assert streams.usable, streams.why_not
    assert streams.layers == [1, 2, 3]
    assert len(streams.batches) == len(dense.batches) >= 2

    layers = decoder_layers(model)
    ran = set()
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda *_, index=index: ran.add(index))
    generator = torch.Generator().manual_seed(3)
    for first in (2, 3):
        with WeightChanges(loaded) as changes:
            add_noise_from(first, loaded, changes, generator, 0.2)
            assert changes.unchanged_below() == first
            whole = kl_divergence(loaded, dense)
            ran.clear()
            shortcut = kl_divergence(
                loaded, dense, streams=streams, unchanged_below=changes.unchanged_below()
            )
        assert whole > 1e-4
        assert shortcut == pytest.approx(whole, rel=tolerance, abs=0)
        assert min(ran) == first  # the prefix's pass and the suffixes' both started there
    unchanged = kl_divergence(loaded, dense, streams=streams, unchanged_below=4)
    assert unchanged == pytest.approx(0.0, abs=1e-12 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_kl_from_the_first_changed_layer_equals_the_whole_pass(family, tokenizer):
    """The search measures a trial that leaves the embedding and the lower layers alone from
    its first changed layer, on the dense stream recorded there (evaluation/lower_layers.py):
    on every family (sliding windows, softcapping, parallel residuals, experts) the KL equals
    the whole pass's, and the lower layers' matrices do not run."""
    kl_from_the_first_changed_layer(family, tokenizer, "cpu", torch.float64, 1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_the_kl_from_the_first_changed_layer_on_cuda_in_bfloat16(family, tokenizer):
    """As on the CPU, with the GPU's kernels in bfloat16 (the check on the dense model passes;
    the KL within bfloat16's reordered sums of the whole pass's)."""
    kl_from_the_first_changed_layer(family, tokenizer, "cuda", torch.bfloat16, 1e-2)


def packed_as_alone(family, tokenizer, monkeypatch, device, dtype, tolerance):
    """The KL's dense distributions with packed batches (some row holding two prompts or
    more) equal each prompt's alone, and a trial's KL the padded batches', within `tolerance`
    (relative)."""
    from wandacli.evaluation import divergence
    from wandacli.evaluation import prefix as prefix_module
    from wandacli.evaluation.prefix import forward_logits, unpadded_rows
    from wandacli.evaluation.prompts import model_texts, read_prompts

    loaded = measured_model(family, tokenizer, 3, device, dtype)
    texts, special = model_texts(loaded.tokenizer, read_prompts("utility", limit=7).texts, "chat")
    layouts = []  # (prompts, rows) of each packed pass
    packed_batch = prefix_module.packed_batch

    def laid_out(rows, *args):
        batch = packed_batch(rows, *args)
        layouts.append((len(rows), batch.ids.shape[0]))
        return batch

    monkeypatch.setattr(prefix_module, "packed_batch", laid_out)

    dense = divergence.dense_distributions(
        loaded, texts, positions=2, add_special_tokens=special, batch_size=8
    )
    assert dense.packed, dense.why_not_packed
    assert any(rows < prompts for prompts, rows in layouts)  # a row holds two prompts or more
    pad = int(loaded.tokenizer.pad_token_id)
    for batch in dense.batches:
        for row, log_probs in zip(
            unpadded_rows(batch.input_ids, batch.attention_mask), batch.log_probs, strict=True
        ):
            alone = torch.log_softmax(forward_logits(loaded, [row], 2, pad)[0].float(), -1).cpu()
            atol = tolerance * float(alone.abs().max())
            assert torch.allclose(log_probs, alone, rtol=0, atol=atol)
    padded = dataclasses.replace(dense, packed=False)
    with WeightChanges(loaded) as changes:
        add_noise_from(1, loaded, changes, torch.Generator().manual_seed(0), 0.3)
        trial = divergence.kl_divergence(loaded, dense)
        assert trial > 1e-4
        assert trial == pytest.approx(divergence.kl_divergence(loaded, padded), rel=tolerance)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_laid_end_to_end_are_each_computed_as_alone(family, tokenizer, monkeypatch):
    """The KL's batches lay their prompts end to end in rows, none longer than the longest
    (evaluation/prefix.py): on every family each prompt's distributions are the ones it gets
    in a batch of its own, and a trial's KL is the padded batches' KL. Gemma-2's eager
    attention takes its softmax in float32, so there they agree to float32's rounding."""
    exact = family != "gemma2"
    packed_as_alone(family, tokenizer, monkeypatch, "cpu", torch.float64, 1e-12 if exact else 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_laid_end_to_end_on_cuda_in_bfloat16(family, tokenizer, monkeypatch):
    """As on the CPU, with the GPU's kernels in bfloat16: the check on the dense model lets
    the packed batches through, and they agree with each prompt alone to bfloat16's rounding."""
    packed_as_alone(family, tokenizer, monkeypatch, "cuda", torch.bfloat16, 5e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_batches_that_open_alike_run_their_opening_once(family, tokenizer, monkeypatch):
    """A measure's batches of prompts in one template open alike (the template's opening): the
    KL, the refusal score and greedy generation run that shared prefix once per measure,
    not once per batch, and get what running it per batch gets, bit for bit, on every family."""

    from wandacli.evaluation import prefix as prefix_module
    from wandacli.evaluation.backends.hf import HFGenerator
    from wandacli.evaluation.divergence import dense_distributions, kl_divergence
    from wandacli.evaluation.prompts import model_texts, read_prompts
    from wandacli.evaluation.refusal import refusal_score

    loaded = measured_model(family, tokenizer, 3)
    model = loaded.model
    texts, special = model_texts(loaded.tokenizer, read_prompts("utility", limit=7).texts, "chat")
    dense = dense_distributions(loaded, texts, positions=1, add_special_tokens=special,
                                batch_size=2)  # fmt: skip
    with WeightChanges(loaded) as changes:
        for lin in loaded.linear_layers:
            matrix = lin.weight_matrix().detach()
            changes.replace(lin.key, matrix * 1.3)

        # A prefix's pass is the one given its tokens alone: no mask, no positions, no cache.
        prefix_passes = []
        alone = {"input_ids", "use_cache", "logits_to_keep"}
        model.register_forward_pre_hook(
            lambda _m, _args, kwargs: prefix_passes.append(1) if set(kwargs) <= alone else None,
            with_kwargs=True,
        )

        def measures():
            prefix_passes.clear()
            kl = kl_divergence(loaded, dense)
            score = refusal_score(loaded, texts, add_special_tokens=special, batch_size=2)
            responses = HFGenerator(loaded, max_new_tokens=3, batch_size=2).generate(
                texts, add_special_tokens=special, samples=1, sampling=False, seed=0
            )
            return (kl, score, responses), len(prefix_passes)

        shared, shared_passes = measures()
        monkeypatch.setattr(prefix_module.SharedPrefixes, "get", lambda self, prefix: None)
        per_batch, per_batch_passes = measures()
    assert shared[0] > 1e-6
    assert shared == per_batch
    batches = len(dense.batches) + 2 * -(-len(texts) // 2)
    assert per_batch_passes == batches
    assert shared_passes < batches


@pytest.mark.parametrize("family", FAMILIES)
def test_the_refusal_prompts_pass_from_the_first_changed_layer_measures_the_same(family, tokenizer):
    """The search's refusal rate on a trial that leaves the lower layers alone runs the
    prompts' pass from its first changed layer on the recorded dense stream, the lower layers'
    keys and values the dense model's: on every family the responses are the whole pass's,
    token for token, and layer 0 runs only for the generated tokens. The refusal score (no
    generation) from there is the whole pass's too."""

    from wandacli.evaluation.prompts import model_texts, read_prompts
    from wandacli.evaluation.refusal import (
        prompt_streams,
        refusal_rate,
        refusal_score,
        score_streams,
    )

    loaded = measured_model(family, tokenizer, 4)
    model = loaded.model
    texts, special = model_texts(loaded.tokenizer, read_prompts("advbench", limit=5).texts, "chat")
    measure = {"add_special_tokens": special, "max_new_tokens": 5, "batch_size": 3}
    streams = prompt_streams(loaded, texts, **measure)
    assert streams.usable, streams.why_not
    assert len(streams.batches) == 2
    scored = score_streams(loaded, texts, add_special_tokens=special, batch_size=3)
    assert scored.usable, scored.why_not
    rows_through_layer_0 = []  # the positions each call of a layer-0 matrix ran
    first_matrix = next(
        m for m in decoder_layers(model)[0].modules() if isinstance(m, torch.nn.Linear)
    )
    first_matrix.register_forward_pre_hook(
        lambda _m, args: rows_through_layer_0.append(args[0].shape[-2])
    )
    generator = torch.Generator().manual_seed(5)
    for first in (2, 3):
        with WeightChanges(loaded) as changes:
            add_noise_from(first, loaded, changes, generator, 0.5)
            responses, widths = {}, {}
            for name, recorded in (("whole", None), ("shortcut", streams)):
                rows_through_layer_0.clear()
                responses[name] = refusal_rate(
                    loaded, texts, stop_at_phrase=True, streams=recorded,
                    unchanged_below=changes.unchanged_below(), **measure,
                )[1]  # fmt: skip
                widths[name] = set(rows_through_layer_0)
            scores = []
            for recorded in (None, scored):
                rows_through_layer_0.clear()
                scores.append(
                    refusal_score(loaded, texts, add_special_tokens=special, batch_size=3,
                                  streams=recorded, unchanged_below=changes.unchanged_below())
                )  # fmt: skip
            assert not rows_through_layer_0  # the score's passes both started above layer 0
        assert responses["shortcut"] == responses["whole"]
        # Layer 0 ran the prompts in the whole pass; from the first changed layer, only the
        # generated tokens, one position a step.
        assert widths["shortcut"] == {1} < widths["whole"]
        assert scores[1] == pytest.approx(scores[0], rel=1e-9, abs=0)
