"""The refusal direction as an edit (`prune --direction-layer`): the edited weights equal the
formula computed here, embedding included; the edited model's residual stream has no component
along r at any layer; a tied output head changes with the embedding as documented; bad input
is one line with the store untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_mean_activations import means_args
from tests.test_score_cli import assert_one_line_error
from wandacli.config.settings import ModelSpec
from wandacli.evaluation.under_test import load_model_under_test
from wandacli.models.loader import load_model
from wandacli.removal.direction import writer_keys
from wandacli.store.files import EditFile, MeanActivations


def copy_of_means(means_store, tmp_path):
    """A store of its own holding the two mean-activations sets (a search writes into it)."""
    store = tmp_path / "store"
    (store / "scores").mkdir(parents=True)
    for name in ("harmful.h5", "harmless.h5"):
        (store / "scores" / name).write_bytes((means_store / "scores" / name).read_bytes())
    return store


def direction_edit(cli, store, *extra):
    return cli("prune", "--store", store, "--scores", "harmful", "--utility-scores", "harmless",
               "--no-progress", *extra)  # fmt: skip


def expected_direction(store, layer, position):
    with MeanActivations(store / "scores" / "harmful.h5") as a:
        harmful = a.means()
    with MeanActivations(store / "scores" / "harmless.h5") as b:
        harmless = b.means()
    difference = torch.from_numpy(harmful[layer, position] - harmless[layer, position])
    return difference / difference.norm()


def edit_and_models(cli, store, model_dir, *args):
    """The direction edit `prune` makes with `args` (its name), and the model dense and with
    the edit applied in memory, as eval-attack applies it."""
    made = direction_edit(cli, store, *args, "--json")
    assert made.exit_code == 0, made.stderr
    name = json.loads(made.stdout)["name"]
    spec = ModelSpec(model=str(model_dir), device="cpu")
    return name, spec, load_model(spec), load_model_under_test(spec, name, store)


def test_the_edit_is_the_formula_and_the_stream_loses_r(cli, means_store, tiny_llama_dir):
    result = direction_edit(cli, means_store, "--direction-layer", "1", "--direction-position",
                            "-2", "--name", "d", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    r = expected_direction(means_store, 1, -2)
    dense = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
    edited = load_model_under_test(ModelSpec(model=str(tiny_llama_dir), device="cpu"), "d",
                                   means_store)  # fmt: skip
    assert edited.method == "refusal_direction"
    writers = set(writer_keys(dense.fingerprint, r.numel()))
    assert writers == {k for k in dense.fingerprint.shapes if k.endswith(("o_proj", "down_proj"))}
    after = {lin.key: lin.weight_matrix().detach().double() for lin in edited.loaded.linear_layers}
    for lin in dense.linear_layers:
        w = lin.weight_matrix().detach().double()
        expected = w - torch.outer(r, r) @ w if lin.key in writers else w
        assert torch.allclose(after[lin.key], expected, atol=1e-6), lin.key
    e = dense.model.get_input_embeddings().weight.detach().double()
    e_after = edited.loaded.model.get_input_embeddings().weight.detach().double()
    assert torch.allclose(e_after, e - (e @ r)[:, None] * r[None, :], atol=1e-6)
    # untied here: the output head is untouched
    assert torch.equal(edited.loaded.model.lm_head.weight, dense.model.lm_head.weight)
    # The defining property: no residual stream before the final norm has a component along r.
    ids = dense.tokenizer("Tell me how to do a thing, please.", return_tensors="pt").input_ids
    with torch.no_grad():
        streams = edited.loaded.model(ids, output_hidden_states=True).hidden_states
        dense_streams = dense.model(ids, output_hidden_states=True).hidden_states
    for layer, (h, h_dense) in enumerate(zip(streams[:-1], dense_streams[:-1], strict=True)):
        along = (h[0].double() @ r).abs().max()
        assert along <= 1e-5 * float(h[0].double().norm(dim=-1).max()), layer
        assert (h_dense[0].double() @ r).abs().max() > 10 * along  # it was there before
    with EditFile(means_store / "edits" / "d.h5") as stored:
        assert stored.mode == "direction" and stored.meta["embedding"] is True
        assert stored.meta["direction"]["layer"] == 1
        assert json.loads(result.stdout)["removed_rank_fraction"] == pytest.approx(
            len(writers) / sum(min(s) for s in dense.fingerprint.shapes.values())
        )


def test_a_scaled_direction_removes_that_share_of_it(cli, means_store, tiny_llama_dir):
    """`--direction-scale α`: W − α r rᵀ W and E − α (E r) rᵀ, so every writer's output keeps
    1 − α of its component along r; a random control of it is removed at the same α."""
    made = direction_edit(cli, means_store, "--direction-layer", "1", "--direction-scale", "0.25",
                          "--json")  # fmt: skip
    assert made.exit_code == 0, made.stderr
    name = json.loads(made.stdout)["name"]
    assert name.endswith("direction-l1p-1a0.25")
    r = expected_direction(means_store, 1, -1)
    spec = ModelSpec(model=str(tiny_llama_dir), device="cpu")
    dense = load_model(spec)
    edited = load_model_under_test(spec, name, means_store)
    after = {lin.key: lin.weight_matrix().detach().double() for lin in edited.loaded.linear_layers}
    writers = set(writer_keys(dense.fingerprint, r.numel()))
    for lin in dense.linear_layers:
        w = lin.weight_matrix().detach().double()
        expected = w - 0.25 * torch.outer(r, r) @ w if lin.key in writers else w
        assert torch.allclose(after[lin.key], expected, atol=1e-6), lin.key
        if lin.key in writers:  # the part along r: 3/4 of what it was
            assert torch.allclose(r @ after[lin.key], 0.75 * (r @ w), atol=1e-6)
    e = dense.model.get_input_embeddings().weight.detach().double()
    e_after = edited.loaded.model.get_input_embeddings().weight.detach().double()
    assert torch.allclose(e_after, e - 0.25 * (e @ r)[:, None] * r[None, :], atol=1e-6)
    with EditFile(means_store / "edits" / f"{name}.h5") as stored:
        assert stored.meta["direction_scale"] == 0.25
    control = cli("prune", "--store", means_store, "--scores", "harmful", "--match-ranks", name,
                  "--name", "scaled-random", "--no-progress")  # fmt: skip
    assert control.exit_code == 0, control.stderr
    with EditFile(means_store / "edits" / "scaled-random.h5") as stored:
        assert stored.meta["direction_scale"] == 0.25
        q = torch.from_numpy(stored.read_raw("direction")).double().reshape(-1)
    random_edit = load_model_under_test(spec, "scaled-random", means_store)
    e_random = random_edit.loaded.model.get_input_embeddings().weight.detach().double()
    assert torch.allclose(e_random @ q, 0.75 * (e @ q), atol=1e-6)


def test_a_tied_output_head_changes_with_the_embedding(cli, tmp_path, tokenizer, pairs_csv):
    """SmolLM2 ties its embeddings: orthogonalising E orthogonalises the head's rows too, so
    the logits no longer read the final hidden state's component along r."""
    from tests.conftest import build_tiny_llama, save_model

    model = build_tiny_llama(len(tokenizer), seed=5)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    tied_dir = save_model(model, tokenizer, tmp_path / "tied")
    store = tmp_path / "store"
    for data, name in ((pairs_csv, "harmful"), ("utility", "harmless")):
        made = cli(*means_args(tied_dir, store, data, "--template", "chat", "--name", name))
        assert made.exit_code == 0, made.stderr
    assert direction_edit(cli, store, "--direction-layer", "2", "--name", "d").exit_code == 0
    r = expected_direction(store, 2, -1)
    edited = load_model_under_test(ModelSpec(model=str(tied_dir), device="cpu"), "d", store)
    head = edited.loaded.model.get_output_embeddings().weight
    assert head.data_ptr() == edited.loaded.model.get_input_embeddings().weight.data_ptr()
    assert (head.detach().double() @ r).abs().max() <= 1e-6


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--direction-layer", "9"), "--direction-layer 9 is outside the sets' residual streams 0..2"),
        (("--direction-layer", "1", "--direction-position", "-4"), "use -3..-1"),
        (("--direction-layer", "1", "--direction-position", "0"), "use -3..-1"),
        (("--direction-layer", "1", "--remove-top-ranks", "2"), "drop one of them"),
        (("--direction-layer", "1", "--modules", "*q_proj"), "no module that writes"),
        (("--direction-layer", "1", "--direction-scale", "0"), "must lie in (0, 1]"),
        (("--direction-layer", "1", "--direction-scale", "1.5"), "must lie in (0, 1]"),
        (("--remove-top-ranks", "2", "--direction-scale", "0.5"), "give it with --direction-layer"),
    ],
)  # fmt: skip
def test_bad_direction_input_is_one_line(cli, means_store, tmp_path, extra, fragment):
    def listing():  # the store's files, but the empty flock targets in .locks/
        return sorted(p.name for p in means_store.rglob("*") if ".locks" not in p.parts)

    before = listing()
    assert_one_line_error(direction_edit(cli, means_store, *extra), fragment)
    assert listing() == before


def test_sets_of_another_kind_template_or_model_are_refused(
    cli, means_store, tiny_llama_dir, tiny_llama_base_dir, pairs_csv, tmp_path
):
    store = copy_of_means(means_store, tmp_path)
    raw = cli(*means_args(tiny_llama_dir, store, "utility", "--template", "raw", "--name", "raw"))
    other = cli(*means_args(tiny_llama_base_dir, store, "utility", "--template", "chat",
                            "--name", "other-model"))  # fmt: skip
    scores = cli("score", "--method", "wanda", "--model", str(tiny_llama_dir), "--store", store,
                 "--data", str(pairs_csv), "--nsamples", "2", "--name", "w", "--no-progress")  # fmt: skip
    assert raw.exit_code == other.exit_code == scores.exit_code == 0
    base = ("prune", "--store", store, "--scores", "harmful", "--direction-layer", "1")
    assert_one_line_error(cli(*base, "--utility-scores", "raw"), "different templates")
    assert_one_line_error(cli(*base, "--utility-scores", "w"), "not mean activations")
    assert_one_line_error(cli(*base), "needs two mean-activations sets")
    assert_one_line_error(cli(*base, "--utility-scores", "other-model"), "different models")
    assert not (store / "edits").exists()


def test_evaluation_takes_the_direction_edit(cli, means_store, tiny_llama_dir, tmp_path):
    assert direction_edit(cli, means_store, "--direction-layer", "1", "--name", "e").exit_code == 0
    out = tmp_path / "results" / "e"
    attack = cli("eval-attack", "--model", tiny_llama_dir, "--mask", "e", "--store", means_store,
                 "--configs", "basic_nosys", "--limit", "2", "--max-new-tokens", "2", "--device",
                 "cpu", "--out", out, "--no-progress")  # fmt: skip
    assert attack.exit_code == 0, attack.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["model_under_test"]["method"] == "refusal_direction"
    saved = tmp_path / "saved"
    assert direction_edit(cli, means_store, "--direction-layer", "1", "--name", "e", "--model",
                          tiny_llama_dir, "--save-model", saved).exit_code == 0  # fmt: skip
    reloaded = load_model(ModelSpec(model=str(saved), device="cpu"))
    in_memory = load_model_under_test(ModelSpec(model=str(tiny_llama_dir), device="cpu"), "e",
                                      means_store)  # fmt: skip
    assert torch.allclose(
        reloaded.model.get_input_embeddings().weight,
        in_memory.loaded.model.get_input_embeddings().weight,
    )
    assert np.isfinite(results["results"][0]["asr"])


# ---------------------------------------------------------------------------------------------
# The direction space in `search`

DIRECTION_SPACE = ("--scores", "harmful", "--utility-scores", "harmless",
                   "--direction-layer", "0:2", "--direction-position=-3:-1")  # fmt: skip


def test_a_direction_trial_equals_the_edit_and_is_undone(means_store, tiny_llama_dir, tmp_path):
    from tests.test_search import weights
    from wandacli.config.ranges import ParameterRange
    from wandacli.core.console import NullReporter
    from wandacli.removal.edits import run_edit
    from wandacli.removal.in_memory import WeightChanges
    from wandacli.search.config import SearchConfig
    from wandacli.search.removals import TrialRemovals, prune_config_for

    spec = ModelSpec(model=str(tiny_llama_dir), device="cpu")
    config = SearchConfig(
        name="t", scores="harmful", utility_scores="harmless", model=spec, store=means_store,
        direction_layer=ParameterRange(0, 2, True), direction_position=ParameterRange(-3, -1, True),
    )  # fmt: skip
    removals = TrialRemovals(config, means_store)
    loaded = load_model(spec)
    removals.prepare(loaded, NullReporter())
    original = weights(loaded)
    embedding = loaded.model.get_input_embeddings().weight.detach().clone()
    for params in (
        {"direction_layer": 2, "direction_position": -2},
        {"direction_layer": 1, "direction_position": -1, "direction_scale": 0.4},
    ):
        with WeightChanges(loaded) as changes:
            applied = removals.apply(params, changes)
            in_memory = weights(loaded)
            in_memory_embedding = loaded.model.get_input_embeddings().weight.detach().clone()
        assert all(torch.equal(original[k], w) for k, w in weights(loaded).items())
        assert torch.equal(loaded.model.get_input_embeddings().weight, embedding)  # restored
        name = f"by-prune-{len(params)}"
        result = run_edit(prune_config_for(config, params, name), command_line=["test"])
        assert applied.amount == pytest.approx(result.removed_rank_fraction)
        edited = load_model_under_test(spec, name, means_store)
        for lin in edited.loaded.linear_layers:
            assert torch.allclose(in_memory[lin.key], lin.weight_matrix().detach(), atol=1e-6)
        assert torch.allclose(
            in_memory_embedding, edited.loaded.model.get_input_embeddings().weight, atol=1e-6
        )
    removals.close()


def test_a_projected_direction_is_orthogonal_to_the_harmless_mean(cli, means_store, tiny_llama_dir):
    """`--direction-projected 1`: r ← normalise(r − (r·m̂) m̂), m the harmless mean at the same
    stream and position (heretic's projected direction); that r is what the edit stores and
    removes, and the stream then carries none of it."""
    made = direction_edit(cli, means_store, "--direction-layer", "1", "--direction-projected",
                          "1", "--json")  # fmt: skip
    assert made.exit_code == 0, made.stderr
    name = json.loads(made.stdout)["name"]
    assert name.endswith("direction-l1p-1-projected")
    r = expected_direction(means_store, 1, -1).double()
    with MeanActivations(means_store / "scores" / "harmless.h5") as harmless:
        m = torch.from_numpy(harmless.means()[1, -1]).double()
    m_hat = m / m.norm()
    projected = r - (r @ m_hat) * m_hat
    projected = projected / projected.norm()
    with EditFile(means_store / "edits" / f"{name}.h5") as stored:
        kept = torch.from_numpy(stored.read_raw("direction")).double().reshape(-1)
        assert "projected" in stored.meta["direction"]
    assert torch.allclose(kept, projected, atol=1e-6)
    assert abs(float(kept @ m_hat)) < 1e-6 and abs(float(r @ m_hat)) > 1e-3  # it was not before
    spec = ModelSpec(model=str(tiny_llama_dir), device="cpu")
    edited = load_model_under_test(spec, name, means_store)
    ids = edited.loaded.tokenizer("Tell me how to do a thing.", return_tensors="pt").input_ids
    with torch.no_grad():
        streams = edited.loaded.model(ids, output_hidden_states=True).hidden_states
    for h in streams[:-1]:
        assert (h[0].double() @ kept).abs().max() <= 1e-5 * float(h[0].double().norm(dim=-1).max())
    unprojected = direction_edit(cli, means_store, "--direction-layer", "1", "--json")
    assert json.loads(unprojected.stdout)["name"].endswith("direction-l1p-1")  # the default: 0
    bad = direction_edit(cli, means_store, "--direction-layer", "1", "--direction-projected", "3")
    assert_one_line_error(bad, "--direction-projected 3")


def harmless_unit_mean(store, stream, position=-1):
    with MeanActivations(store / "scores" / "harmless.h5") as harmless:
        m = torch.from_numpy(harmless.means()[stream, position]).double()
    return m / m.norm()


def orthogonalised(r, m_hat):
    projected = r - (r @ m_hat) * m_hat
    return projected / projected.norm()


def test_a_biprojected_direction_is_removed_per_layer(cli, means_store, tiny_llama_dir):
    """`--direction-projected 2`: r projected at its source (as 1), then each decoder layer's
    writers made orthogonal to r orthogonalised against the harmless mean of the stream they
    write, hidden_states[i + 1]; each writer's own direction is stored, the embedding loses the
    source's r."""
    name, _, dense, edited = edit_and_models(cli, means_store, tiny_llama_dir, "--direction-layer",
                                             "1", "--direction-projected", "2")  # fmt: skip
    assert name.endswith("direction-l1p-1-biprojected")
    source = orthogonalised(expected_direction(means_store, 1, -1).double(),
                            harmless_unit_mean(means_store, 1))  # fmt: skip
    after = {lin.key: lin.weight_matrix().detach().double() for lin in edited.loaded.linear_layers}
    writers = set(writer_keys(dense.fingerprint, source.numel()))
    with EditFile(means_store / "edits" / f"{name}.h5") as stored:
        assert "biprojected" in stored.meta["direction"]["projected"]
        kept = torch.from_numpy(stored.read_raw("direction")).double().reshape(-1)
        own = {k: torch.from_numpy(stored.bases(k)["remove"]).double().reshape(-1) for k in writers}
    assert torch.allclose(kept, source, atol=1e-6)
    for lin in dense.linear_layers:
        w = lin.weight_matrix().detach().double()
        if lin.key not in writers:
            assert torch.equal(after[lin.key], w)
            continue
        u = orthogonalised(source, harmless_unit_mean(means_store, lin.layer + 1))
        assert torch.allclose(own[lin.key], u, atol=1e-6), lin.key
        assert torch.allclose(after[lin.key], w - torch.outer(u, u) @ w, atol=1e-6), lin.key
        assert float((u @ after[lin.key]).abs().max()) < 1e-5
    assert len({tuple(v.tolist()) for v in own.values()}) > 1  # the layers' directions differ
    e = dense.model.get_input_embeddings().weight.detach().double()
    e_after = edited.loaded.model.get_input_embeddings().weight.detach().double()
    assert torch.allclose(e_after, e - (e @ source)[:, None] * source[None, :], atol=1e-6)


@pytest.mark.parametrize("projected", ["0", "1"])
def test_per_layer_each_layers_writers_lose_their_own_streams_direction(
    cli, means_store, tiny_llama_dir, projected
):
    """`--direction-per-layer 1` (heretic's per-layer scope): decoder layer i's writers are
    made orthogonal to r_(i+1), the direction of the stream they write (projected against that
    stream's harmless mean with --direction-projected 1), each stored per writer; the other
    weights are untouched, and the embedding loses --direction-layer's r."""
    name, _, dense, edited = edit_and_models(cli, means_store, tiny_llama_dir, "--direction-layer",
                                             "1", "--direction-per-layer", "1",
                                             "--direction-projected", projected)  # fmt: skip
    assert "-per-layer" in name

    def own_direction(stream):
        r = expected_direction(means_store, stream, -1).double()
        return orthogonalised(r, harmless_unit_mean(means_store, stream)) if projected == "1" else r

    after = {lin.key: lin.weight_matrix().detach().double() for lin in edited.loaded.linear_layers}
    source = own_direction(1)
    writers = set(writer_keys(dense.fingerprint, source.numel()))
    with EditFile(means_store / "edits" / f"{name}.h5") as stored:
        assert "per-layer" in stored.meta["direction"]["per_layer"]
    for lin in dense.linear_layers:
        w = lin.weight_matrix().detach().double()
        if lin.key not in writers:
            assert torch.equal(after[lin.key], w)
            continue
        u = own_direction(lin.layer + 1)
        assert torch.allclose(after[lin.key], w - torch.outer(u, u) @ w, atol=1e-6), lin.key
        assert float((u @ after[lin.key]).abs().max()) < 1e-5
    e = dense.model.get_input_embeddings().weight.detach().double()
    e_after = edited.loaded.model.get_input_embeddings().weight.detach().double()
    assert torch.allclose(e_after, e - (e @ source)[:, None] * source[None, :], atol=1e-6)
    several = direction_edit(cli, means_store, "--direction-layer", "1", "--direction-per-layer",
                             "1", "--directions", "2")  # fmt: skip
    assert_one_line_error(several, "--direction-per-layer removes one direction per layer")


def assert_control_keeps_norms(cli, store, name, spec, dense, writers, *, dim):
    """The `--match-ranks` control of a norm-preserving edit keeps the same norms (columns:
    dim 0, rows: dim 1) within 1e-6 relative, and says so in its meta."""
    control = cli("prune", "--store", store, "--scores", "harmful", "--match-ranks", name,
                  "--name", f"{name}.random", "--no-progress")  # fmt: skip
    assert control.exit_code == 0, control.stderr
    with EditFile(store / "edits" / f"{name}.random.h5") as stored:
        assert "norm_preserving" in stored.meta
    random_edit = load_model_under_test(spec, f"{name}.random", store)
    for lin in random_edit.loaded.linear_layers:
        if lin.key in writers:
            w = next(d for d in dense.linear_layers if d.key == lin.key).weight_matrix().double()
            got = lin.weight_matrix().detach().double().norm(dim=dim)
            assert ((got - w.norm(dim=dim)).abs() / w.norm(dim=dim)).max() <= 1e-6


def test_row_norm_preserving_is_heretics_magnitude_preserving_ablation(
    cli, means_store, tiny_llama_dir
):
    """`--norm-preserving 2`: each writer's rows made unit, r removed from that matrix, its
    rows made unit again and scaled back to their norms (heretic's MPOA, exactly): every row
    keeps its norm within 1e-6 relative; the meta says so, and a stored file reads back as
    the same edit (its random control keeps the rows' norms too)."""
    name, spec, dense, edited = edit_and_models(cli, means_store, tiny_llama_dir,
                                                "--direction-layer", "1", "--norm-preserving",
                                                "2")  # fmt: skip
    assert name.endswith("direction-l1p-1-row-norm-preserving")
    r = expected_direction(means_store, 1, -1).double()
    after = {lin.key: lin.weight_matrix().detach().double() for lin in edited.loaded.linear_layers}
    writers = set(writer_keys(dense.fingerprint, r.numel()))
    for key in writers:
        w = next(lin for lin in dense.linear_layers if lin.key == key).weight_matrix().double()
        unit = w / w.norm(dim=1, keepdim=True)
        projected = unit - torch.outer(r, r) @ unit
        expected = projected / projected.norm(dim=1, keepdim=True) * w.norm(dim=1, keepdim=True)
        assert torch.allclose(after[key], expected.float().double(), atol=1e-6), key
        relative = ((after[key].norm(dim=1) - w.norm(dim=1)).abs() / w.norm(dim=1)).max()
        assert relative <= 1e-6, (key, float(relative))
    with EditFile(means_store / "edits" / f"{name}.h5") as stored:
        assert "heretic" in stored.meta["norm_preserving"]
    assert_control_keeps_norms(cli, means_store, name, spec, dense, writers, dim=1)
    bad = direction_edit(cli, means_store, "--direction-layer", "1", "--norm-preserving", "3")
    assert_one_line_error(bad, "--norm-preserving 3")


def test_a_norm_preserving_edit_keeps_every_column_norm(cli, means_store, tiny_llama_dir):
    """`--norm-preserving 1`: each writer column w ← ‖w‖ normalise(w − r rᵀ w), each embedding
    row likewise; the norms are kept within 1e-6 relative, the stream carries no r, and a
    random control of it keeps norms too."""
    name, spec, dense, edited = edit_and_models(cli, means_store, tiny_llama_dir,
                                                "--direction-layer", "1", "--norm-preserving",
                                                "1")  # fmt: skip
    assert name.endswith("direction-l1p-1-norm-preserving")
    r = expected_direction(means_store, 1, -1).double()
    after = {lin.key: lin.weight_matrix().detach().double() for lin in edited.loaded.linear_layers}
    writers = set(writer_keys(dense.fingerprint, r.numel()))
    for key in writers:
        w = next(lin for lin in dense.linear_layers if lin.key == key).weight_matrix().double()
        plain = w - torch.outer(r, r) @ w
        expected = plain * (w.norm(dim=0) / plain.norm(dim=0))
        assert torch.allclose(after[key], expected.float().double(), atol=1e-6), key
        relative = ((after[key].norm(dim=0) - w.norm(dim=0)).abs() / w.norm(dim=0)).max()
        assert relative <= 1e-6, (key, float(relative))
        assert float((r @ after[key]).abs().max()) < 1e-5
    e = dense.model.get_input_embeddings().weight.detach().double()
    e_after = edited.loaded.model.get_input_embeddings().weight.detach().double()
    assert ((e_after.norm(dim=1) - e.norm(dim=1)).abs() / e.norm(dim=1)).max() <= 1e-6
    assert float((e_after @ r).abs().max()) < 1e-5
    ids = dense.tokenizer("Tell me how to do a thing.", return_tensors="pt").input_ids
    with torch.no_grad():
        streams = edited.loaded.model(ids, output_hidden_states=True).hidden_states
    for h in streams[:-1]:
        assert (h[0].double() @ r).abs().max() <= 1e-5 * float(h[0].double().norm(dim=-1).max())
    with EditFile(means_store / "edits" / f"{name}.h5") as stored:
        assert "norm_preserving" in stored.meta
    assert_control_keeps_norms(cli, means_store, name, spec, dense, writers, dim=0)


def test_a_search_tries_both_directions(cli, means_store, tiny_llama_dir, tmp_path):
    from tests.test_search import QUICK

    store = copy_of_means(means_store, tmp_path)
    result = cli("search", "--model", tiny_llama_dir, "--store", store, "--name", "both", *QUICK,
                 "--scores", "harmful", "--utility-scores", "harmless", "--direction-layer", "1:2",
                 "--direction-projected", "0:2", "--norm-preserving", "0:1", "--trials", "4",
                 "--keep-best", "refusal:2", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    assert {t["params"]["direction_projected"] for t in found["trials"]} <= {0, 1, 2}
    assert {t["params"]["norm_preserving"] for t in found["trials"]} <= {0, 1}
    best = next(t for t in found["front"] if t["index"] == found["best"]["index"])
    with EditFile(store / "edits" / "both.best.h5") as kept:
        assert ("projected" in kept.meta["direction"]) == bool(
            best["params"]["direction_projected"]
        )
        assert ("norm_preserving" in kept.meta) == bool(best["params"]["norm_preserving"])


def test_search_over_the_direction_space(cli, means_store, tiny_llama_dir, tmp_path):
    from tests.test_search import QUICK

    store = copy_of_means(means_store, tmp_path)
    result = cli("search", "--model", tiny_llama_dir, "--store", store, "--name", "dir", *QUICK,
                 *DIRECTION_SPACE, "--trials", "3", "--keep-best", "refusal:2", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    for trial in found["trials"]:
        assert set(trial["params"]) == {"direction_layer", "direction_position"}
        assert 0 <= trial["params"]["direction_layer"] <= 2
        assert -3 <= trial["params"]["direction_position"] <= -1
        # At the embeddings' output the chat template's last tokens are the same for every
        # prompt: no direction there, and the trial measures the dense model.
        empty = trial["params"]["direction_layer"] == 0
        assert (trial["removed_rank_fraction"] == 0) == empty
        assert trial["kl"] == 0 if empty else trial["kl"] > 0
    assert found["control"] is not None  # a random unit direction removed the same way
    scaled = cli("search", "--model", tiny_llama_dir, "--store", store, "--name", "scaled", *QUICK,
                 *DIRECTION_SPACE, "--direction-scale", "0.2:1", "--trials", "3", "--keep-best",
                 "refusal:2", "--json")  # fmt: skip
    assert scaled.exit_code == 0, scaled.stderr
    searched = json.loads(scaled.stdout)
    for trial in searched["trials"]:
        assert 0.2 <= trial["params"]["direction_scale"] <= 1
    best = next(t for t in searched["front"] if t["index"] == searched["best"]["index"])
    with EditFile(store / "edits" / "scaled.best.h5") as kept:
        assert kept.meta["direction_scale"] == best["params"]["direction_scale"]
    with EditFile(store / "edits" / "dir.best.h5") as best:
        assert best.mode == "direction"
        assert (
            best.meta["direction"]["layer"]
            == next(t for t in found["front"] if t["index"] == found["best"]["index"])["params"][
                "direction_layer"
            ]
        )


@pytest.mark.parametrize(
    ("ranges", "fragment"),
    [
        (("--direction-layer", "0:9"), "reaches above the sets' residual streams 0..2"),
        (("--direction-layer", "0:1", "--direction-position=-9:-1"), "reaches before"),
        (("--direction-layer", "0:1", "--direction-position=-3:0"), "count from the end"),
        (("--direction-layer", "0:1", "--direction-scale", "0.5:1.2"), "must lie in (0, 1]"),
        (("--direction-layer", "0:1", "--direction-scale", "0.5:1", "--select", "reference"),
         "drop --direction-scale"),
    ],
)  # fmt: skip
def test_bad_direction_ranges_are_one_line(cli, means_store, tiny_llama_dir, ranges, fragment):
    from tests.test_search import QUICK

    result = cli("search", "--model", tiny_llama_dir, "--store", means_store, "--name", "bad",
                 *QUICK, "--scores", "harmful", "--utility-scores", "harmless", *ranges)  # fmt: skip
    assert_one_line_error(result, fragment)
    assert not (means_store / "searches" / "bad").exists()


# ---------------------------------------------------------------------------------------------
# The reference's selection (`search --select reference`)


def test_the_reference_filters_on_a_hand_built_case(monkeypatch):
    """Ten layers; per candidate a KL, a bypass and an induce score given here: the last 20% of
    layers, KL > 0.1 and induce < 0 are discarded, then the lowest bypass wins."""
    import contextlib
    import types

    from wandacli.search import select

    table = {  # (layer, position): (kl, bypass, induce)
        (2, -1): (0.05, -1.0, 0.5),  # kept
        (3, -1): (0.20, -9.0, 0.5),  # KL too high, despite the best bypass
        (4, -1): (0.01, -5.0, -0.1),  # induces no refusal
        (5, -1): (0.02, -3.0, 0.2),  # kept, the lowest bypass: chosen
        (8, -1): (0.00, -8.0, 1.0),  # the last 20% of 10 layers: 8 and 9
        (1, -1): None,  # the two means are equal: no direction
    }
    current: dict[str, tuple] = {}

    class Removals:
        means = (np.zeros((11, 1, 4)), np.zeros((11, 1, 4)))

        def direction(self, params):
            key = (params["direction_layer"], params["direction_position"])
            current["key"] = key
            return None if table[key] is None else torch.ones(4) / 2

        def apply(self, params, changes):
            return None

    @contextlib.contextmanager
    def no_changes(loaded):
        yield None

    @contextlib.contextmanager
    def added(loaded, layer, vector):
        current["adding"] = True
        yield
        current["adding"] = False

    def score(loaded, texts, **_):
        kl, bypass, induce = table[current["key"]]
        return induce if current.get("adding") else bypass

    monkeypatch.setattr(select, "WeightChanges", no_changes)
    monkeypatch.setattr(select, "activation_added", added)
    monkeypatch.setattr(select, "refusal_score", score)
    monkeypatch.setattr(select, "kl_divergence", lambda loaded, dense: table[current["key"]][0])
    loaded = types.SimpleNamespace(fingerprint=types.SimpleNamespace(num_layers=10))
    candidates = [{"direction_layer": layer, "direction_position": p} for layer, p in table]
    result = select.select_reference(
        loaded, Removals(), candidates, harmful_texts=["h"], harmless_texts=["n"], special=False,
        dense_last=None, batch_size=1,
    )  # fmt: skip
    reasons = {
        (e["params"]["direction_layer"]): e.get("discarded", "") for e in result["candidates"]
    }
    assert reasons[2] == "" and reasons[5] == ""
    assert reasons[3].startswith("KL 0.2 > 0.1")
    assert reasons[4].startswith("induce -0.1 < 0")
    assert reasons[8].startswith("layer 8 is in the last 20%")
    assert reasons[1].startswith("no direction")
    assert result["chosen"]["params"] == {"direction_layer": 5, "direction_position": -1}


def test_select_reference_from_the_cli(cli, means_store, tiny_llama_dir, tmp_path):
    from tests.test_search import QUICK

    store = copy_of_means(means_store, tmp_path)
    result = cli("search", "--model", tiny_llama_dir, "--store", store, "--name", "ref", *QUICK,
                 *DIRECTION_SPACE, "--select", "reference", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    selection = found["selection"]
    assert len(selection["candidates"]) == 9  # layers 0..2 × positions -3..-1
    for entry in selection["candidates"]:
        layer = entry["params"]["direction_layer"]
        if layer == 0:
            assert entry["discarded"].startswith("no direction")
            continue
        # two layers: int(2 × 0.8) = 1, so layers 1 and 2 are the last 20%
        assert entry["discarded"].startswith("layer") and {"kl", "bypass"} <= set(entry)
        assert ("induce" in entry) == (layer < 2)  # hidden_states[2] is after the final norm
    assert selection["chosen"] is None and found["best"] is None
    assert not (store / "edits").exists()
    wrong = cli("search", "--model", tiny_llama_dir, "--store", store, "--name", "w", *QUICK,
                "--scores", "harmful", "--utility-scores", "harmless", "--p", "0.1:0.2",
                "--q", "0.1:0.2", "--select", "reference")  # fmt: skip
    assert_one_line_error(wrong, "--select reference chooses a refusal direction")


def test_a_repeated_point_is_measured_once(cli, means_store, tiny_llama_dir, tmp_path, monkeypatch):
    """On a two-point grid, six trials: TPE proposes points again, and a trial that repeats
    a completed one's parameters takes its measures instead of measuring the same removal."""
    from tests.test_search import QUICK
    from wandacli.search import objectives as search_run

    measured = []
    original = search_run.kl_divergence

    def counted(loaded, dense, **kwargs):
        measured.append(1)
        return original(loaded, dense, **kwargs)

    monkeypatch.setattr(search_run, "kl_divergence", counted)
    result = cli("search", "--model", tiny_llama_dir, "--store", means_store, "--name", "grid",
                 *QUICK, "--scores", "harmful", "--utility-scores", "harmless",
                 "--direction-layer", "1:1", "--direction-position=-2:-1", "--trials", "6",
                 "--no-control", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    trials = found["trials"]
    assert len(trials) == 6
    points = {(t["params"]["direction_position"]) for t in trials}
    repeats = [t for t in trials if "measured_as" in t]
    assert len(repeats) == 6 - len(points) > 0
    assert len(measured) == 1 + len(points)  # the dense model, then each point once
    by_index = {t["index"]: t for t in trials}
    for t in repeats:
        first = by_index[t["measured_as"]]
        assert t["params"] == first["params"] and "measured_as" not in first
        assert (t["refusal"], t["kl"]) == (first["refusal"], first["kl"])
    assert len({t["index"] for t in found["front"]}) == len(found["front"])
    assert all("measured_as" not in t for t in found["front"])


def test_an_interrupted_selection_resumes_with_the_candidates_it_scored(
    cli, means_store, tiny_llama_dir, tmp_path, monkeypatch
):
    """Ctrl-C in the middle of `--select reference`: the candidates scored so far are in
    search.json, the same command scores only the others and chooses as an uninterrupted run."""
    from tests.test_search import QUICK
    from wandacli.search import select

    def run(store, name):
        return cli("search", "--model", tiny_llama_dir, "--store", store, "--name", name,
                   *QUICK, *DIRECTION_SPACE, "--select", "reference", "--json")  # fmt: skip

    store = copy_of_means(means_store, tmp_path)
    whole = run(store, "whole")
    assert whole.exit_code == 0, whole.stderr

    measured = []
    original = select.kl_divergence

    def counted_kl(loaded, dense):
        if len(measured) == 4:
            raise KeyboardInterrupt
        measured.append(1)
        return original(loaded, dense)

    with monkeypatch.context() as patch:
        patch.setattr(select, "kl_divergence", counted_kl)
        stopped = run(store, "resumed")
    assert stopped.exit_code == 130
    assert "the same command resumes" in stopped.stderr
    summary = json.loads((store / "searches" / "resumed" / "search.json").read_text())
    kept = summary["selection"]["candidates"]
    assert len(kept) == 7  # positions of layer 0 have no direction; 4 measured, then Ctrl-C

    measured.clear()
    with monkeypatch.context() as patch:
        patch.setattr(
            select,
            "kl_divergence",
            lambda loaded, dense: measured.append(1) or original(loaded, dense),
        )
        resumed = run(store, "resumed")
    assert resumed.exit_code == 0, resumed.stderr
    assert len(measured) == 9 - 7  # only the candidates the first run did not reach
    first, second = json.loads(whole.stdout)["selection"], json.loads(resumed.stdout)["selection"]
    assert second["candidates"] == first["candidates"]
    assert second["chosen"] == first["chosen"]


def test_the_random_direction_control(cli, means_store, tiny_llama_dir):
    """`--match-ranks` on a direction edit: a seeded random unit vector, removed the same way
    (every writer and the embedding)."""
    assert direction_edit(cli, means_store, "--direction-layer", "1", "--name", "m").exit_code == 0
    made = cli("prune", "--store", means_store, "--scores", "harmful", "--match-ranks", "m",
               "--seed", "3", "--name", "m-random", "--no-progress")  # fmt: skip
    assert made.exit_code == 0, made.stderr
    with EditFile(means_store / "edits" / "m-random.h5") as control:
        assert control.mode == "direction" and control.meta["embedding"] is True
        assert control.meta["matched_edit"]["name"] == "m"
        r = torch.from_numpy(control.read_raw("direction")).double().reshape(-1)
        with EditFile(means_store / "edits" / "m.h5") as matched:
            assert set(control.keys) == set(matched.keys)
            chosen = torch.from_numpy(matched.read_raw("direction")).double().reshape(-1)
    assert abs(float(r.norm()) - 1) < 1e-6 and abs(float(r @ chosen)) < 0.9
    spec = ModelSpec(model=str(tiny_llama_dir), device="cpu")
    edited = load_model_under_test(spec, "m-random", means_store)
    assert edited.method == "random"
    e = edited.loaded.model.get_input_embeddings().weight.detach().double()
    assert float((e @ (r / r.norm())).abs().max()) <= 1e-6


def test_the_random_direction_control_saves_a_model(cli, means_store, tiny_llama_dir, tmp_path):
    """`--match-ranks <direction edit> --model M --save-model OUT`: the saved model is the
    control applied (it ended in an UnboundLocalError, shown as "internal error")."""
    assert direction_edit(cli, means_store, "--direction-layer", "2", "--name", "s").exit_code == 0
    out = tmp_path / "saved"
    made = cli("prune", "--store", means_store, "--scores", "harmful", "--match-ranks", "s",
               "--seed", "4", "--name", "s-random", "--model", tiny_llama_dir, "--save-model",
               out, "--no-progress")  # fmt: skip
    assert made.exit_code == 0, made.stderr
    spec = ModelSpec(model=str(tiny_llama_dir), device="cpu")
    in_memory = load_model_under_test(spec, "s-random", means_store).loaded
    saved = load_model(ModelSpec(model=str(out), device="cpu"))
    for lin, kept in zip(in_memory.linear_layers, saved.linear_layers, strict=True):
        assert torch.equal(lin.weight_matrix(), kept.weight_matrix()), lin.key
    assert torch.equal(
        in_memory.model.get_input_embeddings().weight, saved.model.get_input_embeddings().weight
    )
    assert json.loads((out / "wandacli-mask.json").read_text())["matched_edit"]["name"] == "s"


# ---------------------------------------------------------------------------------------------
# The levels side by side (`compare`)


def test_compare_directions_across_layers(cli, means_store, tmp_path):
    result = cli("compare", "harmful", "harmless", "--store", means_store, "--position", "-1",
                 "--json", "--csv", tmp_path / "c.csv", "--plot", tmp_path / "c.png")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    cosines = np.array(
        [[np.nan if v is None else v for v in row] for row in found["cosines"]], dtype=float
    )
    expected = np.stack([expected_direction(means_store, layer, -1).numpy() for layer in (1, 2)])
    assert np.allclose(cosines[1:, 1:], expected @ expected.T, atol=1e-6)
    assert np.isnan(cosines[0]).all()  # the embeddings' output: no direction at the template
    assert (tmp_path / "c.png").is_file() and (tmp_path / "c.csv").read_text().startswith("layer_a")


def test_compare_a_direction_with_rank_statistics(cli, means_store, tiny_llama_dir, pairs_csv):
    from wandacli.removal.ranks import top_output_directions
    from wandacli.store.files import RankStatistics

    made = cli("score", "--method", "actsvd", "--model", str(tiny_llama_dir), "--store",
               means_store, "--data", str(pairs_csv), "--nsamples", "4", "--name", "actsvd-h",
               "--no-progress")  # fmt: skip
    assert made.exit_code == 0, made.stderr
    assert direction_edit(cli, means_store, "--direction-layer", "1", "--name", "c").exit_code == 0
    result = cli("compare", "c", "actsvd-h", "--store", means_store, "--model", tiny_llama_dir,
                 "--ranks", "4", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    values = json.loads(result.stdout)["values"]
    r = expected_direction(means_store, 1, -1).double()
    loaded = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
    with RankStatistics(means_store / "scores" / "actsvd-h.h5") as stats:
        for lin in loaded.linear_layers:
            if lin.key in values:
                basis = top_output_directions(
                    lin.weight_matrix().detach().double(), torch.from_numpy(stats.read(lin.key)), 4
                )
                assert values[lin.key] == pytest.approx(float(((basis.T @ r) ** 2).sum()), abs=1e-6)
    assert set(values) == set(writer_keys(loaded.fingerprint, r.numel()))
    no_model = cli("compare", "c", "actsvd-h", "--store", means_store)
    assert_one_line_error(no_model, "needs --model")


def test_layer_zero_is_explained_not_blamed_on_the_prompts(cli, means_store):
    from tests.test_score_cli import assert_one_line_error

    result = direction_edit(cli, means_store, "--direction-layer", "0")
    assert_one_line_error(result, "--direction-layer 0 is the embeddings' output",
                          "choose a layer of 1 or more")  # fmt: skip


@pytest.mark.parametrize("fixed", [(), ("--direction-scale", "0.7:0.7")])
def test_a_small_space_is_tried_cell_by_cell_before_tpe(
    cli, means_store, tiny_llama_dir, tmp_path, fixed
):
    """Every (layer, position) cell of a space the trials can cover is tried once, in a seeded
    order, before TPE proposes: a small grid has no untried cell left, where TPE alone may
    miss the best one. A float fixed at one value is no axis of the grid."""
    from tests.test_search import QUICK
    from wandacli.config.ranges import ParameterRange
    from wandacli.search.study import grid_cells

    store = copy_of_means(means_store, tmp_path)
    result = cli("search", "--model", tiny_llama_dir, "--store", store, "--name", "grid", *QUICK,
                 "--scores", "harmful", "--utility-scores", "harmless", "--direction-layer", "1:2",
                 "--direction-position=-2:-1", "--trials", "5", "--keep-best", "refusal:2",
                 *fixed, "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    trials = json.loads(result.stdout)["trials"]
    first = [
        (t["params"]["direction_layer"], t["params"]["direction_position"]) for t in trials[:4]
    ]
    assert sorted(first) == [(1, -2), (1, -1), (2, -2), (2, -1)]
    # Larger than the trials, or not all integers: TPE from the start.
    layers = {"direction_layer": ParameterRange(1, 9, True)}
    assert grid_cells(layers, 5, 0) == []
    assert grid_cells({"p": ParameterRange(0.1, 0.2, False)}, 50, 0) == []
    assert len(grid_cells(layers, 9, 0)) == 9
    scale = {"direction_scale": ParameterRange(0.7, 0.7, False)}
    cells = grid_cells(layers | scale, 9, 0)
    assert len(cells) == 9 and all(cell["direction_scale"] == 0.7 for cell in cells)


def writer_matrices(loaded):
    return {lin.key: lin.weight_matrix().detach().double() for lin in loaded.linear_layers}


def test_per_layer_weights_follow_each_components_kernel(cli, means_store, tiny_llama_dir):
    """heretic's kernel per component: the attention writers peak at 1.2 on layer 0 and fall
    to half of it one layer away; the MLP writers take 0.8 on layer 0 alone (distance 0), so
    layer 1's down projection is untouched. Each writer loses w(i) r rᵀ W, the file records
    each writer's weight and the kernels, and the random control is weighted alike."""
    made = direction_edit(cli, means_store, "--direction-layer", "1",
                          "--attention-max-weight", "1.2", "--attention-max-weight-position", "0",
                          "--attention-min-weight", "0.5", "--attention-min-weight-distance", "1",
                          "--mlp-max-weight", "0.8", "--mlp-max-weight-position", "0",
                          "--mlp-min-weight-distance", "0", "--json")  # fmt: skip
    assert made.exit_code == 0, made.stderr
    name = json.loads(made.stdout)["name"]
    assert "-attention1.2at0min0.5d1-mlp0.8at0min1d0" in name
    expected = {"0/self_attn.o_proj": 1.2, "1/self_attn.o_proj": 0.6, "0/mlp.down_proj": 0.8}
    r = expected_direction(means_store, 1, -1).double()
    spec = ModelSpec(model=str(tiny_llama_dir), device="cpu")
    dense = writer_matrices(load_model(spec))
    edited = writer_matrices(load_model_under_test(spec, name, means_store).loaded)
    for key, w in dense.items():
        if key not in expected:  # not a writer, or beyond its kernel
            assert torch.equal(edited[key], w), key
            continue
        assert torch.allclose(edited[key], w - expected[key] * torch.outer(r, r) @ w, atol=1e-6)
    with EditFile(means_store / "edits" / f"{name}.h5") as stored:
        assert set(stored.keys) == set(expected)  # layer 1's down projection: not in the edit
        assert {k: m["scale"] for k, m in stored.meta["modules"].items()} == pytest.approx(expected)
        kernels = stored.meta["layer_weights"]
        assert kernels["attention"]["min_weight_distance"] == 1.0
        assert kernels["mlp"]["max_weight"] == 0.8
    control = cli("prune", "--store", means_store, "--scores", "harmful", "--match-ranks", name,
                  "--name", "kernel-random", "--no-progress")  # fmt: skip
    assert control.exit_code == 0, control.stderr
    with EditFile(means_store / "edits" / "kernel-random.h5") as stored:
        q = torch.from_numpy(stored.read_raw("direction")).double().reshape(-1)
        assert {k: m["scale"] for k, m in stored.meta["modules"].items()} == pytest.approx(expected)
    random_edit = writer_matrices(load_model_under_test(spec, "kernel-random", means_store).loaded)
    for key, weight in expected.items():
        w = dense[key]
        assert torch.allclose(random_edit[key], w - weight * torch.outer(q, q) @ w, atol=1e-6)


def test_a_fractional_layer_interpolates_the_neighbouring_directions(
    cli, means_store, tiny_llama_dir
):
    """`--direction-fraction f`: r = normalise((1 − f) r_L + f r_(L+1)), heretic's fractional
    direction index L + f; at the top stream it is refused in one line."""
    made = direction_edit(cli, means_store, "--direction-layer", "1", "--direction-fraction",
                          "0.25", "--json")  # fmt: skip
    assert made.exit_code == 0, made.stderr
    name = json.loads(made.stdout)["name"]
    assert name.endswith("direction-l1.25p-1")
    mixed = 0.75 * expected_direction(means_store, 1, -1) + 0.25 * expected_direction(
        means_store, 2, -1
    )
    with EditFile(means_store / "edits" / f"{name}.h5") as stored:
        kept = torch.from_numpy(stored.read_raw("direction")).double().reshape(-1)
        assert stored.meta["direction"]["fraction"] == 0.25
    assert torch.allclose(kept, (mixed / mixed.norm()).double(), atol=1e-6)
    top = direction_edit(cli, means_store, "--direction-layer", "2", "--direction-fraction", "0.5")
    assert_one_line_error(top, "--direction-fraction 0.5", "lower --direction-layer")
    bad = direction_edit(cli, means_store, "--direction-layer", "1", "--direction-fraction", "1")
    assert_one_line_error(bad, "--direction-fraction must be in [0, 1)")


def test_the_embedding_can_be_left_as_heretic_leaves_it(cli, means_store, tiny_llama_dir):
    """`--direction-embedding 0`: the writers lose r, the token embedding does not (so the
    embeddings' output keeps its component along r, and no later writer adds any)."""
    name, spec, dense, edited = edit_and_models(cli, means_store, tiny_llama_dir,
                                                "--direction-layer", "1", "--direction-embedding",
                                                "0")  # fmt: skip
    assert name.endswith("-writers-only")
    r = expected_direction(means_store, 1, -1).double()
    e = dense.model.get_input_embeddings().weight
    assert torch.equal(edited.loaded.model.get_input_embeddings().weight, e)
    for key, w in writer_matrices(edited.loaded).items():
        if key.endswith(("o_proj", "down_proj")):
            assert float((r @ w).abs().max()) < 1e-5, key
    with EditFile(means_store / "edits" / f"{name}.h5") as stored:
        assert stored.meta["embedding"] is False
    control = cli("prune", "--store", means_store, "--scores", "harmful", "--match-ranks", name,
                  "--name", "writers-random", "--no-progress")  # fmt: skip
    assert control.exit_code == 0, control.stderr
    random_edit = load_model_under_test(spec, "writers-random", means_store)
    assert torch.equal(random_edit.loaded.model.get_input_embeddings().weight, e)


def test_a_search_over_heretics_space(cli, means_store, tiny_llama_dir, tmp_path):
    """The layer, its fraction, the embedding and a kernel searched at once; the kept point's
    file is the trial's parameters."""
    from tests.test_search import QUICK

    store = copy_of_means(means_store, tmp_path)
    result = cli("search", "--model", tiny_llama_dir, "--store", store, "--name", "k", *QUICK,
                 "--scores", "harmful", "--utility-scores", "harmless", "--direction-layer", "1:1",
                 "--direction-fraction", "0:0.9", "--direction-embedding", "0:1",
                 "--attention-max-weight", "0.8:1.5", "--mlp-min-weight-distance", "0:2",
                 "--trials", "3", "--keep-best", "refusal:2", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    for trial in found["trials"]:
        params = trial["params"]
        assert 0 <= params["direction_fraction"] <= 0.9 and params["direction_embedding"] in (0, 1)
        assert 0.8 <= params["attention_max_weight"] <= 1.5
    best = next(t for t in found["front"] if t["index"] == found["best"]["index"])["params"]
    with EditFile(store / "edits" / "k.best.h5") as kept:
        assert kept.meta["layer_weights"]["attention"]["max_weight"] == pytest.approx(
            best["attention_max_weight"]
        )
        assert kept.meta["embedding"] is bool(best["direction_embedding"])
    bad = cli("search", "--model", tiny_llama_dir, "--store", store, "--name", "k2", *QUICK,
              "--scores", "harmful", "--utility-scores", "harmless", "--direction-layer", "1:1",
              "--attention-min-weight", "0:3")  # fmt: skip
    assert_one_line_error(bad, "--attention-min-weight must be in [0, 1] (got 3")


def layer_and_scale_search(cli, store, model_dir, name, *extra):
    """A quick search over layers 1-2 and shares 0.3-1 of the direction, `extra` added."""
    from tests.test_search import QUICK

    return cli("search", "--model", model_dir, "--store", store, "--name", name, *QUICK,
               "--scores", "harmful", "--utility-scores", "harmless", "--direction-layer", "1:2",
               "--direction-scale", "0.3:1", *extra, "--json")  # fmt: skip


def test_the_heretic_objective_steers_tpe_and_records_what_was_measured(
    cli, means_store, tiny_llama_dir, tmp_path
):
    """`--objective heretic`: TPE is told (refusal ÷ the dense model's, KL; below KL 0.01 the
    KL term is 0.01 × the refusal term), while search.json's trials, front and kept point keep
    the measured refusal and KL."""
    from wandacli.search.objectives import sampler_values
    from wandacli.search.study import open_study

    assert sampler_values({"refusal": 0.5, "kl": 0.2}, "heretic", {"refusal": 0.8}) == [
        pytest.approx(0.625),
        0.2,
    ]
    assert sampler_values({"refusal": 0.5, "kl": 0.004}, "heretic", {"refusal": 0.8}) == [
        pytest.approx(0.625),
        pytest.approx(0.00625),
    ]
    assert sampler_values({"refusal": 0.5, "kl": 0.004}, "wandacli", {"refusal": 0.8}) == [
        0.5,
        0.004,
    ]
    store = copy_of_means(means_store, tmp_path)
    result = layer_and_scale_search(cli, store, tiny_llama_dir, "h", "--objective", "heretic",
                                    "--trials", "3")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    directory = store / "searches" / "h"
    recorded = json.loads((directory / "search.json").read_text())
    assert "heretic" in recorded["objectives"]["sampler"]
    told = {t.number: t.values for t in open_study(directory).get_trials() if t.values}
    differs = False
    for trial in found["trials"]:
        measured = {"refusal": trial["refusal"], "kl": trial["kl"]}
        assert told[trial["number"]] == pytest.approx(
            sampler_values(measured, "heretic", found["dense"])
        )
        differs |= told[trial["number"]] != pytest.approx([trial["refusal"], trial["kl"]])
    assert differs  # the tiny model's KLs lie below heretic's floor: TPE was told otherwise


def test_the_keep_best_objective_tells_tpe_the_rule(cli, means_store, tiny_llama_dir, tmp_path):
    """`--objective keep-best`: TPE is told the rule's other objective alone, with the rule's
    limit as each trial's constraint (measured − limit, ≤ 0 within it); search.json keeps the
    measured refusal and KL and the rule's point is kept. Resuming under another rule, or
    asking for the objective without a rule, is refused in one line."""
    from wandacli.config.ranges import BestRule
    from wandacli.search.objectives import limit_excess, sampler_values
    from wandacli.search.study import open_study

    rule = BestRule.parse("kl:0.05")
    measured = {"refusal": 0.25, "kl": 0.2}
    assert sampler_values(measured, "keep-best", None, rule) == [0.25]
    assert limit_excess(measured, rule) == pytest.approx(0.15)
    store = copy_of_means(means_store, tmp_path)
    missing = layer_and_scale_search(cli, store, tiny_llama_dir, "k", "--objective", "keep-best")
    assert_one_line_error(missing, "--objective keep-best", "--keep-best OBJECTIVE:LIMIT")
    result = layer_and_scale_search(cli, store, tiny_llama_dir, "k", "--objective", "keep-best",
                                    "--keep-best", "kl:0.05", "--trials", "4")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    directory = store / "searches" / "k"
    study = open_study(directory, 1)
    assert len(study.directions) == 1
    told = {t.number: t for t in study.get_trials() if t.values}
    assert len(told) == 4
    for trial in found["trials"]:
        frozen = told[trial["number"]]
        assert frozen.values == pytest.approx([trial["refusal"]])
        assert frozen.constraints == {"kl:0.05": pytest.approx(trial["kl"] - 0.05)}
    recorded = json.loads((directory / "search.json").read_text())
    assert "kl ≤ 0.05" in recorded["objectives"]["sampler"]
    within = [t for t in recorded["front"] if t["kl"] <= 0.05]
    expected = (
        min(within, key=lambda t: (t["refusal"], t["kl"], t["index"]))
        if within
        else min(recorded["front"], key=lambda t: (t["kl"], t["refusal"], t["index"]))
    )
    assert recorded["best"]["index"] == expected["index"]
    other = layer_and_scale_search(cli, store, tiny_llama_dir, "k", "--objective", "keep-best",
                                   "--keep-best", "kl:0.5", "--trials", "5")  # fmt: skip
    assert_one_line_error(other, "started with other settings", "sampler was told another")


def test_several_directions_remove_a_k_dimensional_subspace(cli, per_prompt_store, tiny_llama_dir):
    """`--directions 3`: the top 3 principal directions of h_i − μ_harmless at the layer and
    position, orthonormal, the first signed with r; every writer loses R Rᵀ W and the stream
    after every layer carries no component in the 3-dimensional span, where it carried some;
    the random control removes 3 random orthonormal directions."""
    name, spec, dense, edited = edit_and_models(cli, per_prompt_store, tiny_llama_dir,
                                                "--direction-layer", "1", "--directions",
                                                "3")  # fmt: skip
    assert name.endswith("direction-l1p-1-k3")
    with MeanActivations(per_prompt_store / "scores" / "harmful.h5") as harmful:
        streams = harmful.per_prompt()[:, 1, -1]
    with MeanActivations(per_prompt_store / "scores" / "harmless.h5") as harmless:
        mu = harmless.means()[1, -1]
    _, _, vh = np.linalg.svd(streams - mu[None, :], full_matrices=False)
    r = expected_direction(per_prompt_store, 1, -1).double().numpy()
    expected = vh[:3].T * np.sign(r @ vh[:3].T)
    with EditFile(per_prompt_store / "edits" / f"{name}.h5") as stored:
        basis = stored.read_raw("direction").astype(np.float64)
        assert stored.meta["direction"]["count"] == 3
        assert all(m["removed_rank"] == 3 for m in stored.meta["modules"].values())
    assert basis.shape == (r.size, 3)
    assert np.abs(basis - expected).max() < 1e-5
    assert np.abs(basis.T @ basis - np.eye(3)).max() < 1e-5
    assert float(basis[:, 0] @ r) > 0.5  # the first is near the mean difference
    R = torch.from_numpy(basis)
    writers = set(writer_keys(dense.fingerprint, r.size))
    after = writer_matrices(edited.loaded)
    for key, w in writer_matrices(dense).items():
        if key in writers:
            assert torch.allclose(after[key], w - R @ (R.T @ w), atol=1e-5), key
    ids = dense.tokenizer("Tell me how to do a thing, please.", return_tensors="pt").input_ids
    with torch.no_grad():
        streams_after = edited.loaded.model(ids, output_hidden_states=True).hidden_states
        streams_dense = dense.model(ids, output_hidden_states=True).hidden_states
    for h, h_dense in zip(streams_after[:-1], streams_dense[:-1], strict=True):
        span = (h[0].double() @ R).abs().max()
        assert span <= 1e-5 * float(h[0].double().norm(dim=-1).max())
        assert (h_dense[0].double() @ R).abs().max() > 10 * span
    control = cli("prune", "--store", per_prompt_store, "--scores", "harmful", "--match-ranks",
                  name, "--name", "k3-random", "--no-progress")  # fmt: skip
    assert control.exit_code == 0, control.stderr
    with EditFile(per_prompt_store / "edits" / "k3-random.h5") as stored:
        q = stored.read_raw("direction").astype(np.float64)
    assert q.shape == (r.size, 3) and np.abs(q.T @ q - np.eye(3)).max() < 1e-5
    one = direction_edit(cli, per_prompt_store, "--direction-layer", "1", "--directions", "1",
                         "--json")  # fmt: skip
    assert json.loads(one.stdout)["name"].endswith("direction-l1p-1")  # 1: r itself, as before


def test_several_directions_need_each_prompts_streams(cli, means_store):
    result = direction_edit(cli, means_store, "--direction-layer", "1", "--directions", "2")
    assert_one_line_error(result, "--directions 2 needs each harmful prompt's streams",
                          "--per-prompt")  # fmt: skip


def test_the_gp_sampler_runs_a_search_and_a_constrained_one(
    cli, means_store, tiny_llama_dir, tmp_path
):
    """`--sampler gp`: Optuna's Gaussian-process sampler, told that the measures are
    deterministic, proposes the trials after the random ones; under `--objective keep-best`
    it optimises the rule's other objective with the limit as a constraint. Each trial's
    seconds include its proposal (a GP's takes seconds), recorded apart too."""
    from types import SimpleNamespace

    import optuna

    from wandacli.search.study import sampler_for

    gp = sampler_for(SimpleNamespace(sampler="gp", seed=0, startup_trials=2), 3)
    assert isinstance(gp, optuna.samplers.GPSampler) and gp._deterministic
    store = copy_of_means(means_store, tmp_path)
    for name, extra in (("gp", ()), ("gpk", ("--objective", "keep-best", "--keep-best", "kl:1"))):
        result = layer_and_scale_search(cli, store, tiny_llama_dir, name, "--sampler", "gp",
                                        "--trials", "4", *extra)  # fmt: skip
        assert result.exit_code == 0, result.stderr
        trials = json.loads(result.stdout)["trials"]
        assert [t["state"] for t in trials] == ["COMPLETE"] * 4
        for trial in trials:  # a trial's time counts its proposal, as heretic's does
            parts = trial["proposal_seconds"] + trial["removal_seconds"]
            assert trial["proposal_seconds"] >= 0 and trial["seconds"] >= parts
        recorded = json.loads((store / "searches" / name / "search.json").read_text())
        assert recorded["config"]["sampler"] == "gp"


def test_multivariate_tpe_models_the_parameters_jointly(cli, means_store, tiny_llama_dir, tmp_path):
    """`--sampler multivariate-tpe` (heretic's sampler): TPE's proposals come from the joint
    density of a trial's parameters; the search runs to its trials and records the sampler."""
    import warnings
    from types import SimpleNamespace

    from wandacli.search.study import sampler_for

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna's "experimental" warning is not the user's
        joint = sampler_for(
            SimpleNamespace(sampler="multivariate-tpe", seed=0, startup_trials=2), 3
        )
    plain = sampler_for(SimpleNamespace(sampler="tpe", seed=0, startup_trials=2), 3)
    assert joint._multivariate and not plain._multivariate
    store = copy_of_means(means_store, tmp_path)
    result = layer_and_scale_search(cli, store, tiny_llama_dir, "mv", "--sampler",
                                    "multivariate-tpe", "--trials", "4")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["trials"]) == 4
    recorded = json.loads((store / "searches" / "mv" / "search.json").read_text())
    assert recorded["config"]["sampler"] == "multivariate-tpe"


def test_a_trial_above_the_embedding_is_measured_from_its_first_changed_layer(
    cli, means_store, tiny_llama_dir, tmp_path, monkeypatch
):
    """Kernels that reach only the last layer, the embedding left alone: the search says it
    runs each trial's KL and its refusal prompts' pass from there, and measures every trial as
    the whole pass does (the same search with the streams unusable)."""
    from tests.test_search import QUICK, measured_trials, whole_pass_only

    def search(name):
        return cli("search", "--model", tiny_llama_dir, "--store", store, "--name", name, *QUICK,
                   "--scores", "harmful", "--utility-scores", "harmless", "--direction-layer",
                   "1:1", "--direction-embedding", "0:0", "--attention-max-weight-position",
                   "1:1", "--attention-min-weight-distance", "0:0", "--mlp-max-weight-position",
                   "1:1", "--mlp-min-weight-distance", "0:0", "--direction-scale", "0.5:1",
                   "--trials", "3", "--json")  # fmt: skip

    store = copy_of_means(means_store, tmp_path)
    shortcut = search("up")
    assert shortcut.exit_code == 0, shortcut.stderr
    assert "KL: each trial's pass starts at its first changed layer" in shortcut.stderr
    assert "refusal prompts: each trial's pass starts at its first changed layer" in (
        shortcut.stderr
    )
    whole_pass_only(monkeypatch)
    whole = search("whole")
    assert "KL: the whole pass on every trial (off)" in whole.stderr
    assert "refusal prompts: the whole pass on every trial (off)" in whole.stderr
    assert measured_trials(shortcut) == measured_trials(whole)
    assert all(kl > 0 for _, _, kl in measured_trials(whole))
