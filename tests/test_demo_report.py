"""What `make demo` prints after its steps: the verdict per guided run and the test-sampling error behind it."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from agmae.cli.demo import COLUMNS, DEMO_RECIPES, headline_errors, verdict
from agmae.eval.features import FeatureSource
from agmae.eval.knn import knn_correct, paired_difference

from helpers import TINY_VIT

pytestmark = pytest.mark.usefixtures("one_thread")


def _table(headline: dict, column="k-NN original") -> dict:
    return {name: {c: value if c == column else None for c in COLUMNS} for name, value in headline.items()}


def test_the_verdict_says_whether_a_difference_is_beyond_the_test_sampling():
    table = _table({"vanilla": 25.0, "guided-oracle": 25.5, "guided-mae-tokencut": 24.0})
    oracle, own = verdict(table, 3, {"guided-oracle": 0.4, "guided-mae-tokencut": 0.4}, "k-NN original")
    assert "guided-oracle beat vanilla on k-NN original" in oracle and "+0.50 points on seed 3" in oracle
    assert "standard error 0.40" in oracle and "this seed alone does not decide" in oracle
    assert "guided-mae-tokencut did NOT beat vanilla" in own and "-1.00 points" in own
    assert "beyond the test sampling" in own


def test_the_verdict_judges_the_recipes_headline_column():
    assert {recipe.headline for recipe in DEMO_RECIPES.values()} == {"k-NN original", "k-NN mixed-rand"}
    assert all(recipe.headline.startswith("k-NN ") and recipe.headline in COLUMNS for recipe in DEMO_RECIPES.values())
    table = _table({"vanilla": 25.0, "guided-oracle": 26.0}, column="k-NN mixed-rand")
    table["vanilla"]["k-NN original"], table["guided-oracle"]["k-NN original"] = 30.0, 29.0
    (line,) = verdict(table, 0, {"guided-oracle": 0.3}, "k-NN mixed-rand")
    assert line.startswith("guided-oracle beat vanilla on k-NN mixed-rand") and "+1.00 points" in line
    (line,) = verdict(table, 0, {"guided-oracle": 0.3}, "k-NN original")
    assert "did NOT beat vanilla on k-NN original" in line


@pytest.mark.parametrize("headline, split", [("k-NN original", "original"), ("k-NN mixed-rand", "mixed-rand")])
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
