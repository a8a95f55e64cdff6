"""The CUDA path (skipped without a GPU; `make test` runs it where one is present): scores in
bfloat16 on the GPU agree with float32 on the CPU, and generation runs there."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wandacli.store.files import ScoreSet

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("method", ["wanda", "wandg"])
def test_cuda_scores_agree_with_the_cpu(cli, method, tiny_llama_dir, pairs_csv, tmp_path):
    stores = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
        store = tmp_path / f"{device}-{dtype}"
        result = cli(
            "score",
            "--method",
            method,
            "--model",
            str(tiny_llama_dir),
            "--data",
            str(pairs_csv),
            "--nsamples",
            "6",
            "--seqlen",
            "128",
            "--store",
            str(store),
            "--device",
            device,
            "--dtype",
            dtype,
            "--no-progress",
            "--name",
            "s",
        )
        assert result.exit_code == 0, result.stderr
        with ScoreSet(store / "scores" / "s.h5") as score_set:
            stores[(device, dtype)] = {k: score_set.read(k) for k in score_set.keys}
    cpu = stores[("cpu", "float32")]
    for key in cpu:
        np.testing.assert_allclose(
            stores[("cuda", "float32")][key], cpu[key], rtol=1e-3, atol=1e-6, err_msg=key
        )
        # bfloat16 weights and activations: ranks agree closely even where values drift.
        ranks_cpu = np.argsort(np.argsort(cpu[key].ravel()))
        ranks_bf16 = np.argsort(np.argsort(stores[("cuda", "bfloat16")][key].ravel()))
        assert np.corrcoef(ranks_cpu, ranks_bf16)[0, 1] > 0.95, key


def test_eval_attack_generates_on_cuda(cli, tiny_llama_dir, tmp_path):
    result = cli(
        "eval-attack",
        "--model",
        str(tiny_llama_dir),
        "--device",
        "cuda",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--configs",
        "basic",
        "--inst",
        "--out",
        str(tmp_path / "a"),
        "--no-progress",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["prompts"] == 2


@pytest.mark.slow
def test_vllm_backend_generates_what_transformers_does(cli, tmp_path):
    """vLLM for real (it needs CUDA): greedy answers from `--backend vllm` and `--backend hf`
    on SmolLM2 agree, and the run records the backend's output like the hf one."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'wandacli[vllm]')")
    outputs = {}
    for backend in ("hf", "vllm"):
        result = cli(
            "eval-attack",
            "--model",
            "smollm2",
            "--device",
            "cuda",
            "--dtype",
            "float32",
            "--backend",
            backend,
            "--limit",
            "8",
            "--max-new-tokens",
            "16",
            "--configs",
            "basic_nosys",
            "--inst",
            "--template",
            "chat",
            "--out",
            str(tmp_path / backend),
            "--no-progress",
            "--json",
        )
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["results"][0]["prompts"] == 8
        lines = (tmp_path / backend / "inst_basic_nosys.jsonl").read_text().splitlines()
        outputs[backend] = [json.loads(line)["response"] for line in lines]
    assert all(outputs["vllm"])
    # Different kernels may break a near-tie differently; most greedy answers are identical.
    same = sum(a == b for a, b in zip(outputs["hf"], outputs["vllm"], strict=True))
    assert same >= 6, (outputs["hf"], outputs["vllm"])
