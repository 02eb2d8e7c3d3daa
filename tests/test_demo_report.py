"""What `make demo` prints and draws after its steps: the table read from results.json by field, the verdict per
guided run and the test-sampling error behind it, and report.png's differences with their standard errors."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from agmae.eval.features import FeatureSource
from agmae.eval.knn import knn_correct, paired_difference
from agmae.eval.report import update_results

from experiments.demo import COLUMNS, format_comparison
from experiments.recipes import RECIPES
from experiments.results import KNN_MEAN_SPLITS, RunResults, read_run
from experiments.stats import differences, headline_errors, verdict

from helpers import TINY_VIT

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_table_reads_the_robustness_evaluations_fields_and_their_differences(tmp_path):
    splits = {"original": {"knn_top1": 30.0, "linear_top1": 35.0}, "mixed-rand": {"knn_top1": 20.0,
                                                                                 "linear_top1": 25.5},
              "only-fg": {"knn_top1": 40.0, "linear_top1": 41.0}}
    for name, shift in (("vanilla", 0.0), ("guided-oracle", 1.25)):
        shifted = {split: {k: v + shift for k, v in row.items()} for split, row in splits.items()}
        update_results(tmp_path / name, "robustness[pool=mean]", {"results": {"splits": shifted}})
    table = {name: read_run(tmp_path / name) for name in ("vanilla", "guided-oracle")}
    assert table["vanilla"] == RunResults(original_knn_mean=30.0, original_linear_mean=35.0, mixed_rand_knn_mean=20.0,
                                          mixed_rand_linear_mean=25.5, only_fg_knn_mean=40.0)
    assert read_run(tmp_path / "no-results") == RunResults()
    lines = format_comparison(table).splitlines()
    assert lines[0].split() == ["run", "k-NN", "original", "k-NN", "mixed-rand", "k-NN", "only-fg", "linear",
                                "original", "linear", "mixed-rand"]
    assert lines[2].split() == ["vanilla", "30.00", "20.00", "40.00", "35.00", "25.50"]
    assert lines[4].split() == ["guided-oracle", "-", "vanilla", "1.25", "1.25", "1.25", "1.25", "1.25"]


def test_the_verdict_says_whether_a_difference_is_beyond_the_test_sampling():
    oracle, own = verdict({"guided-oracle": 0.5, "guided-mae-tokencut-128": -1.0}, 3,
                          {"guided-oracle": 0.4, "guided-mae-tokencut-128": 0.4}, "original_knn_mean")
    assert "guided-oracle beat vanilla on k-NN original" in oracle and "+0.50 points on seed 3" in oracle
    assert "standard error 0.40" in oracle and "this seed alone does not decide" in oracle
    assert "guided-mae-tokencut-128 did NOT beat vanilla" in own and "-1.00 points" in own
    assert "beyond the test sampling" in own


def test_the_verdict_judges_the_recipes_headline_field():
    assert all(recipe.headline in KNN_MEAN_SPLITS and recipe.headline in COLUMNS for recipe in RECIPES.values())
    table = {"vanilla": RunResults(original_knn_mean=30.0, mixed_rand_knn_mean=25.0),
             "guided-oracle": RunResults(original_knn_mean=29.0, mixed_rand_knn_mean=26.0)}
    gains = {name: delta["mixed_rand_knn_mean"] for name, delta in differences(table, COLUMNS).items()}
    (line,) = verdict(gains, 0, {"guided-oracle": 0.3}, "mixed_rand_knn_mean")
    assert line.startswith("guided-oracle beat vanilla on mixed-rand k-NN mean-pool") and "+1.00 points" in line
    assert differences(table, COLUMNS)["guided-oracle"]["original_knn_mean"] == -1.0


@pytest.mark.parametrize("headline, split", [("original_knn_mean", "original"), ("mixed_rand_knn_mean", "mixed-rand")])
def test_headline_errors_come_from_each_runs_per_image_hits_on_the_headline_split(demo_root, tmp_path, headline,
                                                                                   split):
    run_dirs, hits = {}, {}
    for seed, name in enumerate(("vanilla", "guided-oracle")):
        run_dirs[name] = tmp_path / name
        run_dirs[name].mkdir()
        torch.manual_seed(seed)
        checkpoint = run_dirs[name] / "checkpoint-last.pth"
        torch.save({"model": VisionTransformer(**TINY_VIT, num_classes=0).state_dict(),
                    "config": {"encoder": TINY_VIT}, "epoch": 1}, checkpoint)
        for use_cache in (True, False):  # the evaluation caches the features that headline_errors reads
            source = FeatureSource(checkpoint, pool="mean", precision="fp32", workers=0, use_cache=use_cache,
                                   progress=False)
            bank, queries = source.features(demo_root / "train"), source.features(demo_root / split)
        hits[name] = knn_correct(bank, queries, k=20)
    errors = headline_errors(run_dirs, demo_root, headline)
    expected = paired_difference(hits["guided-oracle"], hits["vanilla"])["standard_error"]
    assert set(errors) == {"guided-oracle"}
    assert errors["guided-oracle"] == pytest.approx(expected) and expected > 0


def test_report_png_draws_each_difference_with_its_standard_error(tmp_path):
    from experiments import plots

    plt = plots._pyplot()
    fig, ax = plt.subplots()
    plots.gain_panel(ax, {"guided-oracle": 0.83, "guided-mae-tokencut-128": -0.25},
                     {"guided-oracle": 0.34, "guided-mae-tokencut-128": 0.32}, "mixed_rand_knn_mean")
    assert [bar.get_width() for bar in ax.patches] == pytest.approx([0.83, -0.25])
    whiskers = ax.collections[0].get_segments()  # the error bars: one horizontal segment per run
    assert [x for segment in whiskers for x in (segment[0][0], segment[1][0])] == pytest.approx(
        [0.83 - 0.34, 0.83 + 0.34, -0.25 - 0.32, -0.25 + 0.32])
    assert "mixed-rand k-NN mean-pool" in ax.get_xlabel() and "standard error" in ax.get_xlabel()
    plt.close(fig)
    table = {"vanilla": RunResults(mixed_rand_knn_mean=23.37), "guided-oracle": RunResults(mixed_rand_knn_mean=24.2)}
    out = plots.demo_report(tmp_path / "report.png", "a title", COLUMNS, table, {"guided-oracle": 0.83},
                            {"guided-oracle": 0.34}, "mixed_rand_knn_mean", {"oracle": 80.0}, {}, None)
    assert out.stat().st_size > 0


def test_the_study_figure_draws_each_rows_interval_and_seeds():
    from experiments import plots

    summary = {"plan": {"recipe": "light-b256-continue"}, "rows": [
        {"name": "vanilla"},
        {"name": "guided-oracle", "paired": {"mixed_rand_knn_mean": {
            "mean": 0.87, "ci95": [0.6, 1.13], "n": 3, "per_seed": {"0": 0.82, "1": 0.7, "2": 1.09}}}},
        {"name": "guided-dino-random", "paired": {"knn_cls": {"mean": 1.0, "ci95": [0.0, 2.0], "n": 2,
                                                              "per_seed": {"0": 0.5, "1": 1.5}}}}]}
    plt = plots._pyplot()
    fig, ax = plt.subplots()
    (drawn,) = plots.differences_panel(ax, summary, "mixed_rand_knn_mean")
    interval, mean, seeds = ax.lines[:3]
    assert drawn["name"] == "guided-oracle" and list(interval.get_xdata()) == [0.6, 1.13]
    assert list(mean.get_xdata()) == [0.87] and list(seeds.get_xdata()) == [0.82, 0.7, 1.09]
    plt.close(fig)
