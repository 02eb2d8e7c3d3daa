"""The numbers the demo and the study report, read by name: `RunResults` has one field per number and
`from_results` is the one place that picks each from the typed results agmae-eval writes (agmae.eval.report)."""
from dataclasses import dataclass, fields
from pathlib import Path

from agmae.eval.knn import HEADLINE_K
from agmae.eval.report import load_results


@dataclass(frozen=True)
class RunResults:
    """Top-1 % of one run (None where its evaluation has not run). k-NN at the headline k. `*_mean`: features
    mean-pooled over the patch tokens, else the CLS token; `linear`: the cached-feature probe."""
    knn_cls: float | None = None
    knn_mean: float | None = None
    linear: float | None = None
    original_knn_mean: float | None = None
    original_linear_mean: float | None = None
    mixed_rand_knn: float | None = None
    mixed_rand_linear: float | None = None
    mixed_rand_knn_mean: float | None = None
    mixed_rand_linear_mean: float | None = None
    only_fg_knn: float | None = None
    only_fg_linear: float | None = None
    only_fg_knn_mean: float | None = None
    clean_fg_knn: float | None = None
    bg_gap_knn: float | None = None
    bg_gap_linear: float | None = None
    finetune: float | None = None
    segment_fg: float | None = None  # mIoU % of the dense probe, object against background, on `original`
    segment_classes: float | None = None  # the same, per-class object against background
    mixed_rand_segment_fg: float | None = None  # segment_fg on `mixed-rand`


# Column headers of the fields.
LABELS = {
    "knn_cls": "k-NN CLS",
    "knn_mean": "k-NN mean-pool",
    "linear": "linear (cached)",
    "original_knn_mean": "k-NN original",
    "original_linear_mean": "linear original",
    "mixed_rand_knn": "mixed-rand k-NN",
    "mixed_rand_linear": "mixed-rand linear",
    "mixed_rand_knn_mean": "mixed-rand k-NN mean-pool",
    "mixed_rand_linear_mean": "mixed-rand linear mean-pool",
    "only_fg_knn": "only-fg k-NN",
    "only_fg_linear": "only-fg linear",
    "only_fg_knn_mean": "only-fg k-NN mean-pool",
    "clean_fg_knn": "clean-fg k-NN",
    "bg_gap_knn": "BG-gap k-NN",
    "bg_gap_linear": "BG-gap linear",
    "finetune": "fine-tuned",
    "segment_fg": "dense probe fg mIoU",
    "segment_classes": "dense probe class mIoU",
    "mixed_rand_segment_fg": "mixed-rand dense probe fg mIoU",
}
FIELDS = tuple(field.name for field in fields(RunResults))
# The test split of each mean-pooled k-NN field of the robustness evaluation.
KNN_MEAN_SPLITS = {"original_knn_mean": "original", "mixed_rand_knn_mean": "mixed-rand",
                   "only_fg_knn_mean": "only-fg"}


def from_results(results: dict) -> RunResults:
    """The fields of a run's typed results ({results.json key: agmae.eval.report.Result}, as load_results reads
    them)."""
    def metrics(key: str):
        return results[key].metrics if key in results else None

    knn, knn_mean, linear = metrics("knn"), metrics("knn[pool=mean]"), metrics("linear-cached")
    robustness, mean, finetune = metrics("robustness"), metrics("robustness[pool=mean]"), metrics("finetune")
    segment = metrics("segment") or {}  # an untyped protocol: its results as written

    def knn_top1(scores):
        return scores.by_k[HEADLINE_K].top1 if scores and HEADLINE_K in scores.by_k else None

    def miou(task: str, test_split: str = "original"):
        return segment.get(task, {}).get("splits", {}).get(test_split, {}).get("miou")

    def split(scores, name: str, column: str):
        return getattr(scores.splits[name], column) if scores and name in scores.splits else None

    return RunResults(
        knn_cls=knn_top1(knn),
        knn_mean=knn_top1(knn_mean),
        linear=linear.top1 if linear else None,
        **{name: split(mean, test_split, "knn_top1") for name, test_split in KNN_MEAN_SPLITS.items()},
        original_linear_mean=split(mean, "original", "linear_top1"),
        mixed_rand_knn=split(robustness, "mixed-rand", "knn_top1"),
        mixed_rand_linear=split(robustness, "mixed-rand", "linear_top1"),
        mixed_rand_linear_mean=split(mean, "mixed-rand", "linear_top1"),
        only_fg_knn=split(robustness, "only-fg", "knn_top1"),
        only_fg_linear=split(robustness, "only-fg", "linear_top1"),
        clean_fg_knn=robustness.clean_fg_knn_top1 if robustness else None,
        bg_gap_knn=robustness.bg_gap.knn_top1 if robustness and robustness.bg_gap else None,
        bg_gap_linear=robustness.bg_gap.linear_top1 if robustness and robustness.bg_gap else None,
        finetune=finetune.splits["original"].top1 if finetune and "original" in finetune.splits else None,
        segment_fg=miou("fg"),
        segment_classes=miou("classes"),
        mixed_rand_segment_fg=miou("fg", "mixed-rand"),
    )


def read_run(run_dir: Path) -> RunResults:
    """The fields of RUN_DIR/results.json (all None when there is none yet)."""
    return from_results(load_results(run_dir))
