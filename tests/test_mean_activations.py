"""`score --method mean-activations`: the means equal hidden states collected here with
`output_hidden_states` from the prompts as eval-attack shows them; a kill resumes to the same
bits; what does not apply is refused in one line with the store untouched."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from tests.test_score_cli import assert_one_line_error
from wandacli.config.settings import ModelSpec
from wandacli.data.calibration import select_rows
from wandacli.data.sources import load_raw
from wandacli.data.templates import strip_llama2_tags
from wandacli.models.loader import load_model
from wandacli.store.files import MeanActivations

POSITIONS = 3


def means_args(model_dir, store, data, *extra, nsamples=4):
    return [
        "score", "--method", "mean-activations", "--model", str(model_dir), "--store",
        str(store), "--device", "cpu", "--data", str(data), "--nsamples", str(nsamples),
        "--positions", str(POSITIONS), "--no-progress", *extra,
    ]  # fmt: skip


def explicit_means(model_dir, data, nsamples, template):
    """The mean of `explicit_streams`."""
    streams, loaded = explicit_streams(model_dir, data, nsamples, template)
    return (sum(streams) / nsamples).numpy(), loaded


def explicit_streams(model_dir, data, nsamples, template):
    """Per chosen prompt: its Llama-2 tags stripped, the text eval-attack would show
    (the chat template's user turn and assistant cue, or `[INST] ... [/INST]`), one forward
    with output_hidden_states, the last POSITIONS positions of every hidden state."""
    loaded = load_model(ModelSpec(model=str(model_dir), device="cpu"))
    tokenizer = loaded.tokenizer
    raw = load_raw(str(data))
    prompts = [pair.prompt for pair in raw.pairs] if raw.pairs else raw.texts
    streams = []
    for index in select_rows(len(prompts), nsamples, 0):
        _, user = strip_llama2_tags(prompts[index])
        if template == "chat":
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = tokenizer(f"[INST] {user} [/INST]", return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = loaded.model(ids, output_hidden_states=True).hidden_states
        streams.append(torch.stack([h[0, -POSITIONS:].double() for h in hidden]))
    return streams, loaded


def test_per_prompt_streams_are_each_prompts_hidden_states(
    cli, tiny_llama_dir, pairs_csv, tmp_path
):
    """`--per-prompt`: /per_prompt [prompts, L + 1, K, d] holds each prompt's hidden states as
    collected here, in the calibration set's order; their mean is the means."""
    store = tmp_path / "store"
    result = cli(*means_args(tiny_llama_dir, store, pairs_csv, "--template", "chat",
                             "--name", "harmful", "--per-prompt"))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    streams, _ = explicit_streams(tiny_llama_dir, pairs_csv, 4, "chat")
    with MeanActivations(store / "scores" / "harmful.h5") as means:
        kept = means.per_prompt()
        assert kept is not None and kept.shape == (4, *means.shape)
        for row, expected in zip(kept, streams, strict=True):
            assert np.abs(row - expected.numpy()).max() <= 1e-5 * max(
                1.0, float(expected.abs().max())
            )
        assert np.abs(kept.mean(axis=0) - means.means()).max() <= 1e-5
    wanda = cli("score", "--method", "wanda", "--model", tiny_llama_dir, "--store", store,
                "--data", pairs_csv, "--device", "cpu", "--per-prompt", "--no-progress")  # fmt: skip
    assert_one_line_error(wanda, "--per-prompt is mean-activations' option")


@pytest.mark.parametrize("template", ["chat", "raw"])
def test_the_means_equal_hidden_states_collected_here(
    cli, tiny_llama_dir, pairs_csv, tmp_path, template
):
    store = tmp_path / "store"
    result = cli(*means_args(tiny_llama_dir, store, pairs_csv, "--template", template,
                             "--name", "harmful", "--json"))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    expected, loaded = explicit_means(tiny_llama_dir, pairs_csv, 4, template)
    with MeanActivations(store / "scores" / "harmful.h5") as means:
        assert means.shape == (loaded.fingerprint.num_layers + 1, POSITIONS, expected.shape[2])
        assert means.meta["template"] == template and means.meta["prompts"] == 4
        assert np.abs(means.means() - expected).max() <= 1e-6 * max(1.0, np.abs(expected).max())
    listing = json.loads(cli("inspect", store, "--json").stdout)
    (entry,) = [s for s in listing["score_sets"] if s["name"] == "harmful"]
    assert entry["complete"] and entry["meta"]["method"] == "mean-activations"


def test_a_prompt_set_is_read_as_prompts(cli, tiny_llama_dir, tmp_path):
    """AdvBench (a prompt set, no responses) gives a mean set as a pair set does."""
    store = tmp_path / "store"
    result = cli(*means_args(tiny_llama_dir, store, "advbench", "--template", "chat"))
    assert result.exit_code == 0, result.stderr
    with MeanActivations(store / "scores" / "mean-activations-advbench.h5") as means:
        assert means.meta["data"]["name"] == "advbench" and np.isfinite(means.means()).all()


def test_a_killed_run_resumes_to_the_same_bits(tiny_llama_dir, pairs_csv, tmp_path):
    from tests.test_reliability import faulty, run_forked

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = means_args(tiny_llama_dir, whole, pairs_csv, "--checkpoint-every", "1",
                      "--per-prompt", nsamples=6)  # fmt: skip
    assert run_forked(*args).returncode == 0
    args = means_args(tiny_llama_dir, resumed, pairs_csv, "--checkpoint-every", "1",
                      "--per-prompt", nsamples=6)  # fmt: skip
    killed = faulty("wandacli.scoring.run:write_part:3", *args)
    assert killed.returncode == -signal.SIGKILL
    assert not (resumed / "scores" / "mean-activations-pairs.h5").exists()
    assert any((resumed / "scores").glob("*.parts/means-*.h5"))
    again = run_forked(*args, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["resumed"] is True
    with (
        MeanActivations(whole / "scores" / "mean-activations-pairs.h5") as a,
        MeanActivations(resumed / "scores" / "mean-activations-pairs.h5") as b,
    ):
        assert np.array_equal(a.read_raw("means"), b.read_raw("means"))
        assert np.array_equal(a.read_raw("per_prompt"), b.read_raw("per_prompt"))


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--layers-per-pass", "1"), "drop --layers-per-pass"),
        (("--entangle",), "drop --entangle"),
        (("--seqlen", "64"), "drop --seqlen"),
        (("--positions", "0"), "--positions must be 1 or more"),
        (("--data", "wikitext"), "plain text"),
        (("--nsamples", "999"), "has only"),
    ],
)
def test_bad_input_is_one_line_and_the_store_untouched(
    cli, tiny_llama_dir, pairs_csv, tmp_path, extra, fragment
):
    store = tmp_path / "store"
    result = cli(*means_args(tiny_llama_dir, store, pairs_csv), *extra)
    assert_one_line_error(result, fragment)
    assert not list(store.glob("scores/*.h5"))


def test_positions_belong_to_mean_activations(cli, tiny_llama_dir, pairs_csv, tmp_path):
    result = cli("score", "--method", "wanda", "--model", str(tiny_llama_dir), "--store",
                 str(tmp_path / "s"), "--data", str(pairs_csv), "--positions", "3")  # fmt: skip
    assert_one_line_error(result, "--positions is mean-activations' option")


def test_a_mean_set_is_not_a_score_set(cli, tiny_llama_dir, pairs_csv, tmp_path):
    store = tmp_path / "store"
    assert cli(*means_args(tiny_llama_dir, store, pairs_csv, "--name", "m")).exit_code == 0
    pruned = cli("prune", "--store", store, "--scores", "m", "--sparsity-ratio", "0.1")
    assert_one_line_error(pruned, "holds mean activations")
    edited = cli("prune", "--store", store, "--model", str(tiny_llama_dir), "--scores", "m",
                 "--remove-top-ranks", "1")  # fmt: skip
    assert_one_line_error(edited, "not rank statistics")
    assert not (store / "masks").exists() and not (store / "edits").exists()


@pytest.mark.slow
def test_two_processes_equal_one(cli, tiny_llama_dir, pairs_csv, tmp_path):
    """torchrun data parallelism: the prompts split across ranks, the sums reduced, rank 0
    writes; the same means as one process (up to the order of a float64 sum)."""
    from tests.test_distributed import torchrun

    single, parallel = tmp_path / "single", tmp_path / "parallel"
    extra = ("--checkpoint-every", "2", "--name", "m")
    assert cli(*means_args(tiny_llama_dir, single, pairs_csv, *extra, nsamples=7)).exit_code == 0
    done = torchrun(
        [*means_args(tiny_llama_dir, parallel, pairs_csv, *extra, nsamples=7), "--json"]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout[done.stdout.index("{") :])["world_size"] == 2
    with (
        MeanActivations(single / "scores" / "m.h5") as a,
        MeanActivations(parallel / "scores" / "m.h5") as b,
    ):
        np.testing.assert_allclose(b.means(), a.means(), rtol=1e-6, atol=1e-7)
        assert b.meta["world_size"] == 2
