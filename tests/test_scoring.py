"""Score values against independent, straightforward computations (float64, explicit
activation capture, per-sample autograd), on a tiny Llama and a tiny GPT-2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wandacli.config.score import ScoreConfig
from wandacli.config.settings import ModelSpec
from wandacli.data.calibration import build_calibration_set
from wandacli.data.sources import load_raw
from wandacli.methods.random import random_scores
from wandacli.models.loader import load_model
from wandacli.scoring.run import run_score
from wandacli.store.files import ScoreSet

RTOL = 1e-5  # float32 accumulation against a float64 reference


def _config(model_dir, store, method, data, **overrides):
    return ScoreConfig(
        method=method,
        model=ModelSpec(model=str(model_dir), device="cpu"),
        data=str(data) if data else None,
        nsamples=overrides.pop("nsamples", 6),
        seed=0,
        store=store,
        seqlen=overrides.pop("seqlen", 128),
        **overrides,
    )


def _calibration(model_dir, data, nsamples=6, seqlen=128, disentangle=True):
    loaded = load_model(ModelSpec(model=str(model_dir), device="cpu"))
    raw = load_raw(str(data))
    calibration = build_calibration_set(
        raw, loaded.tokenizer, nsamples=nsamples, seed=0, seqlen=seqlen, disentangle=disentangle
    )
    return loaded, calibration


def reference_wanda(model_dir, data, **kwargs) -> dict[str, np.ndarray]:
    """|W|·sqrt(mean over samples of Σ_counted tokens x²), inputs captured explicitly."""
    loaded, calibration = _calibration(model_dir, data, **kwargs)
    captured: dict[str, list[torch.Tensor]] = {lin.key: [] for lin in loaded.linear_layers}
    handles = [
        lin.module.register_forward_hook(
            lambda m, args, out, key=lin.key: captured[key].append(args[0].detach().double())
        )
        for lin in loaded.linear_layers
    ]
    sums = {lin.key: torch.zeros(lin.shape[1], dtype=torch.float64) for lin in loaded.linear_layers}
    with torch.no_grad():
        for sample in calibration.samples:
            for key in captured:
                captured[key].clear()
            loaded.model(input_ids=sample.input_ids)
            mask = sample.counted[0]
            for key, inputs in captured.items():
                x = inputs[0][0][mask]  # [counted tokens, in]
                sums[key] += (x**2).sum(dim=0)
    for handle in handles:
        handle.remove()
    n = len(calibration.samples)
    return {
        lin.key: (
            lin.weight_matrix().detach().double().abs() * torch.sqrt(sums[lin.key] / n)
        ).numpy()
        for lin in loaded.linear_layers
    }


def reference_wandg(model_dir, data, **kwargs) -> dict[str, np.ndarray]:
    """|W|·Σ_n |∂L_n/∂W| by per-sample torch.autograd.grad, summed in float64."""
    loaded, calibration = _calibration(model_dir, data, **kwargs)
    weights = [lin.module.weight for lin in loaded.linear_layers]
    for weight in weights:
        weight.requires_grad_(True)
    sums = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for sample in calibration.samples:
        loss = loaded.model(input_ids=sample.input_ids, labels=sample.labels).loss
        grads = torch.autograd.grad(loss, weights)
        for total, grad in zip(sums, grads, strict=True):
            total += grad.double().abs()
    result = {}
    for lin, total in zip(loaded.linear_layers, sums, strict=True):
        grad_sum = total.t() if lin.transposed else total
        result[lin.key] = (lin.weight_matrix().detach().double().abs() * grad_sum).numpy()
    return result


def stored(store, name) -> dict[str, np.ndarray]:
    with ScoreSet(store / "scores" / f"{name}.h5") as score_set:
        return {key: score_set.read(key) for key in score_set.keys}


def assert_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=RTOL, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_wanda_matches_explicit_activation_sums(request, model_fixture, pairs_csv, store):
    model_dir = request.getfixturevalue(model_fixture)
    result = run_score(_config(model_dir, store, "wanda", pairs_csv))
    assert_close(stored(store, result.name), reference_wanda(model_dir, pairs_csv))


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_wandg_matches_per_sample_autograd(request, model_fixture, pairs_csv, store):
    model_dir = request.getfixturevalue(model_fixture)
    result = run_score(_config(model_dir, store, "wandg", pairs_csv))
    assert_close(stored(store, result.name), reference_wandg(model_dir, pairs_csv))


def test_wandg_layer_groups_give_the_same_scores(tiny_llama_dir, pairs_csv, store):
    one = run_score(_config(tiny_llama_dir, store, "wandg", pairs_csv, name="all"))
    grouped = run_score(
        _config(tiny_llama_dir, store, "wandg", pairs_csv, name="grouped", layers_per_pass=1)
    )
    a, b = stored(store, one.name), stored(store, grouped.name)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=RTOL, err_msg=key)


def test_entangled_wanda_counts_every_token(tiny_llama_dir, pairs_csv, store):
    result = run_score(
        _config(tiny_llama_dir, store, "wanda", pairs_csv, entangle=True, seqlen=16, nsamples=4)
    )
    expected = reference_wanda(tiny_llama_dir, pairs_csv, nsamples=4, seqlen=16, disentangle=False)
    assert_close(stored(store, result.name), expected)


def test_prompt_tokens_are_excluded(tiny_llama_dir, pairs_csv, store, tmp_path):
    """Changing only the prompts changes nothing that is counted in the first layer's input
    statistics? No: attention mixes prompt into response positions. What must hold is that
    the statistics equal sums over response positions only, which differ from all-token sums."""
    result = run_score(_config(tiny_llama_dir, store, "wanda", pairs_csv))
    with ScoreSet(result.path) as score_set:
        stats = score_set.stats("0/self_attn.q_proj")
    loaded, calibration = _calibration(tiny_llama_dir, pairs_csv)
    captured = []
    handle = loaded.linear_layers[0].module.register_forward_hook(
        lambda m, a, o: captured.append(a[0][0].double())
    )
    response_only = torch.zeros(32, dtype=torch.float64)
    everything = torch.zeros(32, dtype=torch.float64)
    with torch.no_grad():
        for sample in calibration.samples:
            captured.clear()
            loaded.model(input_ids=sample.input_ids)
            response_only += (captured[0][sample.counted[0]] ** 2).sum(0)
            everything += (captured[0] ** 2).sum(0)
    handle.remove()
    n = len(calibration.samples)
    np.testing.assert_allclose(stats, (response_only / n).numpy(), rtol=RTOL)
    assert not np.allclose(stats, (everything / n).numpy(), rtol=1e-2)


def test_magnitude_and_random_are_exact(tiny_llama_dir, store):
    run_score(_config(tiny_llama_dir, store, "magnitude", None))
    run_score(_config(tiny_llama_dir, store, "random", None))
    loaded = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
    magnitude, random_set = stored(store, "magnitude"), stored(store, "random-seed0")
    for lin in loaded.linear_layers:
        np.testing.assert_array_equal(
            magnitude[lin.key], lin.weight_matrix().detach().abs().numpy()
        )
        np.testing.assert_array_equal(
            random_set[lin.key], random_scores(lin.shape, 0, lin.key).numpy()
        )
    assert not np.array_equal(
        random_set["0/mlp.up_proj"], random_scores((48, 32), 1, "0/mlp.up_proj").numpy()
    )


def test_use_diff_scores_the_weight_difference(tiny_llama_dir, tiny_llama_base_dir, store):
    run_score(
        _config(
            tiny_llama_dir,
            store,
            "magnitude",
            None,
            base_model=str(tiny_llama_base_dir),
            use_diff=True,
        )
    )
    model = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
    base = load_model(ModelSpec(model=str(tiny_llama_base_dir), device="cpu"))
    scores = stored(store, "magnitude")
    for lin, base_lin in zip(model.linear_layers, base.linear_layers, strict=True):
        expected = (lin.weight_matrix().detach() - base_lin.weight_matrix().detach()).abs().numpy()
        np.testing.assert_array_equal(scores[lin.key], expected)


def test_scoring_never_modifies_weights(tiny_llama_dir, pairs_csv, store):
    loaded = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    for method in ("wanda", "wandg"):
        run_score(_config(tiny_llama_dir, store, method, pairs_csv), loaded=loaded)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in loaded.model.parameters())
