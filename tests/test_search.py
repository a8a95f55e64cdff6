"""`wandacli search` and the KL cost: trials reproducible with a seed and across a kill, the
in-memory removal equal to `prune`'s and undone exactly, KL equal to a computation written
here, the search/evaluation prompt overlap refused, bad ranges refused in one line with the
store untouched."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_score_cli import assert_one_line_error, score_args
from wandacli.config.ranges import ParameterRange
from wandacli.config.settings import ModelSpec
from wandacli.models.loader import load_model
from wandacli.removal.in_memory import WeightChanges
from wandacli.removal.kinds.set_difference import set_difference
from wandacli.removal.masks import row_mask, set_difference_mask
from wandacli.removal.presorted import PresortedMatrix
from wandacli.search.config import SearchConfig
from wandacli.search.removals import TrialRemovals
from wandacli.store.files import MaskFile

# A search small enough for the tiny model: few prompts, few tokens, TPE after two trials.
QUICK = [
    "--limit", "4", "--kl-limit", "4", "--max-new-tokens", "4", "--batch-size", "4",
    "--startup-trials", "2", "--device", "cpu", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def sets_store(tmp_path_factory, tiny_llama_dir, pairs_csv) -> Path:
    """wanda safety and utility scores and actsvd safety and utility statistics of the tiny
    model, in one store."""
    from typer.testing import CliRunner

    from wandacli.cli import app

    store = tmp_path_factory.mktemp("search") / "store"
    runner = CliRunner()
    for method, data, name in (
        ("wanda", pairs_csv, "safety"),
        ("wanda", "utility", "utility"),
        ("actsvd", pairs_csv, "actsvd-safety"),
        ("actsvd", "utility", "actsvd-utility"),
    ):
        args = score_args(tiny_llama_dir, store, "--name", name, method=method, data=data)
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return store


def copy_store(sets_store: Path, tmp_path: Path) -> Path:
    """The sets alone, in a store of this test's own."""
    store = tmp_path / "store"
    (store / "scores").mkdir(parents=True)
    for path in (sets_store / "scores").glob("*.h5"):
        shutil.copy(path, store / "scores" / path.name)
    return store


def search(cli, model, store, name, *extra):
    return cli("search", "--model", model, "--store", store, "--name", name, *QUICK, *extra)


SET_DIFFERENCE = (
    "--scores",
    "safety",
    "--utility-scores",
    "utility",
    "--p",
    "0.05:0.5",
    "--q",
    "0.05:0.5",
)
PROJECTION = (
    "--scores", "actsvd-safety", "--utility-scores", "actsvd-utility",
    "--rank-neg", "1:8", "--rank-pos", "1:16",
)  # fmt: skip


def objectives(trials):
    return [(t["params"], t["refusal"], t["kl"]) for t in trials if t["state"] == "COMPLETE"]


class TestSearch:
    def test_json_and_inspect(self, cli, sets_store, tiny_llama_dir, tmp_path):
        store = copy_store(sets_store, tmp_path)
        result = search(
            cli, tiny_llama_dir, store, "sd", *SET_DIFFERENCE, "--trials", "3", "--json"
        )
        assert result.exit_code == 0, result.stderr
        found = json.loads(result.stdout)
        assert found["name"] == "sd" and len(found["trials"]) == 3
        for trial in found["trials"]:
            assert {"number", "state", "params", "refusal", "kl", "sparsity"} <= set(trial)
            assert set(trial["params"]) == {"p", "q"}
            assert 0.05 <= trial["params"]["p"] <= 0.5 and trial["kl"] >= 0
        assert found["front"] and found["dense"]["kl"] == 0.0
        assert (store / "searches" / "sd" / "front.png").is_file()
        listing = json.loads(cli("inspect", store, "--json").stdout)
        assert [(s["name"], s["complete_trials"]) for s in listing["searches"]] == [("sd", 3)]

    def test_the_same_seed_gives_the_same_trials(self, cli, sets_store, tiny_llama_dir, tmp_path):
        runs = []
        for index in range(2):
            store = copy_store(sets_store, tmp_path / str(index))
            result = search(
                cli, tiny_llama_dir, store, "sd", *SET_DIFFERENCE, "--trials", "4", "--json"
            )
            assert result.exit_code == 0, result.stderr
            runs.append(json.loads(result.stdout))
        assert objectives(runs[0]["trials"]) == objectives(runs[1]["trials"])
        other = copy_store(sets_store, tmp_path / "other")
        result = search(
            cli,
            tiny_llama_dir,
            other,
            "sd",
            *SET_DIFFERENCE,
            "--trials",
            "2",
            "--seed",
            "1",
            "--json",
        )
        assert objectives(json.loads(result.stdout)["trials"]) != objectives(runs[0]["trials"])[:2]

    def test_a_rerun_continues_and_more_trials_extend_the_study(
        self, cli, sets_store, tiny_llama_dir, tmp_path
    ):
        store = copy_store(sets_store, tmp_path)
        first = json.loads(
            search(
                cli, tiny_llama_dir, store, "sd", *SET_DIFFERENCE, "--trials", "2", "--json"
            ).stdout
        )
        again = json.loads(
            search(
                cli, tiny_llama_dir, store, "sd", *SET_DIFFERENCE, "--trials", "2", "--json"
            ).stdout
        )
        assert again["trials_run"] == 0 and objectives(again["trials"]) == objectives(
            first["trials"]
        )
        more = json.loads(
            search(
                cli, tiny_llama_dir, store, "sd", *SET_DIFFERENCE, "--trials", "3", "--json"
            ).stdout
        )
        assert more["trials_run"] == 1 and objectives(more["trials"])[:2] == objectives(
            first["trials"]
        )
        other = search(
            cli, tiny_llama_dir, store, "sd", *SET_DIFFERENCE, "--trials", "3", "--seed", "5"
        )
        assert_one_line_error(other, "search 'sd'", "other settings", "seed")

    def test_keep_writes_what_prune_writes(self, cli, sets_store, tiny_llama_dir, tmp_path):
        store = copy_store(sets_store, tmp_path)
        result = search(
            cli,
            tiny_llama_dir,
            store,
            "sd",
            *SET_DIFFERENCE,
            "--trials",
            "3",
            "--keep",
            "2",
            "--json",
        )
        assert result.exit_code == 0, result.stderr
        found = json.loads(result.stdout)
        assert found["kept"]
        for name in found["kept"]:
            index = int(name.rsplit(".t", 1)[1])
            point = next(t for t in found["front"] if t["index"] == index)
            with MaskFile(store / "masks" / f"{name}.h5") as kept:
                assert kept.meta["search"]["name"] == "sd" and kept.meta["search"]["trial"] == index
                kept_bits = {key: kept.read(key) for key in kept.keys}
            p, q = point["params"]["p"], point["params"]["q"]
            pruned = cli("prune", "--store", store, "--scores", "safety", "--utility-scores", "utility",
                         "--p", repr(p), "--q", repr(q), "--name", "by-hand", "--overwrite", "--no-progress")  # fmt: skip
            assert pruned.exit_code == 0, pruned.stderr
            with MaskFile(store / "masks" / "by-hand.h5") as by_hand:
                for key in by_hand.keys:
                    assert np.array_equal(by_hand.read(key), kept_bits[key])
                assert by_hand.meta["actual_sparsity"] == pytest.approx(point["sparsity"])

    def test_keeping_more_than_the_front_holds_says_so(self, cli, sets_store, tiny_llama_dir,
                                                       tmp_path):  # fmt: skip
        store = copy_store(sets_store, tmp_path)
        result = search(cli, tiny_llama_dir, store, "sd", *SET_DIFFERENCE, "--trials", "2",
                        "--keep", "1000", "--no-control", "--json")  # fmt: skip
        assert result.exit_code == 0, result.stderr
        found = json.loads(result.stdout)
        assert len(found["kept"]) == len(found["front"])
        assert f"--keep 1000: the front has {len(found['front'])} point(s), all kept" in " ".join(
            result.stderr.split()
        )

    def test_a_kept_removal_is_not_evaluated_on_its_search_prompts(
        self, cli, sets_store, tiny_llama_dir, tmp_path
    ):
        store = copy_store(sets_store, tmp_path)
        found = json.loads(
            search(
                cli,
                tiny_llama_dir,
                store,
                "sd",
                *SET_DIFFERENCE,
                "--trials",
                "2",
                "--keep",
                "1",
                "--json",
            ).stdout
        )
        args = ("eval-attack", "--model", tiny_llama_dir, "--mask", found["kept"][0], "--store", store,
                "--configs", "basic_nosys", "--max-new-tokens", "2", "--no-progress", "--device", "cpu")  # fmt: skip
        overlapping = cli(*args, "--prompts", "advbench", "--limit", "104", "--out", tmp_path / "a")
        assert_one_line_error(overlapping, "shares 4 prompts", "search 'sd'", "held-out")
        held_out = cli(
            *args, "--prompts", "advbench", "--limit", "2", "--out", tmp_path / "r" / "kept"
        )
        assert held_out.exit_code == 0, held_out.stderr
        # report says which prompts chose the removal and which measured it
        assert cli("report", tmp_path / "r", "--markdown", tmp_path / "study.md").exit_code == 0
        notes = (tmp_path / "study.md").read_text()
        assert "ASR measured on: advbench.txt" in notes
        assert (
            f"kept: chosen by search 'sd' (trial {found['kept'][0].rsplit('.t', 1)[1]}) on the search prompts advbench 101–104"
            in notes
        )

    def test_the_projection(self, cli, sets_store, tiny_llama_dir, tmp_path):
        store = copy_store(sets_store, tmp_path)
        result = search(
            cli,
            tiny_llama_dir,
            store,
            "proj",
            *PROJECTION,
            "--trials",
            "3",
            "--keep",
            "1",
            "--json",
        )
        assert result.exit_code == 0, result.stderr
        found = json.loads(result.stdout)
        assert all(0 < t["removed_rank_fraction"] < 1 for t in found["trials"])
        assert (store / "edits" / f"{found['kept'][0]}.h5").is_file()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--scores", "safety", "--utility-scores", "utility", "--p", "0.1:1.5", "--q", "0.1:0.2"), "--p 0.1:1.5: fractions must lie in (0, 1]"),
        (("--scores", "safety", "--utility-scores", "utility", "--p", "0.3:0.1", "--q", "0.1:0.2"), "is empty"),
        (("--scores", "safety", "--utility-scores", "utility", "--p", "0.1", "--q", "0.1:0.2"), "give a range LO:HI"),
        (("--scores", "safety", "--utility-scores", "utility", "--p", "0.1:0.2"), "search one kind of removal"),
        (("--scores", "actsvd-safety", "--utility-scores", "actsvd-utility", "--safety-ranks", "1:40", "--utility-ranks", "1:4"), "reaches above layer 0"),
        (("--scores", "safety", "--utility-scores", "utility", "--p", "0.1:0.2", "--q", "0.1:0.2", "--offset", "0"), "shares 4 prompts with the held-out set advbench:100"),
    ],
)  # fmt: skip
def test_bad_input_one_line_and_the_store_untouched(
    cli, sets_store, tiny_llama_dir, tmp_path, extra, fragment
):
    store = copy_store(sets_store, tmp_path)
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    result = search(cli, tiny_llama_dir, store, "bad", *extra)
    assert_one_line_error(result, fragment)
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


# ---------------------------------------------------------------------------------------------
# The in-memory removal


def loaded_model(model_dir):
    return load_model(ModelSpec(model=str(model_dir), device="cpu"))


def weights(loaded) -> dict[str, torch.Tensor]:
    return {lin.key: lin.weight_matrix().detach().clone() for lin in loaded.linear_layers}


def removals_for(store, model_dir, **ranges) -> tuple[TrialRemovals, object]:
    config = SearchConfig(
        name="t", model=ModelSpec(model=str(model_dir), device="cpu"), store=store, **ranges
    )
    removals = TrialRemovals(config, store)
    loaded = loaded_model(model_dir)
    from wandacli.core.console import NullReporter

    removals.prepare(loaded, NullReporter())
    return removals, loaded


@pytest.mark.parametrize("scale", [1.0, 0.0])  # 0: every score equal, all ties
def test_presorted_masks_equal_the_selection(scale):
    rng = np.random.default_rng(0)
    scores = (rng.standard_normal((24, 40)) * scale).astype(np.float32)
    scores[3, :10] = scores[3, 10]  # ties in a row
    utility = rng.standard_normal((24, 40)).astype(np.float32)
    ranked = PresortedMatrix(scores, 0.6, per_row=False)
    ranked_utility = PresortedMatrix(utility, 0.6, per_row=False)
    per_row = PresortedMatrix(scores, 0.6, per_row=True)
    for fraction in (0.0, 0.013, 0.1, 0.25, 0.5, 0.6):
        for p in (0.05, 0.3, 0.6):
            expected = set_difference_mask(scores, utility, p, fraction)
            assert np.array_equal(set_difference(ranked, ranked_utility, p, fraction), expected)
        assert np.array_equal(per_row.top(fraction), row_mask(scores, fraction, prune_highest=True))


def test_set_difference_trial_equals_prune_and_is_undone(cli, sets_store, tiny_llama_dir, tmp_path):
    store = copy_store(sets_store, tmp_path)
    removals, loaded = removals_for(
        store, tiny_llama_dir, scores="safety", utility_scores="utility",
        p=ParameterRange(0.01, 0.5), q=ParameterRange(0.01, 0.5),
    )  # fmt: skip
    original = weights(loaded)
    params = {"p": 0.13, "q": 0.31}
    with WeightChanges(loaded) as changes:
        applied = removals.apply(params, changes)
        in_memory = weights(loaded)
    assert all(torch.equal(original[k], w) for k, w in weights(loaded).items())  # undone exactly
    result = cli("prune", "--store", store, "--scores", "safety", "--utility-scores", "utility",
                 "--p", "0.13", "--q", "0.31", "--name", "m", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    with MaskFile(store / "masks" / "m.h5") as mask:
        for key in mask.keys:
            bits = mask.read(key)
            assert np.array_equal(bits, removals.mask(key, params))
            expected = original[key].clone()
            expected[torch.from_numpy(bits)] = 0
            assert torch.equal(in_memory[key], expected)
        assert applied.amount == mask.meta["actual_sparsity"]


def test_projection_trial_equals_the_edit_and_is_undone(cli, sets_store, tiny_llama_dir, tmp_path):
    from wandacli.evaluation.under_test import load_model_under_test

    store = copy_store(sets_store, tmp_path)
    removals, loaded = removals_for(
        store, tiny_llama_dir, scores="actsvd-safety", utility_scores="actsvd-utility",
        rank_neg=ParameterRange(0, 16, True), rank_pos=ParameterRange(0, 16, True),
    )  # fmt: skip
    original = weights(loaded)
    params = {"rank_neg": 5, "rank_pos": 1}
    with WeightChanges(loaded) as changes:
        applied = removals.apply(params, changes)
        in_memory = weights(loaded)
    assert all(torch.equal(original[k], w) for k, w in weights(loaded).items())
    result = cli("prune", "--store", store, "--model", tiny_llama_dir, "--scores", "actsvd-safety",
                 "--utility-scores", "actsvd-utility", "--rank-neg", "5", "--rank-pos", "1",
                 "--name", "e", "--no-progress", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    edited = load_model_under_test(ModelSpec(model=str(tiny_llama_dir), device="cpu"), "e", store)
    for lin in edited.loaded.linear_layers:
        expected = lin.weight_matrix().detach()
        scale = float(original[lin.key].abs().max())
        assert float((in_memory[lin.key] - expected).abs().max()) <= 2e-6 * scale
    assert applied.amount == pytest.approx(json.loads(result.stdout)["removed_rank_fraction"])


# ---------------------------------------------------------------------------------------------
# The KL cost


def independent_kl(model_dir, mask_store, mask, prompts, positions):
    """KL(dense ‖ masked) written out: per prompt, unpadded, the dense model's greedy tokens
    one at a time, both models' log-softmax at the same positions."""
    from wandacli.evaluation.under_test import load_model_under_test

    dense = loaded_model(model_dir)
    masked = load_model_under_test(
        ModelSpec(model=str(model_dir), device="cpu"), mask, mask_store
    ).loaded
    tokenizer = dense.tokenizer
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt in prompts:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            for _ in range(positions):
                p = torch.log_softmax(dense.model(ids).logits[0, -1].double(), -1)
                q = torch.log_softmax(masked.model(ids).logits[0, -1].double(), -1)
                total += float((p.exp() * (p - q)).sum())
                count += 1
                token = int(p.argmax())
                if token == tokenizer.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return total / count


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny Llama with a head 40× larger: its next-token distributions are peaked (a random
    model's are nearly uniform, and their KL under a mask would be float32 noise)."""
    from tests.conftest import build_tiny_llama, save_model

    model = build_tiny_llama(len(tokenizer), seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("models") / "peaked")


def test_kl_is_zero_dense_and_equals_the_written_out_computation(cli, peaked_model_dir, tmp_path):
    from wandacli.evaluation.prompts import read_prompts

    store = tmp_path / "store"
    assert cli("score", "--method", "magnitude", "--model", peaked_model_dir, "--store", store,
               "--device", "cpu", "--no-progress").exit_code == 0  # fmt: skip
    assert cli("prune", "--store", store, "--scores", "magnitude", "--sparsity-ratio", "0.3",
               "--name", "m", "--no-progress").exit_code == 0  # fmt: skip
    common = ("eval-utility", "--model", peaked_model_dir, "--data", "none", "--kl", "--kl-limit",
              "5", "--kl-positions", "3", "--device", "cpu", "--no-progress", "--json")  # fmt: skip
    dense = json.loads(cli(*common, "--out", tmp_path / "r" / "dense").stdout)
    assert dense["kl"] == 0.0
    masked = json.loads(
        cli(*common, "--mask", "m", "--store", store, "--out", tmp_path / "r" / "m").stdout
    )
    prompts = read_prompts("utility-held-out", limit=5).texts
    expected = independent_kl(peaked_model_dir, store, "m", prompts, 3)
    assert expected > 0.01 and masked["kl"] == pytest.approx(expected, rel=1e-4)
    assert len(list((tmp_path / "r" / "kl-dense").glob("*.npz"))) == 1  # computed once, reused
    report = json.loads(cli("report", tmp_path / "r", "--json").stdout)
    assert {row["label"]: row["kl"] for row in report} == {"dense": 0.0, "m": masked["kl"]}


def test_kl_of_a_saved_model_is_measured_from_its_dense_model(cli, peaked_model_dir, tmp_path):
    """A saved pruned model's KL equals the same mask's applied in memory: from the dense model
    it records, or from --kl-reference for a model saved by another tool (no provenance); an
    older save that records no dense model is refused with the fix."""
    import shutil

    from wandacli.removal.apply import DENSE_MODEL_KEY, PROVENANCE_NAME

    store = tmp_path / "store"
    assert cli("score", "--method", "magnitude", "--model", peaked_model_dir, "--store", store,
               "--device", "cpu", "--no-progress").exit_code == 0  # fmt: skip
    saved = tmp_path / "pruned"
    assert cli("prune", "--store", store, "--scores", "magnitude", "--sparsity-ratio", "0.3",
               "--name", "m", "--model", peaked_model_dir, "--save-model", saved,
               "--no-progress").exit_code == 0  # fmt: skip
    common = ("eval-utility", "--data", "none", "--kl", "--kl-limit", "4", "--kl-positions", "2",
              "--device", "cpu", "--no-progress", "--json")  # fmt: skip

    def kl(*extra, out):
        result = cli(*common, *extra, "--out", tmp_path / "r" / out)
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    in_memory = kl("--model", peaked_model_dir, "--mask", "m", "--store", store, out="memory")
    assert in_memory["kl"] > 0.01
    recorded = kl("--model", saved, out="recorded")
    assert recorded["kl"] == pytest.approx(in_memory["kl"], rel=1e-5)
    assert recorded["kl_detail"]["reference"] == in_memory["kl_detail"]["reference"]
    other_tool = tmp_path / "other-tool"
    shutil.copytree(saved, other_tool)
    (other_tool / PROVENANCE_NAME).unlink()  # as another tool saves it: no provenance
    named = kl("--model", other_tool, "--kl-reference", peaked_model_dir, out="named")
    assert named["kl"] == pytest.approx(in_memory["kl"], rel=1e-5)
    provenance = json.loads((saved / PROVENANCE_NAME).read_text())
    del provenance[DENSE_MODEL_KEY]  # as a save made before the record
    (saved / PROVENANCE_NAME).write_text(json.dumps(provenance))
    result = cli(*common, "--model", saved, "--out", tmp_path / "r" / "old")
    assert_one_line_error(result, "pass --kl-reference DENSE")
    lonely = cli(*common[:3], "--kl-reference", peaked_model_dir, "--model", saved)
    assert_one_line_error(lonely, "--kl-reference is the dense model of the KL cost: add --kl")


# ---------------------------------------------------------------------------------------------
# A kill mid-search


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        "wandacli.search.run:_write_summary:2:after",  # between trials: two complete
        "wandacli.search.objectives:kl_divergence:3",  # inside the third trial, before it is told
    ],
)
def test_a_killed_search_resumes_to_the_same_front(sets_store, tiny_llama_dir, tmp_path, fault):
    from tests.test_reliability import run_forked

    args = ["search", "--model", tiny_llama_dir, *SET_DIFFERENCE, "--name", "sd", *QUICK,
            "--trials", "4", "--json", "--no-control"]  # fmt: skip
    through = copy_store(sets_store, tmp_path / "through")
    whole = run_forked(*args, "--store", through)
    assert whole.returncode == 0, whole.stderr
    expected = json.loads(whole.stdout)
    killed_store = copy_store(sets_store, tmp_path / "killed")
    killed = run_forked(*args, "--store", killed_store, fault=fault)
    assert killed.returncode == -9
    kept = json.loads((killed_store / "searches" / "sd" / "search.json").read_text())
    complete_before = objectives(kept["trials"])
    assert complete_before == objectives(expected["trials"])[: len(complete_before)]
    resumed = run_forked(*args, "--store", killed_store)
    assert resumed.returncode == 0, resumed.stderr
    found = json.loads(resumed.stdout)
    assert objectives(found["trials"]) == objectives(expected["trials"])
    strip = [
        {k: t[k] for k in ("index", "params", "refusal", "kl", "sparsity")} for t in found["front"]
    ]
    assert strip == [
        {k: t[k] for k in ("index", "params", "refusal", "kl", "sparsity")}
        for t in expected["front"]
    ]


def test_refusal_measures_equal_the_unshared_computation(peaked_model_dir):
    """The prefix computed once per batch (evaluation/prefix.py) changes nothing: greedy
    responses equal whole prompts generated left-padded, the refusal score equals a
    per-prompt forward pass."""
    from tests.test_attack import plain_generate
    from wandacli.evaluation.judges import KeywordJudge
    from wandacli.evaluation.prompts import model_texts, read_prompts
    from wandacli.evaluation.refusal import (
        is_refusal,
        refusal_rate,
        refusal_score,
        refusal_token_ids,
    )

    loaded = loaded_model(peaked_model_dir)
    prompts = read_prompts("advbench", offset=100, limit=6).texts
    texts, special = model_texts(loaded.tokenizer, prompts, "chat")
    rate, responses = refusal_rate(
        loaded, texts, add_special_tokens=special, max_new_tokens=6, batch_size=4
    )
    plain = plain_generate(loaded, texts, special, max_new_tokens=6, batch_size=4)
    assert responses == [group[0] for group in plain]
    assert rate == sum(is_refusal(r, 6) for r in responses) / len(responses)
    # One keyword rule: search's refusals are what eval-attack's keyword judge does not count.
    verdicts = KeywordJudge(max_new_tokens=6).judge(prompts, responses)
    assert rate == 1 - sum(v.success for v in verdicts) / len(verdicts)
    expected = 0.0
    refusal_ids = refusal_token_ids(loaded.tokenizer)
    with torch.no_grad():
        for text in texts:
            ids = loaded.tokenizer(text, add_special_tokens=special, return_tensors="pt").input_ids
            log_probs = torch.log_softmax(loaded.model(ids).logits[0, -1].double(), -1)
            p = float(log_probs[refusal_ids].exp().sum())
            expected += np.log(p) - np.log(1 - p)
    score = refusal_score(loaded, texts, add_special_tokens=special, batch_size=4)
    assert score == pytest.approx(expected / len(texts), rel=1e-4, abs=1e-6)


def test_a_refusal_rate_stopped_at_each_phrase_counts_the_same(peaked_model_dir, monkeypatch):
    """The search's refusal rate stops a response at its first refusal phrase (it is a refusal
    whatever follows), and a batch once each of its responses has one or has ended: the same
    rate as the whole responses, each stopped response the start of its whole one."""
    from wandacli.core import reference
    from wandacli.evaluation.keyword_rule import has_refusal_phrase
    from wandacli.evaluation.prompts import model_texts, read_prompts
    from wandacli.evaluation.refusal import refusal_rate

    loaded = loaded_model(peaked_model_dir)
    prompts = read_prompts("advbench", offset=100, limit=8).texts
    texts, special = model_texts(loaded.tokenizer, prompts, "chat")

    def rate_and_responses(stop):
        return refusal_rate(loaded, texts, add_special_tokens=special, max_new_tokens=8,
                            batch_size=4, stop_at_phrase=stop)  # fmt: skip

    _, first = rate_and_responses(False)
    # The tiny model's own openings as "refusal phrases": half its responses refuse.
    monkeypatch.setattr(reference, "REFUSAL_PHRASES", tuple({r.text[:4] for r in first[::2]}))
    rate, whole = rate_and_responses(False)
    stopped_rate, stopped = rate_and_responses(True)
    assert 0 < rate < 1
    assert stopped_rate == rate
    for full, cut in zip(whole, stopped, strict=True):
        assert full.text.startswith(cut.text)
        if not has_refusal_phrase(full.text):
            assert cut == full
    assert sum(map(len, (r.text for r in stopped))) < sum(map(len, (r.text for r in whole)))


def test_a_family_whose_lower_layers_cannot_be_skipped_gets_the_whole_pass(peaked_model_dir):
    """The pass from a layer up is checked on the dense model first: where a layer reads what a
    lower one left (here a hook carrying layer 0's output to the last), the check fails, says
    why, and the KL is the whole pass's."""
    from wandacli.evaluation.divergence import (
        dense_distributions,
        kl_divergence,
        recorded_streams,
    )
    from wandacli.evaluation.prompts import model_texts, read_prompts
    from wandacli.models.layers import decoder_layers

    loaded = loaded_model(peaked_model_dir)
    layers = decoder_layers(loaded.model)
    carried = {}
    layers[0].register_forward_hook(lambda _m, _a, out: carried.update(out=out))
    layers[-1].register_forward_hook(lambda _m, _a, out: out + carried["out"])
    texts, special = model_texts(loaded.tokenizer, read_prompts("utility", limit=4).texts, "chat")
    dense = dense_distributions(loaded, texts, positions=1, add_special_tokens=special)
    streams = recorded_streams(loaded, dense)
    assert not streams.usable
    assert "moved the logits" in streams.why_not
    assert streams.start_for(len(layers) - 1) is None
    with WeightChanges(loaded) as changes:
        top = [lin for lin in loaded.linear_layers if lin.layer == len(layers) - 1][0]
        changes.replace(top.key, top.weight_matrix().detach() * 1.5)
        whole = kl_divergence(loaded, dense)
        assert (
            kl_divergence(loaded, dense, streams=streams, unchanged_below=changes.unchanged_below())
            == whole
            > 0
        )


def mixed_length_distributions(loaded):
    """The dense KL distributions of 7 utility prompts, 62 to 205 tokens in the chat template,
    in one batch: packed, some rows hold two prompts or more."""
    from wandacli.evaluation.divergence import dense_distributions
    from wandacli.evaluation.prompts import model_texts, read_prompts

    texts, special = model_texts(loaded.tokenizer, read_prompts("utility", limit=7).texts, "chat")
    return dense_distributions(loaded, texts, positions=1, add_special_tokens=special, batch_size=8)


def test_a_model_whose_prompts_would_read_each_other_gets_padded_batches(
    peaked_model_dir, monkeypatch
):
    """Prompts laid end to end in a row are checked on the dense model first (the first
    batch packed against padded): where one prompt reads another (here the mask lets every
    token read the whole row before it), the check fails, says why, and every batch is padded
    as before packing."""
    from wandacli.evaluation import prefix as prefix_module
    from wandacli.evaluation.divergence import describe_layout

    loaded = loaded_model(peaked_model_dir)
    packed = mixed_length_distributions(loaded)
    assert packed.packed
    assert describe_layout(packed).startswith("KL: each batch's prompts laid end to end")
    packed_batch = prefix_module.packed_batch

    def reading_the_row(*args):
        batch = packed_batch(*args)
        width, prefix = batch.ids.shape[1], batch.prefix.shape[1]
        causal = torch.ones((width, prefix + width), dtype=torch.bool).tril(prefix)
        return dataclasses.replace(batch, readable=causal.expand_as(batch.readable))

    monkeypatch.setattr(prefix_module, "packed_batch", reading_the_row)
    padded = mixed_length_distributions(loaded)
    assert not padded.packed
    assert "the packed pass moved the dense distributions by" in padded.why_not_packed
    assert describe_layout(padded).startswith("KL: each batch padded to its longest prompt (")
    # Padded, the same prompts in the same order get the packed pass's distributions.
    assert len(padded.batches) > 1
    ours = torch.cat([b.log_probs for b in padded.batches])
    theirs = torch.cat([b.log_probs for b in packed.batches])
    order = [
        tuple(row)
        for b in padded.batches
        for row in prefix_module.unpadded_rows(b.input_ids, b.attention_mask)
    ]
    assert order == [
        tuple(row)
        for b in packed.batches
        for row in prefix_module.unpadded_rows(b.input_ids, b.attention_mask)
    ]
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-4)


def test_a_measured_model_that_cannot_read_packed_rows_gets_padded_ones(
    peaked_model_dir, monkeypatch
):
    """The KL of another model than the dense one (`eval-utility --kl-reference`) against
    packed dense distributions: where the measured model cannot read prompts end to end, its
    batches are padded, and its KL is the packed model's to float rounding."""
    from wandacli.evaluation import prefix as prefix_module
    from wandacli.evaluation.divergence import kl_divergence

    dense_model = loaded_model(peaked_model_dir)
    dense = mixed_length_distributions(dense_model)
    assert dense.packed
    measured = loaded_model(peaked_model_dir)
    measured.model.config.sliding_window = 8  # Llama's attention ignores it; packing may not
    packed_passes = []
    packed_batch = prefix_module.packed_batch
    monkeypatch.setattr(
        prefix_module, "packed_batch", lambda *a: packed_passes.append(1) or packed_batch(*a)
    )
    for loaded in (dense_model, measured):
        by_layer = {lin.layer: lin for lin in loaded.linear_layers}
        with WeightChanges(loaded) as changes:
            changes.replace(by_layer[1].key, by_layer[1].weight_matrix().detach() * 1.5)
            if loaded is dense_model:
                packed_kl = kl_divergence(loaded, dense)
                assert packed_passes
                packed_passes.clear()
            else:
                padded_kl = kl_divergence(loaded, dense)
    assert not packed_passes
    assert padded_kl > 1e-3
    assert padded_kl == pytest.approx(packed_kl, rel=1e-4)


@pytest.mark.parametrize(
    ("setting", "value", "why"),
    [
        ("_attn_implementation", "flash_attention_2", "its attention (flash_attention_2)"),
        ("layer_types", ["full_attention", "linear_attention"], "of kind linear_attention"),
        ("sliding_window", 16, "longer than its sliding window (16)"),
    ],
)
def test_what_cannot_read_prompts_end_to_end_is_said(peaked_model_dir, setting, value, why):
    """Attention that takes no 4-D mask, layers that carry state along a row, and a sliding
    window shorter than a prompt each keep the KL's batches padded, and say so."""
    from wandacli.evaluation.prefix import packing_unsupported

    model = loaded_model(peaked_model_dir).model
    assert packing_unsupported(model, 40) is None
    setattr(model.config, setting, value)
    assert why in (packing_unsupported(model, 40) or "")


def test_weight_changes_say_what_they_left_alone(peaked_model_dir):
    """`unchanged_below`: the layer count untouched, the lowest changed layer, 0 once the
    embedding changed (it feeds every layer); restored, untouched again."""
    loaded = loaded_model(peaked_model_dir)
    count = 1 + max(lin.layer for lin in loaded.linear_layers)
    by_layer = {lin.layer: lin for lin in loaded.linear_layers}
    with WeightChanges(loaded) as changes:
        assert changes.unchanged_below() == count
        changes.zero(by_layer[1].key, np.eye(*by_layer[1].shape, dtype=bool))
        assert changes.unchanged_below() == 1
        changes.replace(by_layer[0].key, by_layer[0].weight_matrix().detach() * 2)
        assert changes.unchanged_below() == 0
        changes.replace_embedding(loaded.model.get_input_embeddings().weight.detach() * 2)
        assert changes.unchanged_below() == 0
        changes.restore()
        assert changes.unchanged_below() == count


def whole_pass_only(monkeypatch) -> None:
    """Searches record no streams (evaluation/lower_layers.py): every KL and every refusal
    prompts' pass by the whole model."""
    from wandacli.evaluation import lower_layers

    monkeypatch.setattr(
        lower_layers, "record_streams", lambda *a, **k: lower_layers.unusable("off")
    )


def measured_trials(result) -> list[tuple]:
    """A `search --json` run's trials: (parameters, refusal, KL)."""
    return [(t["params"], t["refusal"], t["kl"]) for t in json.loads(result.stdout)["trials"]]


def test_a_mask_search_records_the_lower_layers_only_where_a_trial_can_skip_them(
    cli, sets_store, tiny_llama_dir, tmp_path, monkeypatch
):
    """A set difference over every layer changes layer 0 on every trial: nothing is recorded,
    and the log says why. Over layer 1 only, each trial's KL starts there, and measures what
    the whole pass measures (the same search without the recording)."""
    store = copy_store(sets_store, tmp_path)
    every = search(cli, tiny_llama_dir, store, "every", *SET_DIFFERENCE, "--trials", "2", "--json")
    assert every.exit_code == 0, every.stderr
    assert "KL: the whole pass on every trial (every trial changes the embedding or layer 0)" in (
        every.stderr
    )
    upper = search(cli, tiny_llama_dir, store, "upper", *SET_DIFFERENCE, "--layers", "1",
                   "--trials", "2", "--json")  # fmt: skip
    assert upper.exit_code == 0, upper.stderr
    assert "KL: each trial's pass starts at its first changed layer" in upper.stderr
    whole_pass_only(monkeypatch)
    whole = search(cli, tiny_llama_dir, store, "whole", *SET_DIFFERENCE, "--layers", "1",
                   "--trials", "2", "--json")  # fmt: skip
    assert measured_trials(upper) == measured_trials(whole)
    assert all(kl > 0 for _, _, kl in measured_trials(upper))


def test_a_search_on_the_refusal_score_counts_its_front_by_generation(
    cli, sets_store, tiny_llama_dir, tmp_path
):
    """`--refusal score` measures each trial without generating; then the dense model and each
    front point are counted by generation, as a generation search measures the same trial,
    and --keep-best chooses on those counts. A rerun counts nothing again."""
    from wandacli.config.ranges import BestRule
    from wandacli.search import study as studies

    store = copy_store(sets_store, tmp_path)
    random_trials = (*SET_DIFFERENCE, "--trials", "4", "--startup-trials", "4", "--json")
    scored = search(cli, tiny_llama_dir, store, "s", *random_trials, "--refusal", "score",
                    "--keep-best", "refusal:0.5")  # fmt: skip
    assert scored.exit_code == 0, scored.stderr
    assert "counting" in scored.stderr and "by generation" in scored.stderr
    generated = search(cli, tiny_llama_dir, store, "g", *random_trials)
    assert generated.exit_code == 0, generated.stderr
    summary = json.loads((store / "searches" / "s" / "search.json").read_text())
    assert "log-odds" in summary["objectives"]["refusal"]
    assert "responses" in summary["objectives"]["counted_refusal"]
    rates = {t["index"]: t["refusal"] for t in json.loads(generated.stdout)["trials"]}
    for point in summary["front"]:
        assert point["counted_refusal"] == rates[point["index"]]
    assert summary["dense"]["counted_refusal"] == json.loads(generated.stdout)["dense"]["refusal"]
    in_counts = [p | {"refusal": p["counted_refusal"]} for p in summary["front"]]
    assert [p["index"] for p in summary["counted_front"]] == [
        p["index"] for p in studies.pareto_front(in_counts)
    ]
    chosen, _ = BestRule.parse("refusal:0.5").choose(summary["counted_front"])
    assert summary["best"]["index"] == chosen["index"]
    again = search(cli, tiny_llama_dir, store, "s", *random_trials, "--refusal", "score",
                   "--keep-best", "refusal:0.5")  # fmt: skip
    assert again.exit_code == 0, again.stderr
    assert "counting" not in again.stderr


def test_a_scored_search_with_no_point_within_its_rule_names_the_nearest_count(
    cli, sets_store, tiny_llama_dir, tmp_path
):
    """The nearest point's warning gives its refusal as the rule judged it: the count by
    generation, not the score."""
    store = copy_store(sets_store, tmp_path)
    trials = ("--trials", "3", "--startup-trials", "3")
    rule = ("--refusal", "score", "--keep-best", "refusal:-1")
    result = search(cli, tiny_llama_dir, store, "s", *SET_DIFFERENCE, *trials, *rule)
    assert result.exit_code == 0, result.stderr
    summary = json.loads((store / "searches" / "s" / "search.json").read_text())
    nearest = next(p for p in summary["counted_front"] if p["index"] == summary["best"]["index"])
    assert summary["best"]["within_limit"] is False
    assert f"(refusal {nearest['refusal']:.3g})" in " ".join(result.stderr.split())


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (("--objective", "heretic"), "--objective heretic"),
        (("--objective", "keep-best", "--keep-best", "refusal:0.5"), "--keep-best refusal:0.5"),
    ],
)
def test_a_refusal_score_where_a_rate_is_needed_is_one_line(
    cli, sets_store, tiny_llama_dir, tmp_path, extra, named
):
    store = copy_store(sets_store, tmp_path)
    result = search(cli, tiny_llama_dir, store, "s", *SET_DIFFERENCE, "--refusal", "score", *extra)
    assert_one_line_error(result, named, "--refusal generation")
    assert not (store / "searches").exists()


# ---------------------------------------------------------------------------------------------
# The point a study evaluates (`--keep-best`) and the random control of an edit (`--match-ranks`)


FRONT = [
    {"index": 4, "refusal": 0.0, "kl": 3.0},
    {"index": 1, "refusal": 0.25, "kl": 1.2},
    {"index": 7, "refusal": 0.5, "kl": 0.4},
    {"index": 2, "refusal": 0.9, "kl": 0.01},
]


@pytest.mark.parametrize(
    ("rule", "index", "within"),
    [
        ("refusal:0.5", 7, True),  # the cheapest point that halves the refusals
        ("refusal:0.3", 1, True),
        ("kl:1.5", 1, True),  # the fewest refusals within the KL budget
        ("kl:0.1", 2, True),
        ("kl:0.001", 2, False),  # none within: the nearest
        ("refusal:-1", 4, False),
    ],
)
def test_the_best_rule_chooses_on_the_front(rule, index, within):
    from wandacli.config.ranges import BestRule

    chosen, inside = BestRule.parse(rule).choose(FRONT)
    assert (chosen["index"], inside) == (index, within)


@pytest.mark.parametrize("text", ["refusal", "ppl:0.5", "kl:x", "kl:inf", ":0.5"])
def test_a_bad_best_rule_is_one_line(cli, sets_store, tiny_llama_dir, tmp_path, text):
    store = copy_store(sets_store, tmp_path)
    result = search(cli, tiny_llama_dir, store, "sd", *SET_DIFFERENCE, "--keep-best", text)
    assert_one_line_error(result, "--keep-best")
    assert not (store / "searches").exists()


def test_keep_best_and_the_random_edit_of_its_size(cli, sets_store, tiny_llama_dir, tmp_path):
    """The .best edit is the rule's point, written as `prune` writes it; `prune --match-ranks`
    removes the same rank per module in random directions, the very control the search
    measured (one seed, one draw order), and a rerun keeps it."""
    from wandacli.config.ranges import BestRule
    from wandacli.removal.apply import EditRemoval
    from wandacli.store.files import EditFile

    store = copy_store(sets_store, tmp_path)
    found = json.loads(
        search(cli, tiny_llama_dir, store, "proj", *PROJECTION, "--trials", "3",
               "--keep-best", "refusal:2", "--seed", "5", "--json").stdout
    )  # fmt: skip
    chosen, _ = BestRule.parse("refusal:2").choose(found["front"])
    assert found["best"] == {"name": "proj.best", "index": chosen["index"],
                             "rule": "refusal:2", "within_limit": True}  # fmt: skip
    with EditFile(store / "edits" / "proj.best.h5") as best:
        assert best.meta["search"]["trial"] == chosen["index"]
        assert best.meta["search"]["rule"] == "refusal:2"
        removed = {k: m["removed_rank"] for k, m in best.meta["modules"].items()}
    control_args = ("prune", "--store", store, "--scores", "actsvd-safety", "--match-ranks",
                    "proj.best", "--seed", "5", "--name", "ctl", "--no-progress", "--json")  # fmt: skip
    made = cli(*control_args)
    assert made.exit_code == 0, made.stderr
    assert json.loads(made.stdout)["removed_rank_fraction"] == pytest.approx(
        chosen["removed_rank_fraction"]
    )
    with EditFile(store / "edits" / "ctl.h5") as control:
        assert control.mode == "random-ranks"
        assert control.meta["matched_edit"]["name"] == "proj.best"
        assert {k: m["removed_rank"] for k, m in control.meta["modules"].items()} == {
            k: r for k, r in removed.items() if r
        }
        for key in control.keys:
            q = torch.from_numpy(control.bases(key)["remove"]).double()
            assert q.shape[1] == removed[key]
            assert torch.allclose(q.T @ q, torch.eye(q.shape[1], dtype=torch.float64), atol=1e-6)
        # applied from the store, it equals the search's own control of that point
        removals, loaded = removals_for(
            store, tiny_llama_dir, scores="actsvd-safety", utility_scores="actsvd-utility",
            rank_neg=ParameterRange(1, 8, True), rank_pos=ParameterRange(1, 16, True),
        )  # fmt: skip
        with WeightChanges(loaded) as changes:
            applied = removals.apply(chosen["params"], changes)
            changes.restore()
            removals.apply_control(applied, changes, 5)
            in_search = weights(loaded)
        with EditRemoval(control) as removal:
            removal.apply(loaded)
        for key, weight in weights(loaded).items():
            assert float((weight - in_search[key]).abs().max()) <= 2e-6 * float(
                in_search[key].abs().max() + 1e-12
            ), key
    again = cli(*control_args)
    assert again.exit_code == 0 and json.loads(again.stdout)["already_complete"] is True
    other_seed = cli(*control_args[:-6], "--seed", "6", "--name", "ctl", "--no-progress")
    assert_one_line_error(other_seed, "ctl")


def test_match_ranks_bad_input_is_one_line(cli, sets_store, tiny_llama_dir, tmp_path):
    store = copy_store(sets_store, tmp_path)
    missing = cli("prune", "--store", store, "--scores", "actsvd-safety", "--match-ranks", "nope")
    assert_one_line_error(missing, "no edit 'nope'")
    stray_seed = cli("prune", "--store", store, "--scores", "safety", "--sparsity-ratio", "0.1",
                     "--seed", "3")  # fmt: skip
    assert_one_line_error(stray_seed, "--seed")
    assert not (store / "edits").exists() and not (store / "masks").exists()


def test_kl_when_every_dense_continuation_ends_at_once(tiny_llama_dir, monkeypatch):
    """generate stops early once every row has ended (the model's own generation config
    supplies an end-of-sequence id): the continuation is padded to k and the positions after
    the end do not count, instead of the batch's positions no longer lining up."""
    from wandacli.evaluation.divergence import dense_distributions, kl_divergence

    loaded = loaded_model(tiny_llama_dir)
    eos = loaded.tokenizer.eos_token_id
    real_generate = loaded.model.generate

    def ends_at_once(*args, **kwargs):
        prompt = kwargs["input_ids"]
        out = real_generate(*args, **kwargs)[:, : prompt.shape[1] + 1].clone()
        out[:, -1] = eos  # every row's first token ends it; generate returns no more
        return out

    monkeypatch.setattr(loaded.model, "generate", ends_at_once)
    texts = ["Say one thing.", "Say another, longer thing, please.", "A third."]
    dense = dense_distributions(loaded, texts, positions=4, add_special_tokens=True)
    for batch in dense.batches:
        assert batch.valid.shape == (len(batch.input_ids), 4)
        assert batch.valid[:, 0].all() and not batch.valid[:, 1:].any()
    monkeypatch.setattr(loaded.model, "generate", real_generate)
    assert kl_divergence(loaded, dense) == 0.0


def test_requests_record_the_dtype_used_and_a_resume_in_another_is_refused(
    cli, sets_store, tiny_llama_dir, tmp_path
):
    """`--dtype auto` is recorded as the dtype it resolved to (float32 on this CPU), so that a
    search is not continued in another dtype (bfloat16, as `auto` gives on a GPU) and mixes
    trials of both; a request recorded as `auto` (before this) still counts as the same."""
    store = copy_store(sets_store, tmp_path)
    first = search(
        cli, tiny_llama_dir, store, "sd", *SET_DIFFERENCE, "--trials", "1", "--no-control"
    )
    assert first.exit_code == 0, first.stderr
    path = store / "searches" / "sd" / "search.json"
    summary = json.loads(path.read_text())
    assert summary["request"]["model"]["dtype"] == "float32"
    other = search(cli, tiny_llama_dir, store, "sd", *SET_DIFFERENCE, "--trials", "1",
                   "--no-control", "--dtype", "bfloat16")  # fmt: skip
    assert_one_line_error(other, "search 'sd'", "other settings", "dtype: float32 → bfloat16")
    summary["request"]["model"]["dtype"] = "auto"
    path.write_text(json.dumps(summary))
    again = search(
        cli, tiny_llama_dir, store, "sd", *SET_DIFFERENCE, "--trials", "1", "--no-control"
    )
    assert again.exit_code == 0, again.stderr


def test_a_search_logs_the_preparation_its_kind_makes(
    cli, sets_store, means_store, tiny_llama_dir, tmp_path, monkeypatch
):
    """In a log, a search names what it computes once before its trials: a mask search ranks
    the stored scores, a projection decomposes every module; a direction search prepares
    nothing worth a line, and says nothing of it (it once said it ranked 0 sets)."""
    monkeypatch.setenv("WANDACLI_PROGRESS_SECONDS", "0")
    quick = [a for a in QUICK if a != "--no-progress"]
    direction = ("--scores", "harmful", "--utility-scores", "harmless", "--direction-layer", "1:2")
    for sets, space, said in (
        (sets_store, SET_DIFFERENCE, "search: ranking the stored scores: done, "),
        (sets_store, PROJECTION, "search: every module's eigenbases: done, "),
        (means_store, direction, None),
    ):
        store = copy_store(sets, tmp_path / space[1])
        result = cli("search", "--model", tiny_llama_dir, "--store", store, "--name", "s",
                     *quick, *space, "--trials", "1")  # fmt: skip
        assert result.exit_code == 0, result.stderr
        lines = result.stderr.splitlines()
        if said is None:
            assert not [line for line in lines if line.startswith("search: ")], lines
        else:
            assert any(line.startswith(said) for line in lines), lines


def test_a_trial_the_dense_model_dominates_stops_before_its_kl(
    cli, sets_store, tiny_llama_dir, tmp_path, monkeypatch
):
    """A trial refusing as much as the dense model (or more) is dominated by it whatever its
    KL: by default its KL is not measured, the sampler is told it was pruned, and it counts
    towards --trials; the other trials are measured as with --measure-dominated."""
    import wandacli.search.objectives as objectives_module
    from wandacli.search.objectives import Objectives

    # The tiny model refuses nothing, so its refusal is made up from the weights: the dense
    # model (no weight zeroed) 0.5, a trial 0.75 or 0.25 by the parity of what it zeroed.
    def refusal(self, unchanged_below=0):
        zeros = sum(int((p == 0).sum()) for p in self.loaded.model.parameters())
        return 0.5 if zeros == 0 else (0.75 if zeros % 2 else 0.25)

    monkeypatch.setattr(Objectives, "refusal", refusal)
    kl_passes = []
    measured_kl = objectives_module.kl_divergence
    monkeypatch.setattr(
        objectives_module,
        "kl_divergence",
        lambda *a, **k: kl_passes.append(1) or measured_kl(*a, **k),
    )
    runs = {}
    for flag in ("--skip-dominated", "--measure-dominated"):
        kl_passes.clear()
        store = copy_store(sets_store, tmp_path / flag)
        # Every trial random, so both searches propose the same points whatever TPE is told.
        result = cli("search", "--model", tiny_llama_dir, "--store", store, "--name", "sd",
                     *QUICK, *SET_DIFFERENCE, "--trials", "8", "--startup-trials", "8", "--keep-best", "refusal:0.3",
                     "--no-control", "--json", flag)  # fmt: skip
        assert result.exit_code == 0, result.stderr
        runs[flag] = (json.loads(result.stdout), len(kl_passes))
    (skipped, skipped_passes), (measured, measured_passes) = runs.values()
    assert [t["params"] for t in skipped["trials"]] == [t["params"] for t in measured["trials"]]
    dominated = [t for t in skipped["trials"] if t["refusal"] >= 0.5]
    assert dominated and len(dominated) < 8  # both kinds of trial were drawn
    for trial, same in zip(skipped["trials"], measured["trials"], strict=True):
        assert trial["refusal"] == same["refusal"]
        if trial["refusal"] >= 0.5:
            assert trial["state"] == "PRUNED" and trial["dominated_by_dense"] is True
            assert "kl" not in trial
        else:
            assert trial["state"] == "COMPLETE" and trial["kl"] == same["kl"]
    # The dense model's KL pass, then one per trial it does not dominate.
    assert skipped_passes == 1 + 8 - len(dominated) and measured_passes == 1 + 8
    assert [p["index"] for p in skipped["front"]] == [
        p["index"] for p in measured["front"] if p["refusal"] < 0.5
    ]
    assert skipped["best"]["index"] == measured["best"]["index"]
    summary = json.loads((Path(skipped["directory"]) / "search.json").read_text())
    assert "dominated" in summary["objectives"]


def test_a_model_that_refuses_nothing_is_said_to_dominate_every_trial(
    cli, sets_store, tiny_llama_dir, tmp_path
):
    store = copy_store(sets_store, tmp_path)
    result = cli("search", "--model", tiny_llama_dir, "--store", store, "--name", "sd",
                 *QUICK, *SET_DIFFERENCE, "--trials", "3", "--keep-best", "refusal:0.5",
                 "--skip-dominated", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["dense"]["refusal"] == 0.0
    assert [t["state"] for t in found["trials"]] == ["PRUNED"] * 3
    assert found["front"] == [] and found["best"] is None
    assert "refuses none of the search prompts" in result.stderr
    assert "nothing is kept as sd.best" in " ".join(result.stderr.split())
    # A rerun measuring every trial is refused: its trials were told otherwise.
    again = cli("search", "--model", tiny_llama_dir, "--store", store, "--name", "sd",
                *QUICK, *SET_DIFFERENCE, "--trials", "3")  # fmt: skip
    assert again.exit_code != 0 and "measure_dominated" in again.stderr
