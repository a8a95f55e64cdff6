"""eval-utility: perplexity against an independent computation; zero-shot through the real
lm-evaluation-harness on a local task, against an independent log-likelihood computation (and
through a fake lm_eval for the reference's hub tasks, which need the network); errors."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.test_score_cli import assert_one_line_error
from wandacli.config.settings import ModelSpec
from wandacli.evaluation.utility import perplexity
from wandacli.models.loader import load_model


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(
        " ".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(120))
    )
    return path


def test_perplexity_equals_an_independent_computation(tiny_llama_dir, text_file):
    loaded = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu"))
    ids = loaded.tokenizer(text_file.read_text(), return_tensors="pt").input_ids
    seqlen = 64
    value, windows = perplexity(loaded.model, ids, seqlen)
    assert windows == ids.shape[1] // seqlen
    # Token by token, in float64: -log p(next token), averaged over every predicted token.
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            window = ids[:, w * seqlen : (w + 1) * seqlen]
            log_probs = torch.log_softmax(loaded.model(window).logits.double(), dim=-1)[0]
            for t in range(seqlen - 1):
                nll -= float(log_probs[t, window[0, t + 1]])
                count += 1
    assert value == pytest.approx(math.exp(nll / count), rel=1e-5)
    limited, used = perplexity(loaded.model, ids, seqlen, limit_windows=1)
    assert used == 1 and limited != value


def utility_args(model_dir, out, *extra):
    return [
        "eval-utility",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


class TestCommand:
    def test_perplexity_on_a_text_file_with_the_log(self, cli, tiny_llama_dir, text_file, tmp_path):
        result = cli(
            *utility_args(
                tiny_llama_dir, tmp_path / "u", "--data", str(text_file), "--seqlen", "64", "--json"
            )
        )
        assert result.exit_code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["seqlen"] == 64 and summary["perplexity"] > 1
        log = (tmp_path / "u" / "log_dense.txt").read_text().splitlines()
        assert log[1].startswith("dense\t") and log[1].split("\t")[2] == "PPL"

    @pytest.mark.slow
    def test_wikitext_named_set(self, cli, tiny_llama_dir, tmp_path):
        result = cli(
            *utility_args(
                tiny_llama_dir, tmp_path / "w", "--seqlen", "128", "--limit-windows", "2", "--json"
            )
        )
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["windows"] == 2

    def test_zero_shot_through_lm_eval(self, cli, tiny_llama_dir, tmp_path, monkeypatch):
        calls = {}

        class FakeTaskManager:
            def __init__(self, include_defaults=True):
                calls["include_defaults"] = include_defaults

        class FakeHFLM:
            def __init__(self, pretrained, tokenizer, batch_size):
                calls["model"] = pretrained

        def simple_evaluate(model, tasks, num_fewshot, limit, task_manager):
            calls.update(tasks=tasks, num_fewshot=num_fewshot, limit=limit)
            return {"results": {task: {"acc,none": 0.5 + i / 10} for i, task in enumerate(tasks)}}

        fake = types.ModuleType("lm_eval")
        fake.simple_evaluate = simple_evaluate
        fake.models = types.SimpleNamespace(huggingface=types.SimpleNamespace(HFLM=FakeHFLM))
        monkeypatch.setitem(sys.modules, "lm_eval", fake)
        monkeypatch.setitem(sys.modules, "lm_eval.models", fake.models)
        monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", fake.models.huggingface)
        monkeypatch.setitem(
            sys.modules, "lm_eval.tasks", types.SimpleNamespace(TaskManager=FakeTaskManager)
        )
        result = cli(
            *utility_args(
                tiny_llama_dir,
                tmp_path / "z",
                "--data",
                "none",
                "--zero-shot",
                "reference",
                "--json",
            )
        )
        assert result.exit_code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert calls["tasks"] == [
            "boolq",
            "rte",
            "hellaswag",
            "winogrande",
            "arc_challenge",
            "openbookqa",
        ]
        assert (calls["num_fewshot"], calls["limit"]) == (0, 200)
        assert calls["include_defaults"] is True  # hub task names need lm-eval's own index
        assert summary["zero_shot"]["boolq"] == 0.5 and summary["zero_shot_mean"] == pytest.approx(
            0.75
        )
        metrics = [
            line.split("\t")[2]
            for line in (tmp_path / "z" / "log_dense.txt").read_text().splitlines()[1:]
        ]
        assert metrics == [
            "boolq",
            "rte",
            "hellaswag",
            "winogrande",
            "arc_challenge",
            "openbookqa",
            "averaged",
        ]


TINY_TASK = Path(__file__).parent / "data" / "zero_shot" / "tiny_mc.yaml"


def multiple_choice_accuracy(loaded, jsonl: Path) -> float:
    """The task's accuracy computed here, without lm-eval: for each item, the choice whose
    tokens (after "Question: …\nAnswer:" and a space) have the highest summed log-probability,
    tokenised as a causal LM's context + continuation (encode the whole, split at the context)."""
    tokenizer, model = loaded.tokenizer, loaded.model
    correct = 0
    items = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    with torch.no_grad():
        for item in items:
            context = f"Question: {item['question']}\nAnswer:"
            context_ids = tokenizer.encode(context)
            scores = []
            for choice in item["choices"]:
                ids = tokenizer.encode(context + " " + choice)
                logits = model(torch.tensor([ids], device=model.device)).logits[0].double()
                log_probs = torch.log_softmax(logits, dim=-1)
                scores.append(
                    sum(float(log_probs[t - 1, ids[t]]) for t in range(len(context_ids), len(ids)))
                )
            correct += int(max(range(len(scores)), key=scores.__getitem__) == item["answer"])
    return correct / len(items)


def magnitude_mask(cli, model, store: Path) -> str:
    """A 30% per-row magnitude mask: enough to change the model's answers."""
    for args in (
        ("score", "--model", model, "--method", "magnitude", "--store", store, "--name", "mag"),
        ("prune", "--store", store, "--scores", "mag", "--sparsity-ratio", "0.3", "--name", "m30"),
    ):
        result = cli(*args, "--no-progress")
        assert result.exit_code == 0, result.stderr
    return str(store / "masks" / "m30.h5")


class TestRealLmEval:
    """The real harness on a ten-item local task: what users run offline."""

    def run_task(self, cli, model, out, *extra):
        result = cli(
            *utility_args(
                model,
                out,
                "--data",
                "none",
                "--zero-shot",
                str(TINY_TASK),
                "--batch-size",
                "1",
                "--json",
                *extra,
            )
        )
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    @pytest.mark.slow
    @pytest.mark.parametrize("model_name", ["tiny", "smollm2"])
    def test_accuracy_equals_an_independent_computation_with_and_without_a_mask(
        self, cli, tiny_llama_dir, tmp_path, model_name, monkeypatch
    ):
        from wandacli.removal import masks as pruning
        from wandacli.store.files import open_mask

        monkeypatch.chdir(tmp_path)  # the task's data is found beside its YAML, not in the cwd
        model = str(tiny_llama_dir) if model_name == "tiny" else "smollm2"
        mask = magnitude_mask(cli, model, tmp_path / "store")
        dense = self.run_task(cli, model, tmp_path / "dense")
        pruned = self.run_task(cli, model, tmp_path / "pruned", "--mask", mask)

        loaded = load_model(ModelSpec(model=model, device="cpu"))
        expected_dense = multiple_choice_accuracy(loaded, TINY_TASK.with_suffix(".jsonl"))
        with open_mask(mask, None) as mask_file:
            pruning.apply_mask_file(loaded, mask_file)
        expected_pruned = multiple_choice_accuracy(loaded, TINY_TASK.with_suffix(".jsonl"))

        assert dense["zero_shot"] == {"wandacli_tiny_mc": pytest.approx(expected_dense)}
        assert pruned["zero_shot"] == {"wandacli_tiny_mc": pytest.approx(expected_pruned)}
        assert pruned["model_under_test"]["actual_sparsity"] > 0.25
        log = (tmp_path / "pruned" / "log_magnitude.txt").read_text().splitlines()
        assert [line.split("\t")[-2] for line in log[1:]] == ["wandacli_tiny_mc", "averaged"]

    def test_a_missing_task_file_is_one_line_before_loading(self, cli, tmp_path):
        result = cli(
            *utility_args(
                tmp_path / "no-model", tmp_path / "o", "--data", "none", "--zero-shot", "nope.yaml"
            )
        )
        assert_one_line_error(result, "nope.yaml does not exist")

    def test_a_yaml_that_is_not_a_task_is_one_line(self, cli, tiny_llama_dir, tmp_path):
        other = tmp_path / "other.yaml"
        other.write_text("just: a mapping\n")
        result = cli(
            *utility_args(
                tiny_llama_dir, tmp_path / "o", "--data", "none", "--zero-shot", str(other)
            )
        )
        assert_one_line_error(result, "no `task:` key")


class TestBadInput:
    def test_missing_lm_eval_is_said_before_any_work(
        self, cli, tiny_llama_dir, tmp_path, monkeypatch, text_file
    ):
        monkeypatch.setitem(sys.modules, "lm_eval", None)
        result = cli(
            *utility_args(
                tiny_llama_dir, tmp_path / "m", "--data", str(text_file), "--zero-shot", "boolq"
            )
        )
        assert_one_line_error(result, "pip install 'wandacli[eval]'")

    def test_text_shorter_than_a_window(self, cli, tiny_llama_dir, tmp_path):
        short = tmp_path / "short.txt"
        short.write_text("only a few words")
        result = cli(
            *utility_args(tiny_llama_dir, tmp_path / "s", "--data", str(short), "--seqlen", "64")
        )
        assert_one_line_error(result, "fewer than one --seqlen 64 window")

    def test_data_that_is_not_text(self, cli, tiny_llama_dir, tmp_path, pairs_csv):
        result = cli(*utility_args(tiny_llama_dir, tmp_path / "n", "--data", str(pairs_csv)))
        assert_one_line_error(result, "not plain text")

    def test_seqlen_beyond_the_model(self, cli, tiny_llama_dir, tmp_path, text_file):
        result = cli(
            *utility_args(
                tiny_llama_dir, tmp_path / "b", "--data", str(text_file), "--seqlen", "4096"
            )
        )
        assert_one_line_error(result, "exceeds the model's context of 512")

    def test_nothing_to_do(self, cli, tiny_llama_dir, tmp_path):
        assert_one_line_error(
            cli(*utility_args(tiny_llama_dir, tmp_path / "x", "--data", "none")),
            "nothing to evaluate",
        )
