"""`report --plots`: the study's figures, drawn with the real matplotlib, embedded in the
Markdown document, deterministic, and drawn from what the results say."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from tests.test_score_cli import assert_one_line_error
from wandacli.analysis.results import collect
from wandacli.reporting import figures, placement

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL = "org/aligned"


def write_result(
    results: Path,
    label: str,
    *,
    method: str,
    sparsity: float,
    asr: dict[str, float],
    ppl: float | None,
    model: str = MODEL,
    matches: str | None = None,
    p_q: tuple[float, float] | None = None,
) -> None:
    """One model under test, as eval-attack and eval-utility write it."""
    folder = results / label
    folder.mkdir(parents=True)
    under_test = {
        "model": model,
        "mask": None if method == "dense" else f"store/masks/{label}.h5",
        "method": method,
        "actual_sparsity": sparsity,
        "p_q": list(p_q) if p_q else None,
        "matches": matches,
    }
    attack = {
        "model_under_test": under_test,
        "results": [{"metric": m, "asr": value} for m, value in asr.items()],
    }
    (folder / "results.json").write_text(json.dumps(attack), encoding="utf-8")
    if ppl is not None:
        utility = {"model_under_test": under_test, "perplexity": ppl}
        (folder / "utility.json").write_text(json.dumps(utility), encoding="utf-8")


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """A small study: dense, a baseline, a set-difference sweep with its random controls, a
    top-ratio mask; two ASR configurations with and without tags."""
    results = tmp_path / "results"

    def asr(value: float) -> dict[str, float]:
        return {
            "inst_ASR_basic": value,
            "no_inst_ASR_basic": min(1.0, value + 0.1),
            "inst_ASR_gcg": min(1.0, value + 0.2),
        }

    write_result(results, "dense", method="dense", sparsity=0.0002, asr=asr(0.0), ppl=38.4)
    write_result(
        results,
        "baseline-base",
        method="dense",
        sparsity=0.0,
        asr=asr(0.9),
        ppl=38.8,
        model="org/base",
    )
    for q, sparsity, value, ppl in (
        (0.05, 0.005, 0.0, 42.0),
        (0.1, 0.023, 0.3, 67.0),
        (0.15, 0.06, 0.6, 199.0),
    ):
        name = f"wanda-setdiff-q{q}-p0.1"
        write_result(
            results,
            name,
            method="wanda_set_difference",
            sparsity=sparsity,
            asr=asr(value),
            ppl=ppl,
            p_q=(0.1, q),
        )
        write_result(
            results,
            f"random-as-{name}",
            method="random",
            sparsity=sparsity,
            asr=asr(0.0),
            ppl=ppl * 1.2,
            matches=name,
        )
    write_result(results, "top0.01-wandg", method="wandg", sparsity=0.009, asr=asr(0.0), ppl=1.5e7)
    compare = tmp_path / "compare"
    compare.mkdir()
    with (compare / "wanda-safety-vs-utility.csv").open(
        "w", newline="", encoding="utf-8"
    ) as handle:
        writer = csv.writer(handle)
        writer.writerow(["a", "b", "layer", "module", "jaccard"])
        for layer in range(3):
            for module in ("self_attn.q_proj", "mlp.down_proj"):
                writer.writerow(["wanda-safety", "wanda-utility", layer, module, 0.1 * (layer + 1)])
        writer.writerow(["wanda-safety", "wanda-utility", "all", "all", 0.2])
    (compare / "notes.csv").write_text("x,y\n1,2\n", encoding="utf-8")  # not compare's: skipped
    return tmp_path


def run_report(cli, study: Path, plots: str = "figures"):
    return cli(
        "report",
        study / "results",
        "--plots",
        study / plots,
        "--compare",
        study / "compare",
        "--markdown",
        study / "results.md",
    )


EXPECTED = ["asr-vs-perplexity", "sparsity-sweep", "jaccard-wanda-safety-vs-wanda-utility"]


@pytest.mark.slow
def test_report_writes_every_figure_as_png_and_svg(cli, study):
    result = run_report(cli, study)
    assert result.exit_code == 0, result.stderr
    written = sorted(p.name for p in (study / "figures").iterdir())
    assert written == sorted(f"{stem}.{fmt}" for stem in EXPECTED for fmt in ("png", "svg"))
    import matplotlib.image

    for stem in EXPECTED:
        png = study / "figures" / f"{stem}.png"
        assert png.read_bytes().startswith(PNG_MAGIC)
        height, width, _ = matplotlib.image.imread(png).shape
        assert width >= 600 and height >= 250  # drawn at a readable size
        root = ElementTree.parse(study / "figures" / f"{stem}.svg").getroot()
        assert root.tag.endswith("svg")
    for stem in EXPECTED:
        assert str(study / "figures" / f"{stem}.png") in " ".join(result.stderr.split())


@pytest.mark.slow
def test_markdown_embeds_the_figures_with_paths_that_resolve(cli, study):
    assert run_report(cli, study).exit_code == 0
    text = (study / "results.md").read_text(encoding="utf-8")
    assert text.startswith("# Results")
    assert "| wanda-setdiff-q0.1-p0.1 |" in text
    images = [line for line in text.splitlines() if line.startswith("![")]
    assert len(images) == len(EXPECTED)
    for line in images:
        link = line[line.index("(") + 1 : -1]
        assert not Path(link).is_absolute()
        assert (study / link).is_file(), link


@pytest.mark.slow
def test_a_rerun_rewrites_the_same_bytes(cli, study):
    assert run_report(cli, study, "first").exit_code == 0
    assert run_report(cli, study, "second").exit_code == 0
    for stem in EXPECTED:
        for fmt in ("png", "svg"):
            first = (study / "first" / f"{stem}.{fmt}").read_bytes()
            assert first == (study / "second" / f"{stem}.{fmt}").read_bytes(), f"{stem}.{fmt}"
    svg = (study / "first" / "asr-vs-perplexity.svg").read_text(encoding="utf-8")
    assert "<dc:date>" not in svg and "Matplotlib v" not in svg


@pytest.mark.slow
def test_the_user_matplotlibrc_does_not_change_the_figures(cli, study, monkeypatch):
    assert run_report(cli, study, "plain").exit_code == 0
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "axes.facecolor", "red")
    monkeypatch.setitem(matplotlib.rcParams, "font.size", 20)
    assert run_report(cli, study, "styled").exit_code == 0
    for stem in EXPECTED:
        plain = (study / "plain" / f"{stem}.png").read_bytes()
        assert plain == (study / "styled" / f"{stem}.png").read_bytes()


def test_sweep_lines_follow_the_results(study):
    rows = collect(study / "results")
    lines = figures.sweep_lines(rows)
    assert set(lines) == {
        ("wanda_set_difference", False),
        ("wanda_set_difference", True),
        ("wandg", False),
    }
    # Each control joins the line of the method whose mask it matches, in order of sparsity.
    controls = lines[("wanda_set_difference", True)]
    assert [r.label for r in controls] == [
        "random-as-wanda-setdiff-q0.05-p0.1",
        "random-as-wanda-setdiff-q0.1-p0.1",
        "random-as-wanda-setdiff-q0.15-p0.1",
    ]
    sweep = lines[("wanda_set_difference", False)]
    assert [r.p_q for r in sweep] == [(0.1, 0.05), (0.1, 0.1), (0.1, 0.15)]
    assert [r.asr["inst_ASR_basic"] for r in sweep] == [0.0, 0.3, 0.6]
    # Dense models (the study's own and other models') are levels and points, not sweep lines.
    assert all(r.method != "dense" for members in lines.values() for r in members)


def test_crowded_labels_do_not_overlap():
    """Twelve points within a few pixels: every label still gets its own place."""
    with figures._pyplot() as plt:
        figure, axes = plt.subplots(figsize=(8, 5))
        axes.set_xscale("log")
        axes.set_xlim(10, 1e6)
        axes.set_ylim(-0.1, 1.1)
        points = [(40.0 + i, 0.0, f"random-as-wanda-setdiff-q0.{i}-p0.1", {}) for i in range(12)]
        axes.scatter([p[0] for p in points], [p[1] for p in points])
        boxes = placement.place_labels(axes, points)
        plt.close(figure)
    assert len(boxes) == len(points)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not placement._overlaps(a, b), (a, b)


def test_compare_without_plots_is_refused(cli, study):
    result = cli("report", study / "results", "--compare", study / "compare")
    assert_one_line_error(result, "--plots")


def test_a_missing_compare_folder_is_one_line(cli, study):
    result = cli(
        "report", study / "results", "--plots", study / "figures", "--compare", study / "nowhere"
    )
    assert_one_line_error(result, "does not exist", "compare --csv")
    assert not (study / "figures").exists()  # refused before drawing anything


def test_results_without_perplexity_draw_what_they_can(cli, tmp_path):
    results = tmp_path / "results"
    write_result(
        results, "dense", method="dense", sparsity=0.0, asr={"inst_ASR_basic": 0.0}, ppl=None
    )
    result = cli("report", results, "--plots", tmp_path / "figures")
    assert result.exit_code == 0, result.stderr
    # No perplexity and no mask: neither the scatter nor the sweep has anything to show.
    assert not (tmp_path / "figures").exists() or not any((tmp_path / "figures").iterdir())


def test_the_papers_three_settings_side_by_side_with_the_sample_mean(cli, tmp_path):
    results = tmp_path / "results"
    asr = {"inst_ASR_basic": 0.06, "inst_ASR_multiple_nosys": 1.0, "ASR_gcg": 0.97}
    write_result(results, "masked", method="wandg", sparsity=0.0086, asr=asr, ppl=6.0)
    path = results / "masked" / "results.json"
    data = json.loads(path.read_text())
    data["results"][1]["sample_mean"] = 0.54
    path.write_text(json.dumps(data))
    shown = cli("report", results)
    assert shown.exit_code == 0, shown.stderr
    header = next(line for line in shown.stdout.splitlines() if "model under test" in line)
    assert all(name in header for name in ("Vanilla", "Adv-Dec", "Adv-Suffix"))
    row = next(line for line in shown.stdout.splitlines() if "masked" in line)
    assert "0.06" in row and "1.00/0.54" in row and "0.97" in row


def test_the_title_explains_only_the_columns_shown(cli, tmp_path):
    """A study without Adv-Suffix (the demo) is not told what Adv-Suffix means."""
    results = tmp_path / "results"
    asr = {"inst_ASR_basic": 0.1, "inst_ASR_multiple_nosys": 0.9}
    write_result(results, "masked", method="wandg", sparsity=0.01, asr=asr, ppl=6.0)
    shown = cli("report", results)
    assert shown.exit_code == 0, shown.stderr
    title = shown.stdout.splitlines()[0]
    assert "Vanilla: greedy with the system prompt" in title and "Adv-Dec: any of n" in title
    assert "Adv-Suffix" not in title and "GCG" not in title


def test_the_attack_is_drawn_against_its_steps(tmp_path):
    """`finetune` rows (their step and mode in model_under_test) are one line per attack from
    the aligned model's ASR at step 0 (the model the attack names, else the row `dense`;
    never the study's baseline before alignment, though it sorts first); the random control
    dashed; the transplant a point. The lines go through the values the results hold."""
    results = tmp_path / "results"
    write_result(results, "dense", method="dense", sparsity=0, asr={"inst_ASR_basic": 0.0},
                 ppl=38.0, model="aligned")  # fmt: skip
    write_result(results, "baseline-base", method="dense", sparsity=0,
                 asr={"inst_ASR_basic": 0.84}, ppl=38.0, model="base")  # fmt: skip
    curves = {"full": (0.4, 0.9), "freeze wanda-sd.best": (0.3, 0.8)}
    for row, (mid, end) in curves.items():
        mode, _, mask = row.partition(" ")
        for step, value in ((5, mid), (20, end)):
            label = f"finetune-{mode}" + ("" if step == 20 else f"-step{step}")
            write_result(results, label, method=f"finetune-{mode}", sparsity=0,
                         asr={"inst_ASR_basic": value}, ppl=40.0, model=f"out/{label}")  # fmt: skip
            attack = {"mode": mode, "mask": mask or None, "step": step, "steps": 20}
            if mode == "full":  # as finetune records it; the other attack, as before it did
                attack["aligned_model"] = "aligned"
            for name in ("results.json", "utility.json"):
                path = results / label / name
                data = json.loads(path.read_text())
                data["model_under_test"]["finetune"] = attack
                path.write_text(json.dumps(data))
    rows = collect(results)
    assert {rows[0].label, rows[1].label} == {"baseline-base", "dense"}  # attacks come after
    drawn = figures.asr_against_steps(rows, tmp_path / "steps")
    assert drawn is not None and all(f.is_file() for f in drawn.files)
    curves = figures.attack_curves(rows)
    assert curves == {
        "inst_ASR_basic": {
            "freeze wanda-sd.best": [(0, 0.0), (5, 0.3), (20, 0.8)],
            "full": [(0, 0.0), (5, 0.4), (20, 0.9)],
        }
    }
    assert figures.asr_against_steps([r for r in rows if not r.finetune], tmp_path / "x") is None
