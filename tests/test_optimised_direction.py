"""Refusal direction optimisation (`--direction-optimise STEPS`): the trained direction is
stored and removed as any r is (the stream loses it); what the training removes is exactly what
the edit removes; it is trained once and read back from the store after; a cone stays
orthonormal; bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_direction import copy_of_means, direction_edit, edit_and_models, expected_direction
from tests.test_score_cli import assert_one_line_error
from wandacli.removal import optimised_direction as rdo
from wandacli.removal.direction import writer_keys
from wandacli.store.files import EditFile

STEPS = "3"


def stored_direction(store, name):
    with EditFile(store / "edits" / f"{name}.h5") as stored:
        basis = stored.read_raw("direction").astype(np.float64)
        return basis.reshape(basis.shape[0], -1), stored.meta


def test_an_optimised_direction_is_removed_as_r_is_and_trained_once(
    cli, means_store, tiny_llama_dir, tmp_path, monkeypatch
):
    store = copy_of_means(means_store, tmp_path)
    name, _, dense, edited = edit_and_models(cli, store, tiny_llama_dir, "--model",
                                             tiny_llama_dir, "--direction-layer", "1",
                                             "--direction-optimise", STEPS)  # fmt: skip
    assert name.endswith("direction-l1p-1-rdo3")
    basis, meta = stored_direction(store, name)
    r = basis[:, 0]
    plain = expected_direction(store, 1, -1).double().numpy()
    assert abs(np.linalg.norm(r) - 1) < 1e-6
    assert 0.5 < float(r @ plain) < 1 - 1e-6  # moved from the mean difference, not far
    record = meta["direction"]["optimised"]
    assert record["steps"] == 3 and set(record["losses_last"]) == {"ablation", "addition", "retain"}
    assert record["cosine_to_start"][0] == pytest.approx(float(r @ plain), abs=1e-6)
    # Removed as any r: no stream before the final norm carries it.
    ids = dense.tokenizer("Tell me how to do a thing, please.", return_tensors="pt").input_ids
    with torch.no_grad():
        streams = edited.loaded.model(ids, output_hidden_states=True).hidden_states
    for h in streams[:-1]:
        along = (h[0].double() @ torch.from_numpy(r)).abs().max()
        assert along <= 1e-5 * float(h[0].double().norm(dim=-1).max())
    # Trained once: a second edit of the same direction reads it back from the store, in
    # another dtype too (a search's kept point is written in the checkpoint's own).
    assert len(list((store / "directions").glob("*.npz"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(rdo, "optimise", no_training)
    again = direction_edit(cli, store, "--model", tiny_llama_dir, "--direction-layer", "1",
                           "--direction-optimise", STEPS, "--name", "again",
                           "--dtype", "bfloat16")  # fmt: skip
    assert again.exit_code == 0, again.stderr
    assert np.array_equal(stored_direction(store, "again")[0], basis)


def test_the_training_removes_what_the_edit_removes(cli, means_store, tiny_llama_dir, tmp_path):
    """The forward hooks the training runs under give the edited model's logits exactly: the
    gradient is taken of the edit that is written."""
    store = copy_of_means(means_store, tmp_path)
    name, _, dense, edited = edit_and_models(cli, store, tiny_llama_dir, "--model",
                                             tiny_llama_dir, "--direction-layer", "2",
                                             "--direction-optimise", "1")  # fmt: skip
    r = torch.from_numpy(stored_direction(store, name)[0][:, 0])
    writers = set(writer_keys(dense.fingerprint, r.numel()))
    modules = [lin for lin in dense.linear_layers if lin.key in writers]
    hooks = rdo.SpanHooks(
        dense.model, modules, family=dense.fingerprint.family, layer=2, embedding=True
    )
    ids = dense.tokenizer("How do I pick a lock?", return_tensors="pt").input_ids
    with torch.no_grad(), hooks.removing(r[:, None].float()):
        hooked = dense.model(ids).logits.double()
    with torch.no_grad():
        expected = edited.loaded.model(ids).logits.double()
        untouched = dense.model(ids).logits.double()
    assert (hooked - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (untouched - expected).abs().max() > 100 * (hooked - expected).abs().max()


def test_an_optimised_cone_stays_orthonormal(cli, per_prompt_store, tiny_llama_dir, tmp_path):
    store = copy_of_means(per_prompt_store, tmp_path)
    name, _, _, _ = edit_and_models(cli, store, tiny_llama_dir, "--model", tiny_llama_dir,
                                    "--direction-layer", "1", "--directions", "2",
                                    "--direction-optimise", "2")  # fmt: skip
    basis, meta = stored_direction(store, name)
    assert basis.shape[1] == 2
    assert np.abs(basis.T @ basis - np.eye(2)).max() < 1e-5
    assert all(m["removed_rank"] == 2 for m in meta["modules"].values())
    assert len(meta["direction"]["optimised"]["cosine_to_start"]) == 2


def test_a_search_trains_each_direction_once(cli, means_store, tiny_llama_dir, tmp_path):
    store = copy_of_means(means_store, tmp_path)
    result = cli("search", "--model", tiny_llama_dir, "--store", store, "--scores", "harmful",
                 "--utility-scores", "harmless", "--direction-layer", "1:1",
                 "--direction-optimise", "1:1", "--direction-scale", "0.5:1", "--trials", "3",
                 "--startup-trials", "3", "--limit", "4", "--kl-limit", "4",
                 "--max-new-tokens", "4", "--keep-best", "refusal:1", "--no-control",
                 "--name", "s", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert len(list((store / "directions").glob("*.npz"))) == 1
    summary = json.loads((store / "searches" / "s" / "search.json").read_text())
    assert all(t["params"]["direction_optimise"] == 1 for t in summary["trials"])
    kept, meta = stored_direction(store, "s.best")
    assert meta["direction"]["optimised"]["steps"] == 1


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ((), "trains on the model: pass --model"),
        (("--model", "MODEL", "--direction-per-layer", "1"), "--direction-per-layer takes"),
        (("--model", "MODEL", "--direction-optimise", "-1"), "--direction-optimise"),
    ],
)
def test_bad_optimisation_input_is_one_line(cli, means_store, tiny_llama_dir, extra, fragment):
    extra = tuple(str(tiny_llama_dir) if e == "MODEL" else e for e in extra)
    steps = () if "--direction-optimise" in extra else ("--direction-optimise", "2")
    result = direction_edit(cli, means_store, "--direction-layer", "1", *steps, *extra)
    assert_one_line_error(result, fragment)


def test_the_addition_adds_the_direction_not_its_opposite(
    cli, means_store, tiny_llama_dir, tmp_path, monkeypatch
):
    """QR fixes each column's sign freely: the vector added in training (for the refusal
    targets and in every step) points along r, as the stored direction does."""
    added = []
    adding = rdo.SpanHooks.adding

    def recording(self, vector):
        added.append(vector.detach().double().clone())
        return adding(self, vector)

    monkeypatch.setattr(rdo.SpanHooks, "adding", recording)
    store = copy_of_means(means_store, tmp_path)
    name, _, _, _ = edit_and_models(cli, store, tiny_llama_dir, "--model", tiny_llama_dir,
                                    "--direction-layer", "1", "--direction-optimise",
                                    STEPS)  # fmt: skip
    r = torch.from_numpy(stored_direction(store, name)[0][:, 0])
    plain = expected_direction(store, 1, -1).double()
    assert len(added) == 1 + int(STEPS)
    assert all(float(v @ plain) > 0 and float(v @ r) > 0 for v in added)


@pytest.mark.parametrize("command", ["prune", "search"])
def test_experts_are_refused_before_the_model_loads(
    cli, means_store, tmp_path, tokenizer, monkeypatch, command
):
    """RDO's hooks project whole writer modules: a model whose expert writers are slices of a
    3-D parameter is refused from its config, in one line, before any weight is read."""
    from tests.conftest import save_model
    from tests.families import build_family_model
    from wandacli.models import loader

    experts_dir = save_model(
        build_family_model("mixtral", len(tokenizer)), tokenizer, tmp_path / "mixtral"
    )

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loader, "load_pretrained", no_loading)
    args = ["--store", means_store, "--scores", "harmful", "--utility-scores", "harmless",
            "--model", experts_dir, "--device", "cpu", "--name", "x", "--no-progress"]  # fmt: skip
    if command == "prune":
        result = cli("prune", *args, "--direction-layer", "1", "--direction-optimise", "2")
    else:
        result = cli("search", *args, "--direction-layer", "1:1", "--direction-optimise", "2:2",
                     "--trials", "1")  # fmt: skip
    assert_one_line_error(result, "mlp.experts.0.down_proj is part of mlp.experts")
