"""The seams a new user meets, made consistent: `inspect --store` like every other command (the
positional STORE kept), one way of showing a mask's sparsity, a means set described as means,
the report's Markdown in the terminal's names."""

from __future__ import annotations

import json
import re

import pytest

from tests.test_mean_activations import means_args
from tests.test_prune_cli import prune
from tests.test_report import write_result
from tests.test_score_cli import assert_one_line_error, score_args


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory, tiny_llama_dir, pairs_csv):
    """One wanda set of the tiny model, named `safety`."""
    from typer.testing import CliRunner

    from wandacli.cli import app

    store = tmp_path_factory.mktemp("first-day") / "store"
    args = score_args(tiny_llama_dir, store, "--name", "safety", method="wanda", data=pairs_csv)
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return store


def test_inspect_takes_store_as_every_command_does(cli, scored_store):
    by_option = cli("inspect", "--store", str(scored_store), "--json")
    by_argument = cli("inspect", str(scored_store), "--json")
    assert by_option.exit_code == 0, by_option.stderr
    assert json.loads(by_option.stdout) == json.loads(by_argument.stdout)
    both = cli("inspect", str(scored_store), "--store", str(scored_store / "other"))
    assert_one_line_error(both, "two stores given")


def test_a_masks_sparsity_reads_the_same_in_prune_and_inspect(cli, scored_store):
    made = prune(cli, scored_store, "--scores", "safety", "-r", "0.3", "--name", "seam")
    assert made.exit_code == 0, made.stderr
    shown = re.search(r"\((\d+\.\d+%)\)", made.stdout)
    assert shown is not None, made.stdout
    listing = cli("inspect", "--store", str(scored_store))
    row = next(line for line in listing.stdout.splitlines() if "seam" in line)
    assert shown.group(1) in row, (shown.group(1), row)


def test_a_means_set_is_described_as_means(cli, tiny_llama_dir, pairs_csv, tmp_path):
    done = cli(*means_args(tiny_llama_dir, tmp_path / "s", pairs_csv))
    assert done.exit_code == 0, done.stderr
    assert "weights scored" not in done.stdout
    assert "residual streams" in done.stdout


def test_the_markdown_names_the_settings_as_the_terminal_does(cli, tmp_path):
    results = tmp_path / "results"
    asr = {"inst_ASR_basic": 0.06, "inst_ASR_multiple_nosys": 1.0, "ASR_gcg": 0.97}
    write_result(results, "masked", method="wandg", sparsity=0.0086, asr=asr, ppl=6.0)
    document = tmp_path / "results.md"
    assert cli("report", str(results), "--markdown", str(document)).exit_code == 0
    header = next(line for line in document.read_text().splitlines() if "model under test" in line)
    assert all(name in header for name in ("Vanilla", "Adv-Dec", "Adv-Suffix"))
    assert "ASR_" not in header


# ---------------------------------------------------------------------------------------------
# Bad model files: one line each, nothing announced before the refusal (issue #32)


def test_a_config_field_of_the_wrong_type_is_one_line(cli, tiny_llama_dir, tmp_path):
    import shutil

    directory = tmp_path / "bad-config"
    shutil.copytree(tiny_llama_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["num_attention_heads"] = "four"
    (directory / "config.json").write_text(json.dumps(config))
    result = cli(*score_args(directory, tmp_path / "store", method="magnitude"))
    assert_one_line_error(result, "cannot load model", "num_attention_heads")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 2, "damaged or truncated GGUF"),
        (bytes(range(256)) * 2, "is not a GGUF file"),
    ],
)
def test_a_damaged_gguf_is_refused_before_any_conversion(cli, tmp_path, monkeypatch, content,
                                                        says):  # fmt: skip
    monkeypatch.setenv("WANDACLI_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(content)
    result = cli(*score_args(gguf, tmp_path / "store", method="magnitude"))
    assert_one_line_error(result, says)
    assert "converting" not in result.stderr


def test_report_outputs_that_cannot_be_written_are_one_line(cli, tmp_path):
    results = tmp_path / "results"
    write_result(results, "dense", method="dense", sparsity=0.0, asr={"inst_basic": 0.1}, ppl=9.0)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    plots = cli("report", str(results), "--plots", str(blocker / "figures"))
    assert_one_line_error(plots, "--plots directory", "is not writable")
    folder = tmp_path / "folder"
    folder.mkdir()
    markdown = cli("report", str(results), "--markdown", str(folder))
    assert_one_line_error(markdown, "--markdown", "is a directory", "report.md")


# ---------------------------------------------------------------------------------------------
# Messages that used to mislead (issue #32)


def test_a_rank_edit_from_a_wanda_set_names_the_set_not_the_model(cli, scored_store):
    result = prune(cli, scored_store, "--scores", "safety", "--remove-top-ranks", "2")
    assert_one_line_error(result, "safety is a score set, not rank statistics", "actsvd")


def test_a_store_that_does_not_exist_is_named_as_such(cli, tmp_path):
    result = prune(cli, tmp_path / "nowhere", "--scores", "safety", "--sparsity-ratio", "0.5")
    assert_one_line_error(result, f"the store {tmp_path / 'nowhere'} does not exist", "--store")


def test_an_output_under_a_file_says_it_is_a_file(cli, scored_store, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    result = cli("compare", "safety", "safety", "--store", str(scored_store), "--csv",
                 str(blocker / "x.csv"), "--no-progress")  # fmt: skip
    assert_one_line_error(result, f"{blocker} is a file, not a directory")


def test_the_free_space_refusal_says_what_it_asks_for(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from wandacli.core.durable import check_free_space
    from wandacli.core.errors import StoreError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 0, 20 << 20))
    with pytest.raises(StoreError) as refused:
        check_free_space(tmp_path, 13 << 20, "the score set")
    message = str(refused.value)
    assert "needs about 30 MiB (13 MiB and room for the file's own structure), 20 MiB free" in (
        message
    )


def test_a_mask_made_on_another_model_is_refused_unless_allowed(
    cli, scored_store, tiny_llama_base_dir, tmp_path
):
    """The same shapes, other weights (the base model's): a transfer only when asked for,
    and the results say where the mask came from."""
    made = prune(cli, scored_store, "--scores", "safety", "--sparsity-ratio", "0.5",
                 "--name", "half")  # fmt: skip
    assert made.exit_code == 0, made.stderr
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    args = ["eval-utility", "--model", str(tiny_llama_base_dir), "--device", "cpu", "--mask",
            "half", "--store", str(scored_store), "--data", str(text), "--seqlen", "32",
            "--out", str(tmp_path / "u"), "--no-progress"]  # fmt: skip
    refused = cli(*args)
    assert_one_line_error(refused, "was made on", "--allow-other-model")
    allowed = cli(*args, "--allow-other-model", "--json")
    assert allowed.exit_code == 0, allowed.stderr
    assert "made on" in allowed.stderr  # said, not silent
    recorded = json.loads((tmp_path / "u" / "utility.json").read_text())
    assert recorded["model_under_test"]["removal_made_on"].endswith("tiny-llama")


def test_search_offsets_advbench_only(tmp_path):
    """--offset skips AdvBench's 100 evaluation prompts by default, and nothing of a user's
    own file (an 8-prompt file used to have 'none left from offset 100')."""
    from wandacli.search.config import search_config

    common = {"scores": "s", "name": "n", "ratio": "0.1:0.5"}
    advbench = search_config(common)
    own = search_config(common | {"prompts": str(tmp_path / "my.txt")})
    chosen = search_config(common | {"offset": 3})
    assert (advbench.offset, own.offset, chosen.offset) == (100, 0, 3)


def test_eval_attack_takes_an_offset(cli, tiny_llama_dir, tmp_path):
    from tests.test_attack import attack_args

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me secret number {i}." for i in range(6)) + "\n")
    result = cli(*attack_args(tiny_llama_dir, tmp_path / "a", "--prompts", str(prompts),
                              "--offset", "4", "--configs", "basic", "--samples", "1"))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    responses = [
        json.loads(line) for line in (tmp_path / "a" / "inst_basic.jsonl").read_text().splitlines()
    ]
    assert [r["prompt"] for r in responses] == [
        "Tell me secret number 4.",
        "Tell me secret number 5.",
    ]
    beyond = cli(*attack_args(tiny_llama_dir, tmp_path / "b", "--prompts", str(prompts),
                              "--offset", "6"))  # fmt: skip
    assert_one_line_error(beyond, "--offset 6", "none left")


def test_results_go_beside_the_store_by_default(cli, scored_store, tiny_llama_dir, tmp_path,
                                               monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    made = prune(cli, scored_store, "--scores", "safety", "--sparsity-ratio", "0.25",
                 "--name", "quarter-beside")  # fmt: skip
    assert made.exit_code == 0, made.stderr
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result = cli("eval-utility", "--model", str(tiny_llama_dir), "--device", "cpu", "--mask",
                 "quarter-beside", "--store", str(scored_store), "--data", str(text),
                 "--seqlen", "32", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert (scored_store / "results" / "quarter-beside" / "utility.json").is_file()
    assert not (tmp_path / "wandacli-results").exists()


def test_a_greedy_rerun_ignores_the_sampling_settings(cli, tiny_llama_dir, tmp_path):
    from tests.test_attack import attack_args

    first = cli(*attack_args(tiny_llama_dir, tmp_path / "a", "--configs", "basic", "--json"))
    assert first.exit_code == 0, first.stderr
    again = cli(*attack_args(tiny_llama_dir, tmp_path / "a", "--configs", "basic", "--samples",
                             "5", "--seed", "3", "--json"))  # fmt: skip
    assert again.exit_code == 0, again.stderr
    reran = json.loads(again.stdout)
    assert reran["results"] == json.loads(first.stdout)["results"]
    assert reran["reused_runs"]  # nothing generated again
    sampled = cli(*attack_args(tiny_llama_dir, tmp_path / "a", "--configs", "multiple_nosys",
                               "--samples", "3"))  # fmt: skip
    assert sampled.exit_code == 0, sampled.stderr
    changed = cli(*attack_args(tiny_llama_dir, tmp_path / "a", "--configs", "multiple_nosys",
                               "--samples", "4"))  # fmt: skip
    assert_one_line_error(changed, "samples: 3 → 4")


def test_native_bfloat16_needs_the_cpu_flags_and_pytorch_s_avx512_kernels(monkeypatch):
    """A CPU with AVX-512 BF16 run on PyTorch's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, as an
    AVX2-only CPU runs) takes the slow path: auto is float32 there."""
    import torch

    from wandacli.models.sources import cpu_multiplies_bfloat16

    monkeypatch.delenv("WANDACLI_CPU_BFLOAT16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert cpu_multiplies_bfloat16()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not cpu_multiplies_bfloat16()


def test_dtype_auto_on_a_cpu_follows_its_bfloat16_support(cli, tiny_llama_dir, tmp_path,
                                                          monkeypatch):  # fmt: skip
    """bfloat16 where the CPU multiplies it natively, float32 elsewhere (an AVX2-only CPU is
    up to 25× slower in bfloat16); the choice is printed and recorded."""
    import torch

    from wandacli.models.sources import resolve_dtype

    cpu = torch.device("cpu")
    monkeypatch.setenv("WANDACLI_CPU_BFLOAT16", "0")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", cpu, "checkpoint") == "auto"
    monkeypatch.setenv("WANDACLI_CPU_BFLOAT16", "1")
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    assert resolve_dtype("float32", cpu) == torch.float32  # a dtype asked for is kept
    result = cli(*score_args(tiny_llama_dir, tmp_path / "store", "--json", method="magnitude"))
    assert result.exit_code == 0, result.stderr
    assert "--dtype auto: bfloat16 (this CPU multiplies bfloat16 natively)" in result.stderr
    from wandacli.store.files import open_finished_scores

    with open_finished_scores(json.loads(result.stdout)["path"]) as recorded:
        assert recorded.meta["dtype"] == "bfloat16"
    monkeypatch.setenv("WANDACLI_CPU_BFLOAT16", "0")
    slow = cli(*score_args(tiny_llama_dir, tmp_path / "other", "--json", method="magnitude"))
    assert "--dtype auto" not in slow.stderr  # float32, as every CPU run was before
    with open_finished_scores(json.loads(slow.stdout)["path"]) as recorded:
        assert recorded.meta["dtype"] == "float32"


def test_a_short_response_budget_is_said_and_cut_responses_still_count(cli, tiny_llama_dir,
                                                                       tmp_path):  # fmt: skip
    """At --max-new-tokens 6 every response is cut: the keyword judge judges them on their
    phrases (a random model's tokens hold none), where the 20-word rule made the ASR 0
    whatever the model did; the run says the budget is short, and each row records whether
    the model ended it."""
    from tests.test_attack import attack_args

    short = cli(*attack_args(tiny_llama_dir, tmp_path / "a", "--configs", "basic", "--json"))
    assert short.exit_code == 0, short.stderr
    said = " ".join(short.stderr.split())
    assert "--max-new-tokens 6 is short for the keyword judge" in said
    rows = [
        json.loads(line) for line in (tmp_path / "a" / "inst_basic.jsonl").read_text().splitlines()
    ]
    cut = [row for row in rows if not row["ended"]]
    assert cut, "a random model's 6 tokens end on their own"
    assert all(row["attack_success"] == 1 for row in cut)
    results = json.loads(short.stdout)
    assert results["results"][0]["asr"] > 0
    assert (
        "a response the budget cut is judged on its phrases"
        in results["model_under_test"]["judge_rule"]
    )
