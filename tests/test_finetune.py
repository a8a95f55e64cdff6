"""`wandacli finetune` (issue #31): the fine-tuning attack on a tiny model. --freeze keeps a
mask's weights bitwise while the others move; --rewind equals the reference's procedure
(train, then put the masked weights back from the model before training); --transplant copies
a mask's weights from another model; what cannot run is one line."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_score_cli import assert_one_line_error
from wandacli.config.settings import ModelSpec
from wandacli.models.loader import load_model
from wandacli.store.files import MaskFile

TRAIN = ("--steps", "3", "--batch-size", "4", "--lr", "0.01", "--device", "cpu", "--no-progress")


@pytest.fixture(scope="module")
def masked_store(tmp_path_factory, tiny_llama_dir):
    """A store with a mask of the tiny model: 30% of each row by magnitude."""
    from typer.testing import CliRunner

    from wandacli.cli import app

    store = tmp_path_factory.mktemp("finetune") / "store"
    runner = CliRunner()
    for args in (
        ["score", "--method", "magnitude", "--model", tiny_llama_dir, "--store", store,
         "--device", "cpu", "--no-progress"],
        ["prune", "--store", store, "--scores", "magnitude", "--sparsity-ratio", "0.3",
         "--name", "m", "--no-progress"],
    ):  # fmt: skip
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
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


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--freeze", "m", "--rewind", "m"), "--freeze and --rewind are two attacks"),
        (("--transplant", "m"), "--transplant needs --from ALIGNED"),
        (("--from", "x"), "--from is --transplant's source"),
        (("--freeze", "nope"), "nope"),
        (("--data", "advbench"), "has no (prompt, response) pairs"),
        (("--max-tokens", "8"), "raise --max-tokens"),
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
