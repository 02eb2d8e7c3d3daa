"""The study's report: per row the per-seed numbers and their mean ± std, as docs/results.json and the
tables of docs/RESULTS.md (after the hand-written docs/FINDINGS.md)."""
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

from agmae.checkpoint import atomic_write_text
from agmae.cli.demo import nested
from agmae.cli.steps import duration
from scipy import stats
from study_plan import (EARLIER_RECIPES, FEATURE_COLUMNS, FINDINGS, GUIDANCE_DEFAULTS, MAPS, METRICS,
                        PAIRED_COLUMNS, ROBUSTNESS_COLUMNS, Plan)

def display_command(argv: list) -> str:
    """The command as a user types it: console scripts by name, everything else as given."""
    script = Path(argv[0])
    name = script.name if script.parent == Path(sys.executable).parent and script.name.startswith("agmae-") else argv[0]
    return shlex.join([name, *argv[1:]])


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


def _paired_columns(row: dict, reference: dict) -> dict:
    return {name: result for name in PAIRED_COLUMNS
            if name in row["metrics"] and name in reference["metrics"]
            and (result := paired(row["metrics"][name]["per_seed"], reference["metrics"][name]["per_seed"]))
            is not None}


def _pair_rows(rows: list) -> None:
    """Each guided row gets `paired`: its difference to the vanilla row of the same dataset, per column; a row
    that varies another one in the plan (`versus`) also gets `paired_versus`, its difference to that row."""
    vanilla = {row["correlation"]: row for row in rows if row["maps"] is None}
    by_name = {row["name"]: row for row in rows}
    for row in rows:
        reference = vanilla.get(row["correlation"])
        if row["maps"] is not None and reference is not None:
            row["paired"] = _paired_columns(row, reference)
        if row["versus"] in by_name:
            row["paired_versus"] = _paired_columns(row, by_name[row["versus"]])


def _metrics_of(results: dict) -> dict:
    """The reported numbers (METRICS) of a run's results.json; None where a protocol did not write one."""
    return {name: nested(results, path) for name, (_, path) in METRICS.items()}


def aggregate(plan: Plan) -> dict:
    """results.json of the study: per row the per-seed numbers and their mean ± std, from complete runs and from
    the plan's record for the row-seeds not complete here (`seeds_recorded`, each run entry naming its source)."""
    config, record, rows, missing = plan.config, plan.record, [], []
    for row in plan.rows:
        seeds = config.seeds_of(row)
        numbers = {seed: _metrics_of(plan.runs[row.name, seed].results())
                   for seed in seeds if plan.runs[row.name, seed].complete()}
        recorded = [seed for seed in seeds if (row.name, seed) in record.metrics]
        numbers.update({seed: record.metrics[row.name, seed] for seed in recorded})
        done = sorted(numbers)
        missing += [f"{row.name} seed {seed}" for seed in seeds if seed not in numbers]
        metrics = {}
        for name in METRICS:
            values = {seed: numbers[seed].get(name) for seed in done}
            if any(v is not None for v in values.values()):
                metrics[name] = {**summarise(list(values.values())), "per_seed": {str(s): v for s, v in values.items()}}
        runs = {str(seed): record.entry((row.name, seed)) if seed in recorded else
                dict(run_dir=str(plan.runs[row.name, seed].run_dir),
                     commands=[display_command(step.argv) for step in plan.runs[row.name, seed].steps()])
                for seed in seeds}
        rows.append(dict(
            name=row.name, note=row.note, maps=row.maps, maps_command=list(MAPS[row.maps]) if row.maps else None,
            correlation=row.correlation, versus=row.versus,
            guidance=({**GUIDANCE_DEFAULTS, **row.guidance} if row.maps else None),
            seeds_planned=seeds, seeds_done=done, seeds_recorded=recorded, metrics=metrics, runs=runs,
            train_command_seed0=display_command(plan.runs[row.name, seeds[0]].train.argv),
        ))
    _pair_rows(rows)
    seconds = {}
    for step in plan.steps:
        seconds[step.kind] = seconds.get(step.kind, 0.0) + step.seconds()
    summary = dict(
        command=config.command(), generated=time.strftime("%Y-%m-%dT%H:%M:%S%z"), complete=not missing,
        missing=missing, plan=config.describe(),
        wall_seconds=dict(total=round(sum(seconds.values()), 1), **{k: round(v, 1) for k, v in seconds.items()}),
        rows=rows,
    )
    sources = {row["runs"][str(seed)]["recorded_in"] for row in rows for seed in row["seeds_recorded"]}
    if sources:
        seconds_of = record.step_seconds()
        summary["recorded_step_seconds"] = {source: seconds_of[source] for source in sorted(sources)}
    return summary


def _cell(metric: dict | None) -> str:
    if not metric or metric["mean"] is None:
        return "—"
    return f"{metric['mean']:.1f}" + (f" ± {metric['std']:.1f}" if metric["std"] is not None else "")


def _paired_cell(result: dict | None) -> str:
    if not result:
        return "—"
    lo, hi = result["ci95"]
    return f"{result['mean']:+.1f} [{lo:+.1f}, {hi:+.1f}] p={result['p']:.2f} ({result['wins']}/{result['n']})"


def _setup(row: dict) -> str:
    if row["maps"] is None:
        return "—"
    g = row["guidance"]
    tau = (f"τ = {g['tau-start']:g}" if g["tau-schedule"] == "constant"
           else f"τ cos {g['tau-start']:g}→{g['tau-end']:g}")
    return f"{row['maps']}, {tau}, {g['weight-norm']}"


def _paired_table(rows: list, key: str, heading: str, intro: str, against: str | None = None) -> list:
    """The markdown lines of one paired table (the rows that have `key`), with a column naming each row's
    reference (row[against]) when given; no lines when no row has `key`."""
    paired_rows = [row for row in rows if row.get(key)]
    if not paired_rows:
        return []
    reference = ["against"] if against else []
    lines = ["", heading, "", intro, "",
             "| " + " | ".join(["row", *reference, *(METRICS[c][0] for c in PAIRED_COLUMNS)]) + " |",
             "|" + "---|" * (1 + len(reference) + len(PAIRED_COLUMNS))]
    for row in paired_rows:
        cells = [row["name"], *([row[against]] if against else []),
                 *(_paired_cell(row[key].get(c)) for c in PAIRED_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def wall_total(summary: dict) -> float:
    """Step seconds of every reported number: this machine's and those of the records it took row-seeds from."""
    return summary["wall_seconds"]["total"] + sum(summary.get("recorded_step_seconds", {}).values())


def render_markdown(summary: dict, findings: str = "", earlier=()) -> str:
    """RESULTS.md: the generated tables, after the hand-written findings (docs/FINDINGS.md) when there are any,
    and then the earlier recipes' frozen results (`earlier`, the texts of EARLIER_RECIPES), one heading level
    down."""
    plan, rows = summary["plan"], summary["rows"]
    wall = summary["wall_seconds"]
    lines = ["# AttG study results", ""]
    if findings.strip():
        lines += [findings.strip(), "", "## The tables (generated by benchmarks/study.py)", ""]
    if not summary["complete"]:
        lines += [f"**PARTIAL**: {len(summary['missing'])} row-seeds not finished yet: "
                  + ", ".join(summary["missing"]) + ". Re-run the command below to continue.", ""]
    if "recorded_step_seconds" in summary:
        lines += ["Row-seeds taken from records of this same plan, whose runs are not on the machine that wrote this "
                  "report (their numbers are the records'; run directories and commands in results.json): "
                  + "; ".join(f"{row['name']} seeds {', '.join(map(str, row['seeds_recorded']))}"
                              for row in rows if row["seeds_recorded"])
                  + ". Their step time is in the wall time below: "
                  + ", ".join(f"{duration(seconds)} in {source}"
                              for source, seconds in summary["recorded_step_seconds"].items()) + ".", ""]
    lines += [
        "Reproduce (resumable; each finished run is skipped"
        + ("; without `--record`, the recorded row-seeds are trained here too" if "recorded_step_seconds" in summary
           else "") + "):", "", "```", summary["command"], "```", "",
        f"Demo dataset ({plan['n_train']} train / {plan['n_test']} per test split, 64 px), demo recipe "
        f"`{plan['recipe']}`: model `{plan['model']}`, epochs {plan['epochs']} (warm-up {plan['warmup_epochs']:g}), "
        + (f"each run continuing the {plan['continues_epochs']}-epoch vanilla run of its seed (`--init-from`), "
           if plan.get("continues_epochs") else "")
        + f"batch {plan['batch_size']}, blr {plan['blr']:g}, precision {plan['precision']}, identical for every row. "
        "Numbers are top-1 % "
        f"(k-NN: k = {plan['knn_k']}, CLS features unless marked; linear: cached-feature probe), "
        "mean ± sample std (n − 1) over the n finished seeds. Maps: oracle = masks area-averaged to a 28×28 "
        "grid (resampled with each crop onto the 8×8 patch grid); "
        "mae-tokencut = TokenCut on the final tokens of the same seed's vanilla run (of the recipe's shorter first "
        "round where it has one), mean-centred, border rule, at 96 px (the two-round pipeline); "
        "mae-tokencut-128 = the same cut on its last block's tokens at 128 px; "
        "tokencut / gradcam = EfficientNet-Lite0 at 224 px; dino-random = CLS "
        "attention of a random ViT-S/8 at 64 px. BG-gap = mixed-same − mixed-rand (only with correlated backgrounds, p > 0). "
        "clean-fg = k-NN of only-fg queries against the training objects on black.",
        "",
        f"Wall time (sum of the recorded step times): {duration(wall_total(summary))} ("
        + (f"this machine {duration(wall['total'])}" + (": " if len(wall) > 1 else "")
           if "recorded_step_seconds" in summary else "")
        + ", ".join(f"{kind} {duration(s)}" for kind, s in wall.items() if kind != "total") + ").",
        "", "## Features (original test split)", "",
        "| row | maps, τ, weight-norm | p | n | " + " | ".join(METRICS[c][0] for c in FEATURE_COLUMNS) + " |",
        "|---|---|---|---|" + "---|" * len(FEATURE_COLUMNS),
    ]
    for row in rows:
        lines.append(f"| {row['name']} | {_setup(row)} | {row['correlation']:g} | {len(row['seeds_done'])}/"
                     f"{len(row['seeds_planned'])} | "
                     + " | ".join(_cell(row["metrics"].get(c)) for c in FEATURE_COLUMNS) + " |")
    lines += ["", "## Background robustness", "",
              "| row | p | n | " + " | ".join(METRICS[c][0] for c in ROBUSTNESS_COLUMNS) + " |",
              "|---|---|---|" + "---|" * len(ROBUSTNESS_COLUMNS)]
    for row in rows:
        lines.append(f"| {row['name']} | {row['correlation']:g} | {len(row['seeds_done'])}/"
                     f"{len(row['seeds_planned'])} | "
                     + " | ".join(_cell(row["metrics"].get(c)) for c in ROBUSTNESS_COLUMNS) + " |")
    lines += _paired_table(rows, "paired", "## Guided − vanilla, seed by seed",
                           "Mean difference [95 % t interval], two-sided paired t-test p, and on how many seeds guided "
                           "was higher, against the vanilla row of the same dataset.")
    lines += _paired_table(rows, "paired_versus", "## Each variant − the row it varies, seed by seed",
                           "The same statistics against the row named in the second column (e.g. guided masking "
                           "against the guided loss with the same maps).", against="versus")
    lines += ["", "## Training command of each row (seed 0; other seeds differ in --seed and --out)", ""]
    for row in rows:
        lines += [f"- `{row['name']}`" + (f" ({row['note']})" if row["note"] else "") + ":",
                  f"  `{row['train_command_seed0']}`"]
    lines += ["", "Per-seed numbers, run directories and every command: `results.json` beside this file.", ""]
    lines += [line for text in earlier if text.strip()
              for line in (re.sub(r"^(#+) ", r"#\1 ", text.strip(), flags=re.MULTILINE), "")]
    return "\n".join(lines)


def write_report(plan: Plan) -> dict:
    summary = aggregate(plan)
    atomic_write_text(json.dumps(summary, indent=2) + "\n", plan.config.docs / "results.json")
    findings, *earlier = [path.read_text() if path.is_file() else ""
                          for path in (plan.config.docs / name for name in (FINDINGS, *EARLIER_RECIPES))]
    atomic_write_text(render_markdown(summary, findings, earlier), plan.config.docs / "RESULTS.md")
    return summary
