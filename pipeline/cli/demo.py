"""`make demo`: the whole pipeline on the built-in demo dataset, as a user would run it.

Builds the demo dataset, discovers maps (oracle masks, TokenCut and Grad-CAM on the offline
EfficientNet-Lite0), trains a vanilla MAE and guided MAEs (TokenCut and oracle maps) with equal
compute, evaluates them (k-NN, cached linear probe, background robustness, map quality), prints
one comparison table and writes `report.png`. Every step is the stage's own CLI in a subprocess,
run by the step runner it shares with the study (agmae.cli.steps): a second `make demo` (or one
after a crash) skips the steps finished with the same recipe and redoes those whose options or
inputs changed.
"""
import hashlib
import json
import time
from pathlib import Path

import click
import numpy as np

from agmae.data.demo import ensure_demo
from agmae.data.folder import load_rgb, scan
from agmae.eval.report import format_table
from agmae.store import open_maps
from agmae.cli.steps import Step, console_script, execute, stream_runner
from agmae.options import click_option, seed_option
from agmae.paths import agmae_home, maps_path

DISCOVERY = {
    "oracle": ["--method", "oracle", "--patch", "8"],
    # 224 px, not TokenCut's 448-px CNN default: on 64-px images the larger input buys IoU
    # (benchmarks/discovery_quality.py) at 4x the compute, which the demo's time budget cannot spend.
    "tokencut": ["--method", "tokencut", "--backbone", "tf_efficientnet_lite0", "--image-size", "224"],
    # Grad-CAM needs a backward pass; at 128 px (a 4x4 grid) it fits the demo's 20 minutes.
    "gradcam": ["--method", "gradcam", "--backbone", "tf_efficientnet_lite0", "--image-size", "128"],
}
RUNS = {"vanilla": None, "guided-tokencut": "tokencut", "guided-oracle": "oracle"}
# First kept epoch at which guided (oracle maps) led vanilla by > 2 k-NN points in the study's learning curve.
SEPARATION_EPOCH = 12
COLUMNS = {
    "k-NN original": ("robustness", ("splits", "original", "knn_top1")),
    "k-NN mixed-rand": ("robustness", ("splits", "mixed-rand", "knn_top1")),
    "k-NN only-fg": ("robustness", ("splits", "only-fg", "knn_top1")),
    "clean-fg k-NN": ("robustness", ("clean_fg_knn_top1",)),
    "linear original": ("robustness", ("splits", "original", "linear_top1")),
    "linear mixed-rand": ("robustness", ("splits", "mixed-rand", "linear_top1")),
}


def run_directory(run_root: Path, name: str, train: Step) -> Path:
    """RUN_ROOT/runs/NAME-<digest of the training recipe>: a run made another way gets a directory of
    its own, since agmae-train resumes (or refuses) whatever checkpoint its directory holds."""
    digest = hashlib.sha256(json.dumps(train.recipe(), sort_keys=True).encode()).hexdigest()[:8]
    return run_root / "runs" / f"{name}-{digest}"


def plan(run_root: Path, demo_root: Path, epochs: int, seed: int) -> tuple[list, dict]:
    """The demo's steps in order, and {run name: run directory}."""
    data = ["--data", str(demo_root)]
    precision = ["--precision", "native"]  # bf16 where the CPU has it natively: 2-3x faster there
    discovered, steps, run_dirs = {}, [], {}
    for method, options in DISCOVERY.items():
        out_file = maps_path(run_root, method)
        discovered[method] = Step(f"discover {method}", [console_script("agmae-discover"), *options, *data,
                                                         *precision, "--out", str(out_file)],
                                  out_file.with_suffix(".done.json"), kind="discover", stale_output=out_file)
        steps.append(discovered[method])
    for name, method in RUNS.items():
        # no --data: agmae-train's demo recipe (model, batch, blr, native bf16) applies to the demo dataset;
        # guided runs take the trainer's default tau schedule, chosen by the study (docs/RESULTS.md)
        train = [console_script("agmae-train"),
                 *(["--no-guidance"] if method is None else ["--maps", str(maps_path(run_root, method))]),
                 "--epochs", str(epochs), "--seed", str(seed), "--save-every", "1"]  # a killed demo resumes per epoch
        needs = () if method is None else (discovered[method],)
        run_dir = run_dirs[name] = run_directory(run_root, name, Step(name, train, Path(), needs))
        trained = Step(f"train {name}", [*train, "--out", str(run_dir)], run_dir / "train.done.json", needs,
                       kind="train")
        evaluate = [console_script("agmae-eval"), "robustness", "--checkpoint", str(run_dir / "checkpoint-last.pth"),
                    "--k", "20", *precision]
        steps += [trained, Step(f"evaluate {name}", evaluate, run_dir / "eval.done.json", (trained,), kind="eval")]
    steps.append(Step("map quality", [console_script("agmae-eval"), "attention", "--run-dir", str(run_root)],
                      run_root / "attention.done.json", tuple(discovered.values()), kind="eval"))
    return steps, run_dirs


def nested(results: dict, path: tuple):
    """results[path[0]][path[1]]... or None where a key is missing."""
    for key in path:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def comparison(run_dirs: dict) -> dict:
    """{run name: {column: value}} from each run's results.json."""
    table = {}
    for name, run_dir in run_dirs.items():
        results_file = run_dir / "results.json"
        results = json.loads(results_file.read_text()) if results_file.exists() else {}
        table[name] = {column: nested(results, (protocol, "results", *path)) for column, (protocol, path) in COLUMNS.items()}
    return table


def write_report(run_root: Path, table: dict, attention: dict, demo_root: Path) -> Path:
    """report.png: grouped bars of the comparison table, then demo images with their maps."""
    import matplotlib  # the demo extra: imported only where a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in DISCOVERY if maps_path(run_root, m).exists()]
    fig = plt.figure(figsize=(14, 4 + 1.6 * len(methods)))
    grid = fig.add_gridspec(1 + len(methods), 8, height_ratios=[2.5] + [1] * len(methods))
    bars = fig.add_subplot(grid[0, :6])
    columns = list(COLUMNS)
    width = 0.8 / len(table)
    for i, (name, row) in enumerate(table.items()):
        values = [row[c] if row[c] is not None else 0.0 for c in columns]
        bars.bar(np.arange(len(columns)) + i * width, values, width, label=name)
    bars.set_xticks(np.arange(len(columns)) + width * (len(table) - 1) / 2, columns, fontsize=8)
    bars.set_ylabel("top-1 %")
    bars.legend(fontsize=8)
    bars.set_title("vanilla vs attention-guided MAE on the demo dataset")
    quality = fig.add_subplot(grid[0, 6:])
    names = list(attention)
    quality.barh(names, [attention[n]["mean_iou"] for n in names])
    quality.set_title("map mean IoU vs masks (%)", fontsize=9)
    quality.tick_params(labelsize=8)

    index = scan(demo_root / "train")
    shown = np.linspace(0, len(index) - 1, 8).astype(int)
    for row, method in enumerate(methods, start=1):
        store = open_maps(maps_path(run_root, method))
        for col, i in enumerate(shown):
            ax = fig.add_subplot(grid[row, col])
            image = np.asarray(load_rgb(index.path(i)))
            ax.imshow(image)
            ax.imshow(np.asarray(store.maps[i], dtype=np.float32), cmap="jet", alpha=0.45,
                      extent=(0, image.shape[1], image.shape[0], 0), interpolation="bilinear")
            ax.set_axis_off()
            if col == 0:
                ax.set_title(method, fontsize=8, loc="left")
    out = run_root / "report.png"
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return out


def format_comparison(table: dict) -> str:
    columns = list(COLUMNS)
    return format_table(["run", *columns], [[name, *(row[c] for c in columns)] for name, row in table.items()])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Run root for the maps, the runs and report.png. [default: AGMAE_HOME/demo-run]")
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True,
              help="Pre-training epochs of every MAE (equal compute for vanilla and guided). 6 keeps the demo "
                   "under 20 minutes on 2 CPU cores, too short for guidance to pay: in the study's 20-epoch runs "
                   "guided and vanilla separate from epoch ~12 (docs/RESULTS.md).")
@click_option("seed", seed_option("Training seed of every run."))
def main(out, epochs, seed):
    """Run discover -> train -> eval on the demo dataset and print the comparison."""
    started = time.time()
    run_root = out or agmae_home() / "demo-run"
    run_root.mkdir(parents=True, exist_ok=True)
    click.echo("[demo] demo dataset (built once into AGMAE_HOME)")
    demo_root = ensure_demo()
    steps, run_dirs = plan(run_root, demo_root, epochs, seed)
    failed = execute(steps, stream_runner, echo=lambda line: click.echo(f"[demo] {line}"))
    if failed:
        raise click.ClickException(f"{len(failed)} demo steps failed or were skipped (first: {failed[0]}); "
                                   "fix the cause shown above and re-run `make demo` to continue")
    # keys look like "tokencut (maps-tokencut.h5)"; the method alone labels the table and the chart
    attention = {name.split(" (")[0]: entry for name, entry in
                 json.loads((run_root / "results.json").read_text())["attention"]["results"].items()}

    table = comparison(run_dirs)
    click.echo(f"\n[demo] {epochs} epochs per MAE, seed {seed}; top-1 % (k-NN k=20, linear = cached-feature probe)")
    click.echo(format_comparison(table))
    if epochs < SEPARATION_EPOCH:
        click.echo(f"[demo] {epochs} epochs show the pipeline, not the effect: guided and vanilla MAEs separate from "
                   f"epoch ~{SEPARATION_EPOCH} (docs/RESULTS.md, benchmarks/study.py)")
    click.echo("\n[demo] map quality against the ground-truth masks (demo train split)")
    width = max(map(len, attention))
    for name, entry in attention.items():
        click.echo(f"  {name:{width}s}  mean IoU {entry['mean_iou']:5.1f} %   pointing {entry['pointing']:5.1f} %")
    report = write_report(run_root, table, attention, demo_root)
    click.echo(f"\n[demo] report: {report}\n[demo] total {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
