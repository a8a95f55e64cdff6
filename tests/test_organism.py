"""The demo's model organism: the fine-tuning step on the tiny model (loss goes down, the saved
model reloads, a second call reuses the cache, an interrupted build leaves nothing), and the
held-out split of the real recipe."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from wandacli.config.settings import ALIGNED_MODEL_ALIAS
from wandacli.core.console import NullReporter
from wandacli.data.sources import load_raw
from wandacli.data.templates import strip_llama2_tags
from wandacli.models import organism
from wandacli.models.organism import (
    DEFAULT_RECIPE,
    AlignmentRecipe,
    aligned_model_dir,
    ensure_aligned_model,
    held_out_prompts,
    training_set,
)
from wandacli.models.sources import resolve_source

# Small enough for seconds on the tiny model; a learning rate that visibly moves a random model.
TINY_RECIPE = AlignmentRecipe(
    harmful_rows=8,
    benign_rows=8,
    steps=8,
    batch_size=4,
    learning_rate=3e-3,
    warmup_steps=1,
    max_tokens=512,
    max_response_tokens=24,
)


@pytest.fixture()
def base_dir(tiny_llama_dir, tmp_path):
    """A private copy of the tiny model: the aligned model is cached beside its base."""
    return shutil.copytree(tiny_llama_dir, tmp_path / "models" / "tiny-llama")


def built(base_dir, recipe=TINY_RECIPE):
    return ensure_aligned_model(base_dir, recipe, reporter=NullReporter())


class TestFineTuning:
    def test_loss_goes_down_and_the_saved_model_reloads(self, base_dir):
        from transformers import AutoModelForCausalLM

        target = built(base_dir)
        assert target == aligned_model_dir(base_dir, TINY_RECIPE)
        record = json.loads((target / organism.RECIPE_FILE).read_text())
        losses = record["losses"]
        assert len(losses) == TINY_RECIPE.steps
        assert sum(losses[-2:]) < sum(losses[:2]), losses
        assert record["recipe"]["seed"] == 0 and record["rows"]["harmful"] == 8
        assert record["data"]["align_short"]["sha256"] == load_raw("align_short").content_hash
        for name, digest in record["sha256"].items():
            assert hashlib.sha256((target / name).read_bytes()).hexdigest() == digest
        tuned = AutoModelForCausalLM.from_pretrained(target)
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        changed = [
            name
            for (name, a), (_, b) in zip(
                tuned.named_parameters(), base.named_parameters(), strict=True
            )
            if not torch.equal(a, b)
        ]
        assert changed and not any("embed" in name for name in changed)

    def test_only_the_top_layers_train_when_asked(self, base_dir):
        from transformers import AutoModelForCausalLM

        recipe = AlignmentRecipe(**{**TINY_RECIPE.__dict__, "train_layers": 1, "steps": 2})
        target = built(base_dir, recipe)
        tuned = AutoModelForCausalLM.from_pretrained(target).state_dict()
        base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
        changed = {k for k in base if not torch.equal(base[k], tuned[k])}
        assert changed and all(k.startswith("model.layers.1.") for k in changed), changed

    def test_the_same_recipe_gives_the_same_weights(self, base_dir, tmp_path):
        other = shutil.copytree(base_dir, tmp_path / "again" / "tiny-llama")
        first = json.loads((built(base_dir) / organism.RECIPE_FILE).read_text())
        second = json.loads((built(other) / organism.RECIPE_FILE).read_text())
        assert first["sha256"] == second["sha256"] and first["losses"] == second["losses"]

    def test_a_second_call_reuses_the_cache(self, base_dir, monkeypatch):
        target = built(base_dir)
        before = (target / organism.RECIPE_FILE).stat().st_mtime_ns

        def no_training(*args, **kwargs):
            raise AssertionError("the cached model should have been reused")

        monkeypatch.setattr(organism, "fine_tune", no_training)
        assert built(base_dir) == target
        assert (target / organism.RECIPE_FILE).stat().st_mtime_ns == before

    @pytest.mark.slow
    def test_another_recipe_is_another_model(self, base_dir):
        other = AlignmentRecipe(**{**TINY_RECIPE.__dict__, "seed": 1, "steps": 2})
        assert built(base_dir) != built(base_dir, other)

    @pytest.mark.slow
    @pytest.mark.parametrize("where", ["training", "saving"])
    def test_an_interrupted_build_leaves_no_model(self, base_dir, monkeypatch, where):
        if where == "training":
            original = organism.fine_tune

            def interrupted(*args, **kwargs):
                def stop(step):
                    if step == 2:
                        raise KeyboardInterrupt

                return original(*args, **kwargs, on_step=stop)

            monkeypatch.setattr(organism, "fine_tune", interrupted)
        else:

            def interrupted_hash(path):
                raise KeyboardInterrupt

            monkeypatch.setattr("wandacli.models.organism.sha256_file", interrupted_hash)
        with pytest.raises(KeyboardInterrupt):
            built(base_dir)
        siblings = sorted(p.name for p in base_dir.parent.iterdir())
        assert siblings == ["tiny-llama", f"tiny-llama-aligned-{TINY_RECIPE.digest()}.lock"] or (
            siblings == ["tiny-llama"]
        ), siblings
        monkeypatch.undo()
        assert (built(base_dir) / organism.RECIPE_FILE).is_file()


class TestHeldOutSplit:
    def test_no_training_prompt_is_an_evaluation_prompt(self):
        chosen = training_set(DEFAULT_RECIPE)
        harmful = {e.prompt for e in chosen.examples if e.harmful}
        assert len(harmful) == DEFAULT_RECIPE.harmful_rows
        assert not harmful & held_out_prompts()
        advbench = load_raw("advbench", purpose="prompts").texts
        jailbreakbench = load_raw("jailbreakbench", purpose="prompts").texts
        assert not harmful & set(advbench[:100]) and not harmful & set(jailbreakbench)

    def test_the_excluded_count_is_what_the_sets_share(self):
        distinct = {strip_llama2_tags(p.prompt)[1] for p in load_raw("align_short").pairs}
        shared = distinct & held_out_prompts()
        assert training_set(DEFAULT_RECIPE).excluded_held_out == len(shared)

    def test_the_choice_is_seeded(self):
        assert training_set(DEFAULT_RECIPE).examples == training_set(DEFAULT_RECIPE).examples
        reseeded = AlignmentRecipe(seed=1)
        assert training_set(reseeded).examples != training_set(DEFAULT_RECIPE).examples


def test_the_alias_names_the_aligned_model():
    source = resolve_source(ALIGNED_MODEL_ALIAS)
    assert source.kind == "aligned" and source.model_id == ALIGNED_MODEL_ALIAS
    assert source.location.endswith(".gguf")
