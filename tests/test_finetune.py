"""`wandacli finetune` (issue #31): the fine-tuning attack on a tiny model. --freeze keeps a
mask's weights bitwise while the others move; --rewind equals the reference's procedure
(train, then put the masked weights back from the model before training); --transplant copies
a mask's weights from another model; what cannot run is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_score_cli import assert_one_line_error
from wandacli.config.settings import ModelSpec
from wandacli.models.loader import load_model
from wandacli.store.files import MaskFile

TRAIN = ("--steps", "3", "--batch-size", "4", "--lr", "0.01", "--device", "cpu", "--no-progress")


def mask_commands(model_dir, store) -> list[list[str]]:
    """The commands that make mask `m` of the model in the store: 30% of each row by
    magnitude."""
    return [
        [str(a) for a in args]
        for args in (
            ["score", "--method", "magnitude", "--model", model_dir, "--store", store,
             "--device", "cpu", "--no-progress"],
            ["prune", "--store", store, "--scores", "magnitude", "--sparsity-ratio", "0.3",
             "--name", "m", "--no-progress"],
        )
    ]  # fmt: skip


@pytest.fixture(scope="module")
def masked_store(tmp_path_factory, tiny_llama_dir):
    """A store with a mask of the tiny model (`mask_commands`)."""
    from typer.testing import CliRunner

    from wandacli.cli import app

    store = tmp_path_factory.mktemp("finetune") / "store"
    runner = CliRunner()
    for args in mask_commands(tiny_llama_dir, store):
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return store


def matrices(model_dir):
    loaded = load_model(ModelSpec(model=str(model_dir), device="cpu", dtype="float32"))
    return {lin.key: lin.weight_matrix().detach().clone() for lin in loaded.linear_layers}


def masks(store):
    with MaskFile(store / "masks" / "m.h5") as mask:
        return {key: torch.from_numpy(mask.read(key)) for key in mask.keys}


def finetune(cli, tiny_llama_dir, pairs_csv, out, *extra):
    result = cli("finetune", "--model", tiny_llama_dir, "--data", pairs_csv, "--out", out,
                 *TRAIN, "--json", *extra)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_freeze_keeps_the_masked_weights_bitwise(
    cli, tiny_llama_dir, pairs_csv, masked_store, tmp_path
):
    out = tmp_path / "frozen"
    made = finetune(cli, tiny_llama_dir, pairs_csv, out, "--freeze", "m", "--store", masked_store)
    assert made["mode"] == "freeze" and made["steps"] == 3 and len(made["losses"]) == 3
    before, after, selected = matrices(tiny_llama_dir), matrices(out), masks(masked_store)
    assert made["masked_weights"] == sum(int(s.sum()) for s in selected.values())
    for key, selector in selected.items():
        assert torch.equal(after[key][selector], before[key][selector]), key
        assert not torch.equal(after[key][~selector], before[key][~selector]), key
    record = json.loads((out / "finetune.json").read_text())
    assert record["config"]["freeze"] == "m" and record["result"]["mode"] == "freeze"


def test_rewind_equals_the_references_procedure(
    cli, tiny_llama_dir, pairs_csv, masked_store, tmp_path
):
    """The reference's rewind_ft_model.py: fine-tune, then W_ft[mask] = W_before[mask]."""
    free = finetune(cli, tiny_llama_dir, pairs_csv, tmp_path / "free")
    rewound = finetune(cli, tiny_llama_dir, pairs_csv, tmp_path / "rewound", "--rewind", "m",
                       "--store", masked_store)  # fmt: skip
    assert free["mode"] == "full" and rewound["mode"] == "rewind"
    assert free["losses"] == rewound["losses"]  # the same training
    before, trained = matrices(tiny_llama_dir), matrices(tmp_path / "free")
    after = matrices(tmp_path / "rewound")
    for key, selector in masks(masked_store).items():
        expected = trained[key].clone()
        expected[selector] = before[key][selector]
        assert torch.equal(after[key], expected), key
        assert not torch.equal(trained[key][selector], before[key][selector])  # it had moved


def test_transplant_copies_the_masked_weights_back(
    cli, tiny_llama_dir, pairs_csv, masked_store, tmp_path
):
    """The attacked model with the mask's weights from the model before the attack: those
    entries equal the aligned model's, every other entry the attacked model's."""
    attacked = tmp_path / "attacked"
    finetune(cli, tiny_llama_dir, pairs_csv, attacked)
    result = cli("finetune", "--model", attacked, "--transplant", "m", "--from", tiny_llama_dir,
                 "--store", masked_store, "--out", tmp_path / "restored", "--device", "cpu",
                 "--no-progress", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["mode"] == "transplant"
    aligned, hit, restored = (
        matrices(tiny_llama_dir),
        matrices(attacked),
        matrices(tmp_path / "restored"),
    )
    for key, selector in masks(masked_store).items():
        assert torch.equal(restored[key][selector], aligned[key][selector]), key
        assert torch.equal(restored[key][~selector], hit[key][~selector]), key
    # Its provenance: made from the aligned model, at the attack's last step (report's figure).
    provenance = json.loads((tmp_path / "restored" / "wandacli-mask.json").read_text())
    assert provenance["dense_model"] == str(tiny_llama_dir)
    assert provenance["finetune"]["mode"] == "transplant" and provenance["finetune"]["step"] == 3
    assert provenance["finetune"]["aligned_model"] == str(tiny_llama_dir)  # report's step 0


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--freeze", "m", "--rewind", "m"), "--freeze and --rewind are two attacks"),
        (("--transplant", "m"), "--transplant needs --from ALIGNED"),
        (("--from", "x"), "--from is --transplant's source"),
        (("--freeze", "nope"), "nope"),
        (("--data", "advbench"), "has no (prompt, response) pairs"),
        (("--max-tokens", "8"), "raise --max-tokens"),
        (("--lora-alpha", "8"), "--lora-alpha scales LoRA's update: add --lora-rank"),
        (("--lora-rank", "-1"), "--lora-rank must be 0 or more"),
    ],
)
def test_bad_finetune_input_is_one_line(
    cli, tiny_llama_dir, pairs_csv, masked_store, tmp_path, extra, fragment
):
    data = () if "--data" in extra else ("--data", pairs_csv)
    result = cli("finetune", "--model", tiny_llama_dir, *data, "--store", masked_store, "--out",
                 tmp_path / "o", *TRAIN, *extra)  # fmt: skip
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "o").exists()


def test_no_data_and_an_occupied_out_are_refused(cli, tiny_llama_dir, pairs_csv, tmp_path):
    nothing = cli("finetune", "--model", tiny_llama_dir, "--out", tmp_path / "o", *TRAIN)
    assert_one_line_error(nothing, "--data is required")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("x")
    taken = cli("finetune", "--model", tiny_llama_dir, "--data", pairs_csv, "--out", occupied,
                *TRAIN)  # fmt: skip
    assert_one_line_error(taken, "pass --overwrite")


def test_a_chat_messages_file_is_read_as_pairs(cli, tiny_llama_dir, tmp_path):
    """The OpenAI fine-tuning format Qi et al.'s pure_bad sets use: each row's first user turn
    and the assistant turn after it (a system turn left out) are a pair."""
    from wandacli.data.sources import load_raw

    path = tmp_path / "attack.jsonl"
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": f"Do thing {i}."},
                      {"role": "assistant", "content": f"Sure, thing {i} goes like this."}]}
        for i in range(8)
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    raw = load_raw(str(path))
    assert raw.kind == "pairs" and len(raw.pairs) == 8
    assert (raw.pairs[3].prompt, raw.pairs[3].response) == (
        "Do thing 3.",
        "Sure, thing 3 goes like this.",
    )
    made = finetune(cli, tiny_llama_dir, path, tmp_path / "out")
    assert made["pairs_used"] == 8 and made["steps"] == 3


def test_responses_from_a_named_model_are_its_greedy_answers_cached(
    cli, tiny_llama_dir, tmp_path, monkeypatch
):
    """`--responses-from M`: the pairs are --data's prompts (from --offset) answered greedily
    by M in its chat template, as transformers' own greedy generate answers them; cached, so a
    second attack generates nothing; finetune.json says where they came from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("WANDACLI_CACHE_DIR", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Tell me about topic number {i}.\n" for i in range(8)))
    args = ("--data", prompts, "--offset", "2", "--limit", "4", "--responses-from",
            tiny_llama_dir, "--response-tokens", "16", "--batch-size", "1", "--held-out", "none")  # fmt: skip
    made = finetune(cli, tiny_llama_dir, prompts, tmp_path / "a", *args[2:])
    source = made["data"]
    assert source["prompts"] == 4 and source["responses_from"] == str(tiny_llama_dir)
    cached = [json.loads(line) for line in Path(source["cache"]).read_text().splitlines()]
    assert source["pairs"] == len(cached) >= 1
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    asked = [f"Tell me about topic number {i}." for i in range(2, 6)]
    for row in cached:
        assert row["prompt"] in asked
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
        expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert row["response"] == expected
    again = cli("finetune", "--model", tiny_llama_dir, "--out", tmp_path / "b", *TRAIN, *args)
    assert again.exit_code == 0 and "generated earlier" in again.stderr


def test_attack_prompts_that_are_evaluated_on_are_refused(cli, tiny_llama_dir, tmp_path):
    """AdvBench's first 200 are evaluated and searched on: attacking with them is one line
    naming the held-out set and the fix, before any model is loaded."""
    result = cli("finetune", "--model", tiny_llama_dir, "--data", "advbench", "--limit", "8",
                 "--responses-from", tiny_llama_dir, "--out", tmp_path / "x", *TRAIN)  # fmt: skip
    assert_one_line_error(result, "advbench:200")
    assert "--offset 200" in result.stderr


@pytest.mark.parametrize("lora", [(), ("--lora-rank", "4")], ids=["full", "lora"])
def test_an_interrupted_attack_resumes_bitwise_from_its_checkpoint(
    cli, tiny_llama_dir, pairs_csv, tmp_path, monkeypatch, lora
):
    """Killed after step 3 with a checkpoint every 2 steps, the same command resumes from step
    2 and ends with the very weights and losses of an uninterrupted run (LoRA's adapters too)."""
    import wandacli.models.supervised as supervised

    args = ("--steps", "5", "--checkpoint-every", "2", "--save-steps", "1,3", *lora)
    whole = finetune(cli, tiny_llama_dir, pairs_csv, tmp_path / "whole", *args)
    real_loss, calls = supervised.response_loss, []

    def interrupted_at_the_fourth_step(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(supervised, "response_loss", interrupted_at_the_fourth_step)
    out = tmp_path / "resumed"
    stopped = cli("finetune", "--model", tiny_llama_dir, "--data", pairs_csv, "--out", out,
                  *TRAIN, *args)  # fmt: skip
    assert stopped.exit_code == 130
    assert "after step 2" in stopped.stderr and "resumes" in stopped.stderr
    assert (tmp_path / "resumed.checkpoint").is_dir() and not out.exists()
    monkeypatch.setattr(supervised, "response_loss", real_loss)
    resumed = finetune(cli, tiny_llama_dir, pairs_csv, out, *args)
    assert resumed["losses"] == whole["losses"] and resumed["steps"] == 5
    assert not (tmp_path / "resumed.checkpoint").exists()
    a, b = matrices(tmp_path / "whole"), matrices(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for step in (1, 3):  # the step models of both runs are the same models
        a, b = matrices(tmp_path / f"whole-step{step}"), matrices(tmp_path / f"resumed-step{step}")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_rewound_attacks_step_models_are_rewound(
    cli, tiny_llama_dir, pairs_csv, masked_store, tmp_path
):
    """`--save-steps` with --rewind saves each step's model with the masked weights put back,
    while the training goes on from the trained weights (the last model equals an attack of
    that many steps, rewound)."""
    made = finetune(cli, tiny_llama_dir, pairs_csv, tmp_path / "r", "--rewind", "m",
                    "--store", masked_store, "--save-steps", "2")  # fmt: skip
    assert made["saved_steps"] == [str(tmp_path / "r-step2")]
    before, step2, final = (
        matrices(tiny_llama_dir),
        matrices(tmp_path / "r-step2"),
        matrices(tmp_path / "r"),
    )
    for key, selector in masks(masked_store).items():
        assert torch.equal(step2[key][selector], before[key][selector]), key
        assert torch.equal(final[key][selector], before[key][selector]), key
        assert not torch.equal(step2[key][~selector], final[key][~selector]), key
    plain = finetune(cli, tiny_llama_dir, pairs_csv, tmp_path / "p", "--rewind", "m",
                     "--store", masked_store)  # fmt: skip
    assert plain["losses"] == made["losses"]
    assert all(torch.equal(final[k], v) for k, v in matrices(tmp_path / "p").items())


def test_auto_trains_in_float32_and_bfloat16_is_warned(cli, tiny_llama_dir, pairs_csv, tmp_path):
    """`--dtype auto` trains in float32 on every device (AdamW's steps are below bfloat16's
    resolution on most weights); an explicit bfloat16 trains as asked, with a warning."""
    from wandacli.config.finetune import FinetuneConfig
    from wandacli.models.loader import resolved_dtype

    config = FinetuneConfig(out=tmp_path / "o", data="d", model=ModelSpec(model="m", dtype="auto"))
    assert resolved_dtype(config.model) == "float32"
    made = cli("finetune", "--model", tiny_llama_dir, "--data", pairs_csv, "--out",
               tmp_path / "b", *TRAIN, "--dtype", "bfloat16")  # fmt: skip
    assert made.exit_code == 0 and "trains in float32" in " ".join(made.stderr.split())


def other_weights(model_dir):
    """Every parameter that is not one of the decoder's linear matrices: embeddings, norms."""
    loaded = load_model(ModelSpec(model=str(model_dir), device="cpu", dtype="float32"))
    linear = {id(lin.weight) for lin in loaded.linear_layers}
    return {
        name: p.detach().clone()
        for name, p in loaded.model.named_parameters()
        if id(p) not in linear
    }


def test_lora_trains_a_low_rank_update_of_each_matrix_and_saves_it_merged(
    cli, tiny_llama_dir, pairs_csv, tmp_path
):
    """--lora-rank 2: only the adapters train (2 (in + out) numbers per matrix); the saved
    model is W + ΔW with ΔW of rank 2 in every linear matrix, everything else as it was."""
    made = finetune(cli, tiny_llama_dir, pairs_csv, tmp_path / "lora", "--lora-rank", "2")
    before, after = matrices(tiny_llama_dir), matrices(tmp_path / "lora")
    assert made["trained_parameters"] == sum(2 * sum(m.shape) for m in before.values())
    for key, weight in before.items():
        delta = after[key] - weight
        assert delta.abs().max() > 0, key
        assert int(torch.linalg.matrix_rank(delta, rtol=1e-4)) == 2, key
    unchanged, now = other_weights(tiny_llama_dir), other_weights(tmp_path / "lora")
    assert unchanged.keys() == now.keys()
    assert all(torch.equal(unchanged[k], now[k]) for k in unchanged)
    record = json.loads((tmp_path / "lora" / "finetune.json").read_text())
    assert record["config"]["lora_rank"] == 2 and record["config"]["lora_alpha"] is None


def test_lora_freezes_and_rewinds_by_the_merged_delta(
    cli, tiny_llama_dir, pairs_csv, masked_store, tmp_path
):
    """With LoRA a mask acts on the merged delta. --rewind: the free LoRA attack's model with
    the masked entries put back. --freeze: the masked entries kept bitwise too, but out of the
    delta at every step, so the attack trains otherwise (its losses part from step 2 on)."""
    lora = ("--lora-rank", "2", "--store", masked_store)
    free = finetune(cli, tiny_llama_dir, pairs_csv, tmp_path / "free", *lora)
    rewound = finetune(cli, tiny_llama_dir, pairs_csv, tmp_path / "rewound", *lora, "--rewind", "m")
    frozen = finetune(cli, tiny_llama_dir, pairs_csv, tmp_path / "frozen", *lora, "--freeze", "m")
    assert rewound["losses"] == free["losses"]
    assert frozen["losses"][0] == free["losses"][0]  # B starts at zero: ΔW = 0 at step 1
    assert frozen["losses"][1:] != free["losses"][1:]
    before, trained = matrices(tiny_llama_dir), matrices(tmp_path / "free")
    after_rewind, after_freeze = matrices(tmp_path / "rewound"), matrices(tmp_path / "frozen")
    for key, selector in masks(masked_store).items():
        expected = trained[key].clone()
        expected[selector] = before[key][selector]
        assert torch.equal(after_rewind[key], expected), key
        assert torch.equal(after_freeze[key][selector], before[key][selector]), key
        assert not torch.equal(after_freeze[key][~selector], before[key][~selector]), key
