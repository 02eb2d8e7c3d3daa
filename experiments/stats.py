"""The statistics of the demo and the study: a guided run against vanilla on one seed (the difference, and its
standard error over the choice of test images from the per-image k-NN hits), and over seeds (mean ± std, and the
paired t interval and test)."""
import statistics
from pathlib import Path

from scipy import stats

from agmae.eval.features import FeatureSource
from agmae.eval.knn import HEADLINE_K, knn_correct, paired_difference

from experiments.results import KNN_MEAN_SPLITS, LABELS


def summarise(values: list) -> dict:
    """mean and sample standard deviation (n − 1; None for one value) of the non-missing values."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def paired(guided: dict, vanilla: dict) -> dict | None:
    """Guided − vanilla on the seeds both finished ({seed: value} each): mean, 95 % t confidence interval,
    two-sided paired t-test p, and on how many seeds guided was higher. None below two common seeds."""
    seeds = sorted(set(guided) & set(vanilla), key=int)
    diffs = [guided[s] - vanilla[s] for s in seeds if guided[s] is not None and vanilla[s] is not None]
    if len(diffs) < 2:
        return None
    mean, sem = statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
    half = stats.t.ppf(0.975, len(diffs) - 1) * sem
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if sem > 0 else (0.0 if mean else 1.0)
    return dict(mean=mean, ci95=[mean - half, mean + half], p=p, wins=sum(d > 0 for d in diffs), n=len(diffs),
                per_seed={s: d for s, d in zip(seeds, diffs)})


def differences(table: dict, columns) -> dict:
    """{guided run: {field: guided - vanilla}} of a {run: RunResults} table (None where either is missing)."""
    vanilla = table["vanilla"]

    def minus(row, field):
        mine, theirs = getattr(row, field), getattr(vanilla, field)
        return None if mine is None or theirs is None else mine - theirs

    return {name: {field: minus(row, field) for field in columns} for name, row in table.items() if name != "vanilla"}


def headline_errors(run_dirs: dict, root: Path, headline: str) -> dict:
    """{guided run: standard error of its difference to vanilla in the mean-pooled k-NN field `headline` over the
    choice of test images}, from each run's per-image k-NN hits on the features its evaluation cached (no
    extraction)."""
    hits = {}
    for name, run_dir in run_dirs.items():
        source = FeatureSource(run_dir / "checkpoint-last.pth", pool="mean", precision="fp32", progress=False)
        bank, queries = source.features(root / "train"), source.features(root / KNN_MEAN_SPLITS[headline])
        hits[name] = knn_correct(bank, queries, k=HEADLINE_K)
    return {name: paired_difference(hits[name], hits["vanilla"])["standard_error"] for name in hits
            if name != "vanilla"}


def verdict(gains: dict, seed: int, errors: dict, headline: str) -> list[str]:
    """One plain line per guided run ({run: guided − vanilla in the field `headline`}): did it beat vanilla on
    this seed, and is the difference beyond two standard errors of the test sampling (`errors`)."""
    lines, label = [], f"{LABELS[headline]} (the headline metric)"
    for name, gain in gains.items():
        if gain is None:
            lines.append(f"{name}: no {LABELS[headline]} result")
            continue
        noise = (f"; standard error {errors[name]:.2f}, so "
                 + ("beyond the test sampling" if abs(gain) > 2 * errors[name]
                    else "within two standard errors: this seed alone does not decide"))
        if gain > 0:
            lines.append(f"{name} beat vanilla on {label} by {gain:+.2f} points on seed {seed}{noise}")
        else:
            lines.append(f"{name} did NOT beat vanilla on {label} on seed {seed}: {gain:+.2f} points{noise}")
    return lines
