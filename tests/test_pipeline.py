"""The shipped configs and the Makefile pipeline: every config validates, and the demo's
pipeline runs end to end (with a tiny model in place of SmolLM2) and skips finished steps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_score_cli import assert_one_line_error
from wandacli.config.files import read_config_file
from wandacli.pipeline import Plan, makefile

CONFIGS = sorted((REPO / "configs").glob("*.toml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_is_valid(cli, config):
    result = cli("check-config", str(config))
    assert result.exit_code == 0, result.stderr
    assert "are valid" in result.stderr
    plan = Plan.from_config(read_config_file(config), config)
    assert plan.methods and (plan.pq or plan.searches)


def test_check_config_names_a_bad_value(cli, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[prune]\nsparsity-ratio = "half"\n')
    assert_one_line_error(cli("check-config", str(path)), "[prune] sparsity_ratio = 'half'")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("model = 5\n", 'model = 5: a text is expected here, in quotes (model = "...")'),
        ("[prune]\nsparsity-ratio = 2\n", "--sparsity-ratio must be in (0, 1) (got 2.0)"),
        ("[search]\ntrials = 0\n", "--trials"),
    ],
)
def test_check_config_applies_each_options_own_rule(cli, tmp_path, content, says):
    """Not only the type: a number where a name belongs, and a value the option's own rule
    refuses, as the command itself would."""
    path = tmp_path / "bad.toml"
    path.write_text(content)
    assert_one_line_error(cli("check-config", str(path)), says)


def test_check_config_refuses_a_bad_pipeline(cli, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[pipeline]\npq = [[0.1, 2.0]]\n")
    assert_one_line_error(cli("check-config", str(path)), "p and q must be in (0, 1]")


@pytest.mark.slow
def test_plan_targets_are_files(tmp_path):
    config = REPO / "configs" / "smollm2-demo.toml"
    text = makefile(
        Plan.from_config(read_config_file(config), config), config, tmp_path, "wandacli", None
    )
    for target in (
        "store/scores/wanda-safety.h5",
        "store/scores/actsvd-utility.h5",
        "store/scores/random.h5",
        "store/masks/wanda-sd.best.h5",
        "store/masks/random-as-wanda-sd.best.h5",
        "store/edits/actsvd-projection.best.h5",
        "store/edits/random-as-actsvd-projection.best.h5",
        "compare/wanda-safety-vs-utility.csv",
        "results/dense/results.json",
        "results/wanda-sd.best/utility.json",
        "results/actsvd-projection.best/results.json",
        "results/random-as-wanda-sd.best/results.json",
        "results.txt",
    ):
        assert f"{tmp_path / target}:" in text, target
    study = REPO / "configs" / "smollm2-study.toml"
    text = makefile(
        Plan.from_config(read_config_file(study), study), study, tmp_path, "wandacli", None
    )
    for target in ("results/baseline-smollm2/results.json", "store/edits/direction-rich.best.h5"):
        assert f"{tmp_path / target}:" in text, target


def rule_for(text: str, target: Path) -> str:
    return text[text.index(f"{target}:") :].split("\n\n")[0]


def test_searches_keep_their_best_point_and_its_random_control(tmp_path):
    config = tmp_path / "plan.toml"
    config.write_text(
        '[pipeline]\nmethods = ["wanda"]\nrank_statistics = true\npq = []\ntop_ratio = 0\n'
        'random_control = true\nconfigs = "basic,multiple_nosys"\nother_configs = "multiple_nosys"\n'
        '[[pipeline.searches]]\nname = "sd"\nscores = "wanda-safety"\n'
        'utility_scores = "wanda-utility"\np = "0.02:0.2"\nq = "0.02:0.2"\ntrials = 5\n'
        'keep_best = "refusal:0.5"\n'
        '[[pipeline.searches]]\nname = "proj"\nscores = "actsvd-safety"\n'
        'utility_scores = "actsvd-utility"\nrank_neg = "2:8"\nrank_pos = "4:16"\n'
        'keep_best = "kl:0.5"\n'
    )
    text = makefile(Plan.from_config(read_config_file(config), config), config, tmp_path, "w", None)
    store = tmp_path / "store"
    search = rule_for(text, store / "masks" / "sd.best.h5")
    assert "wanda-safety.h5" in search.splitlines()[0] and "wanda-utility.h5" in search
    assert "w search " in search and "--name sd --scores wanda-safety" in search
    assert "--p 0.02:0.2 --q 0.02:0.2 --trials 5 --keep-best refusal:0.5" in search
    edit = rule_for(text, store / "edits" / "proj.best.h5")
    assert "--rank-neg 2:8 --rank-pos 4:16 --keep-best kl:0.5" in edit
    # the controls: a random mask of the same counts, a random edit of the same ranks
    mask_control = rule_for(text, store / "masks" / "random-as-sd.best.h5")
    assert "--scores random --match-counts sd.best" in mask_control
    edit_control = rule_for(text, store / "edits" / "random-as-proj.best.h5")
    assert "--scores actsvd-safety --match-ranks proj.best" in edit_control
    assert "proj.best.h5" in edit_control.splitlines()[0]
    # the dense model and the searched points in `configs`, the controls in `other_configs`
    for label, configs in (("dense", "basic,multiple_nosys"), ("sd.best", "basic,multiple_nosys"),
                           ("proj.best", "basic,multiple_nosys"),
                           ("random-as-proj.best", "multiple_nosys")):  # fmt: skip
        rule = rule_for(text, tmp_path / "results" / label / "results.json")
        assert f"--configs {configs} " in rule, rule
    assert "--searches " in rule_for(text, tmp_path / "results.txt")


def test_a_direction_search_in_the_pipeline(tmp_path):
    config = tmp_path / "plan.toml"
    config.write_text(
        "[pipeline]\nmethods = []\nmean_activations = true\npq = []\ntop_ratio = 0\n"
        'random_control = true\n[[pipeline.searches]]\nname = "dir"\n'
        'scores = "mean-activations-safety"\nutility_scores = "mean-activations-utility"\n'
        'direction_layer = "4:24"\ndirection_position = "-5:-1"\nkeep_best = "kl:0.1"\n'
    )
    text = makefile(Plan.from_config(read_config_file(config), config), config, tmp_path, "w", None)
    store = tmp_path / "store"
    means = rule_for(text, store / "scores" / "mean-activations-utility.h5")
    assert "--method mean-activations --data utility" in means
    search = rule_for(text, store / "edits" / "dir.best.h5")
    assert "--direction-layer 4:24 --direction-position -5:-1 --keep-best kl:0.1" in search
    control = rule_for(text, store / "edits" / "random-as-dir.best.h5")
    assert "--scores mean-activations-safety --match-ranks dir.best" in control


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ('name = "s"\nscores = "wanda-safety"\np = "0.1:0.2"', "needs 'keep_best'"),
        ('name = "s"\nscores = "wandg-safety"\nkeep_best = "kl:1"', "does not score"),
        ('name = "s"\nscores = "wanda-safety"\nkeep_best = "kl:1"\nlimit = 4', "unknown key 'limit'"),
    ],
)  # fmt: skip
def test_a_bad_search_entry_is_one_line(cli, tmp_path, entry, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(f'[pipeline]\nmethods = ["wanda"]\npq = []\n[[pipeline.searches]]\n{entry}\n')
    assert_one_line_error(cli("check-config", str(path)), fragment)


def test_random_controls_copy_each_masks_counts(tmp_path):
    config = tmp_path / "plan.toml"
    config.write_text(
        '[pipeline]\nmethods = ["wandg"]\npq = [[0.1, 0.05]]\nrandom_control = true\n'
    )
    text = makefile(Plan.from_config(read_config_file(config), config), config, tmp_path, "w", None)
    control = tmp_path / "store" / "masks" / "random-as-wandg-setdiff-q0.05-p0.1.h5"
    rule = text[text.index(f"{control}:") :].split("\n\n")[0]
    assert "wandg-setdiff-q0.05-p0.1.h5" in rule.splitlines()[0]  # made after its mask
    assert "--scores random --match-counts wandg-setdiff-q0.05-p0.1" in rule
    without = tmp_path / "plain.toml"
    without.write_text('[pipeline]\nmethods = ["wandg"]\npq = [[0.1, 0.05]]\n')
    plain = makefile(
        Plan.from_config(read_config_file(without), without), without, tmp_path, "w", None
    )
    assert "--method random" not in plain and "--match-counts" not in plain


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_demo_pipeline_runs_end_to_end_with_a_tiny_model(
    tiny_llama_dir, tiny_llama_base_dir, tmp_path
):
    out = tmp_path / "demo"
    bin_dir = str(Path(sys.executable).parent)
    # The demo's config with another tiny model as the baseline (the real one is SmolLM2), and
    # searches sized for it: two trials each, ranks within its widths, a few short prompts.
    demo_config = (REPO / "configs" / "smollm2-demo.toml").read_text()
    replaced = {
        "baseline_models = []": f'baseline_models = ["{tiny_llama_base_dir}"]',
        "trials = 8\nstartup_trials = 5": "trials = 2\nstartup_trials = 1",
        'rank_neg = "2:60"': 'rank_neg = "1:4"',
        'rank_pos = "10:180"': 'rank_pos = "1:8"',
        'direction_layer = "8:23"': 'direction_layer = "1:2"',
        "trials = 12                 ": "trials = 2                  ",
        "startup_trials = 6          ": "startup_trials = 1          ",
        "limit = 40": "limit = 10",
        "limit = 24 ": "limit = 4\nkl-limit = 4\nmax-new-tokens = 4 ",
    }
    for old, new in replaced.items():
        assert old in demo_config, old
        demo_config = demo_config.replace(old, new)
    # The study's fine-tuning attack, sized for the tiny model: its pairs answered by the other
    # tiny model, a step saved on the way.
    prompts = tmp_path / "attack-prompts.txt"
    prompts.write_text("".join(f"Write about subject {i}.\n" for i in range(6)))
    demo_config += (
        '\n[pipeline.attack]\nmask = "wanda-sd.best"\nconfigs = "multiple_nosys"\n'
        f'[finetune]\ndata = "{prompts}"\nresponses-from = "{tiny_llama_base_dir}"\n'
        'response-tokens = 16\nsteps = 3\nbatch-size = 1\nsave-steps = "2"\n'
    )
    config = tmp_path / "demo.toml"
    config.write_text(demo_config, encoding="utf-8")
    command = [
        "make",
        "-C",
        str(REPO),
        "--no-print-directory",
        "pipeline",
        f"PIPELINE_CONFIG={config}",
        f"OUT={out}",
        f"MODEL={tiny_llama_dir}",
        # The interpreter running the tests, already installed: no install step inside the test.
        f"BIN={bin_dir}",
        "NEEDS_INSTALL=",
    ]
    env = {**os.environ, "WANDACLI_QUIET": "1", "WANDACLI_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (out / "results.txt").read_text()
    for label in (
        "dense",
        "wanda-sd.best",
        "random-as-wanda-sd.best",
        "actsvd-projection.best",
        "random-as-actsvd-projection.best",
        "direction.best",
        "random-as-direction.best",
        "baseline-",
        "finetune-full",
        "finetune-full-step2",
        "finetune-freeze",
        "finetune-rewind",
        "finetune-random-freeze",
        "finetune-transplant",
    ):
        assert label in table, label
    document = (out / "results.md").read_text()
    assert document.startswith("# Results") and "| model under test |" in document
    assert "## Search wanda-sd" in document and "## Search actsvd-projection" in document
    # The study's figures, embedded in the document by paths relative to it.
    for stem in (
        "asr-vs-perplexity",
        "sparsity-sweep",
        "jaccard-wanda-safety-vs-wanda-utility",
        "search-wanda-sd",
        "search-actsvd-projection",
        "asr-against-steps",
    ):
        for fmt in ("png", "svg"):
            assert (out / "figures" / f"{stem}.{fmt}").is_file(), stem
        assert f"](figures/{stem}.png)" in document
    assert (out / "compare" / "wanda-safety-vs-utility.csv").is_file()
    # The levels side by side: the candidate directions' cosines, the kept one in the subspaces.
    assert (out / "figures" / "direction-cosines.png").is_file()
    assert "o_proj" in (out / "compare" / "direction-in-safety-subspaces.csv").read_text()
    # Everything is up to date now: a dry run would only print the table again.
    again = subprocess.run([*command, "-n"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "wandacli" not in again.stdout, again.stdout


def test_report_shows_only_the_configurations_that_ran(cli, tmp_path):
    import json

    for label, asr, ppl in (("dense", 0.0, 30.0), ("masked", 0.75, 31.5)):
        folder = tmp_path / "results" / label
        folder.mkdir(parents=True)
        under_test = {"method": "dense" if label == "dense" else "set-difference"}
        (folder / "results.json").write_text(
            json.dumps(
                {
                    "model_under_test": {**under_test, "actual_sparsity": 0.01},
                    "results": [{"metric": "inst_ASR_basic_nosys", "asr": asr}],
                }
            )
        )
        (folder / "utility.json").write_text(
            json.dumps({"model_under_test": under_test, "perplexity": ppl})
        )
    result = cli("report", str(tmp_path / "results"))
    assert result.exit_code == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "model under test" in line)
    assert "no sys" in header and "basic" not in header.replace("no sys", "")
    assert "gcg" not in header and "multi" not in header
    masked = next(line for line in result.stdout.splitlines() if "masked" in line)
    assert "0.75" in masked and "31.50" in masked
    # A row measured in a setting the others were not: a dash where a row has no figure.
    folder = tmp_path / "results" / "sampled"
    folder.mkdir()
    (folder / "results.json").write_text(
        json.dumps(
            {
                "model_under_test": {"method": "random", "actual_sparsity": 0.01},
                "results": [{"metric": "inst_ASR_multiple_nosys", "asr": 0.5, "sample_mean": 0.2}],
            }
        )
    )
    mixed = cli("report", str(tmp_path / "results"))
    assert mixed.exit_code == 0, mixed.stderr
    rows = {line.split()[1]: line for line in mixed.stdout.splitlines() if line.startswith("│")}
    assert "0.50/0.20" in rows["sampled"] and "0.75" in rows["masked"]
    assert rows["masked"].count(" - ") >= 1 and rows["sampled"].count(" - ") >= 1


@pytest.mark.slow
def test_baseline_models_are_evaluated_dense_beside_the_study(tmp_path):
    config = tmp_path / "plan.toml"
    config.write_text('[pipeline]\nmethods = ["wandg"]\nbaseline_models = ["smollm2", "org/m"]\n')
    text = makefile(Plan.from_config(read_config_file(config), config), config, tmp_path, "w", None)
    for label, model in (("baseline-smollm2", "smollm2"), ("baseline-org_m", "org/m")):
        for name in ("results.json", "utility.json"):
            target = tmp_path / "results" / label / name
            rule = text[text.index(f"{target}:") :].split("\n\n")[0]
            assert f"--model {model} " in rule and "--mask" not in rule, rule
        assert f"{tmp_path / 'results' / label / 'results.json'}" in text.split("results.txt:")[1]


def test_the_pipeline_is_a_command_with_one_line_errors(cli, tmp_path):
    """`wandacli pipeline CONFIG --out DIR` prints the rules `make demo` includes; a config
    without a [pipeline] table, or no --out, is one line through the app's errors."""
    config = REPO / "configs" / "smollm2-demo.toml"
    made = cli("pipeline", str(config), "--out", str(tmp_path / "demo"), "--wandacli", "w")
    assert made.exit_code == 0, made.stderr
    assert made.stdout == makefile(
        Plan.from_config(read_config_file(config), config), config, tmp_path / "demo", "w", None
    )
    plain = tmp_path / "plain.toml"
    plain.write_text("[score]\nnsamples = 4\n")
    assert_one_line_error(
        cli("pipeline", str(plain), "--out", str(tmp_path)), "no [pipeline] table"
    )
    assert_one_line_error(cli("pipeline", str(config)), "--out is required")


ATTACK_PLAN = (
    '[pipeline]\nmethods = ["wanda"]\npq = []\ntop_ratio = 0\nrandom_control = true\n'
    'configs = "basic,multiple_nosys,gcg"\n'
    '[[pipeline.searches]]\nname = "sd"\nscores = "wanda-safety"\n'
    'utility_scores = "wanda-utility"\np = "0.02:0.2"\nq = "0.02:0.2"\nkeep_best = "refusal:0.5"\n'
    '[pipeline.attack]\nmask = "sd.best"\nconfigs = "basic,multiple_nosys"\n'
    '[finetune]\nsteps = 20\nsave-steps = "5,10"\n'
)


def test_the_attack_five_ways_and_its_steps(tmp_path):
    """[pipeline.attack]: full, frozen, rewound, the random control frozen, and the transplant
    into the fully attacked model from the study's model; the models after each saved step
    evaluated too, in the attack's settings."""
    config = tmp_path / "plan.toml"
    config.write_text('model = "org/aligned"\n' + ATTACK_PLAN)
    plan = Plan.from_config(read_config_file(config), config)
    assert plan.attack is not None and plan.attack.save_steps == (5, 10)
    text = makefile(plan, config, tmp_path, "w", None)
    tuned, store = tmp_path / "finetune", tmp_path / "store"
    full = rule_for(text, tuned / "full" / "finetune.json")
    assert "w finetune " in full and "--freeze" not in full and "--rewind" not in full
    for row, flags, mask in (("freeze", "--freeze sd.best", "sd.best"),
                             ("rewind", "--rewind sd.best", "sd.best"),
                             ("random-freeze", "--freeze random-as-sd.best", "random-as-sd.best")):  # fmt: skip
        rule = rule_for(text, tuned / row / "finetune.json")
        assert f"{flags} --store {store}" in rule and f"{mask}.h5" in rule.splitlines()[0]
    transplant = rule_for(text, tuned / "transplant" / "finetune.json")
    assert f"--model {tuned / 'full'} --from org/aligned --transplant sd.best" in transplant
    assert str(tuned / "full" / "finetune.json") in transplant.splitlines()[0]
    for label in ("finetune-full", "finetune-full-step5", "finetune-rewind-step10",
                  "finetune-transplant"):  # fmt: skip
        rule = rule_for(text, tmp_path / "results" / label / "results.json")
        assert "--configs basic,multiple_nosys " in rule, rule
    step = f"{tuned / 'freeze-step5' / 'finetune.json'}: | {tuned / 'freeze' / 'finetune.json'} ;"
    assert step in text  # after the attack by order only: written before its record
    assert "finetune-transplant-step5" not in text


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (('mask = "sd.best"', 'mask = "nothing"'), "not a mask the study makes"),
        (('mask = "sd.best"', 'mask = "sd.best"\nsteps = 4'), "unknown key 'steps'"),
    ],
)
def test_a_bad_attack_plan_is_one_line(cli, tmp_path, change, fragment):
    config = tmp_path / "plan.toml"
    config.write_text('model = "org/aligned"\n' + ATTACK_PLAN.replace(*change))
    result = cli("pipeline", str(config), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, fragment)
