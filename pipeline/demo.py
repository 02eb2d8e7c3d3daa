"""`make demo`: the whole pipeline on the built-in demo dataset, as a user would run it.

Builds the demo dataset, discovers maps (oracle masks, TokenCut and Grad-CAM on the offline
EfficientNet-Lite0), trains a vanilla MAE and guided MAEs (TokenCut and oracle maps) with equal
compute, evaluates them (k-NN, cached linear probe, background robustness, map quality), prints
one comparison table and writes `report.png`. Every step is the stage's own CLI in a subprocess,
so the demo measures exactly what users run; a step whose output exists is skipped, so a second
`make demo` (or one after a crash) reuses what is done.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import click

from data.demo import ensure_demo
from pipeline.hardware import cpu_has_native_bf16
from pipeline.paths import agmae_home, maps_path

DISCOVERY = {
    "oracle": ["--method", "oracle", "--patch", "8"],
    # 224 px, not TokenCut's 448-px CNN default: on 64-px images the larger input buys IoU
    # (benchmarks/discovery_quality.py) at 4x the compute, which the demo's time budget cannot spend.
    "tokencut": ["--method", "tokencut", "--backbone", "tf_efficientnet_lite0", "--image-size", "224"],
    # Grad-CAM needs a backward pass; at 128 px (a 4x4 grid) it fits the demo's 20 minutes.
    "gradcam": ["--method", "gradcam", "--backbone", "tf_efficientnet_lite0", "--image-size", "128"],
}
RUNS = {"vanilla": None, "guided-tokencut": "tokencut", "guided-oracle": "oracle"}
# Constant tau = 0.5: the best setting of the calibration runs (ARCHITECTURE.md), a fg/bg weight
# ratio of e^2 ~ 7 at a map value of 1.
GUIDANCE = ["--tau-schedule", "constant", "--tau-start", "0.5"]
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


def console_script(name: str) -> str:
    """The console script `name` installed beside this interpreter: the environment's own `agmae-*`."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise click.ClickException(f"{path} not found; install the package into this environment "
                                   f"(make install, or pip install -e .) and run with that environment's python")
    return str(path)


def _step(title: str, command: list[str], done: Path) -> None:
    """Run one stage command unless its output `done` exists; stream its progress to the terminal."""
    if done.exists():
        click.echo(f"[demo] {title}: done already ({done})")
        return
    click.echo(f"[demo] {title}: {' '.join(command)}")
    started = time.time()
    subprocess.run(command, check=True)
    click.echo(f"[demo] {title}: {time.time() - started:.0f} s")


def nested(results: dict, path: tuple):
    """results[path[0]][path[1]]... or None where a key is missing."""
    for key in path:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def comparison(run_root: Path) -> dict:
    """{run name: {column: value}} from each run's results.json."""
    table = {}
    for name in RUNS:
        results_file = run_root / name / "results.json"
        results = json.loads(results_file.read_text()) if results_file.exists() else {}
        table[name] = {column: nested(results, (protocol, "results", *path)) for column, (protocol, path) in COLUMNS.items()}
    return table


def write_report(run_root: Path, table: dict, attention: dict, demo_root: Path) -> Path:
    """report.png: grouped bars of the comparison table, then demo images with their maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from data.folder import scan
    from pipeline.store import open_maps

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
            image = np.asarray(Image.open(index.path(i)).convert("RGB"))
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
    from eval.report import format_table

    columns = list(COLUMNS)
    return format_table(["run", *columns], [[name, *(row[c] for c in columns)] for name, row in table.items()])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Run root for the maps, the runs and report.png. [default: AGMAE_HOME/demo-run]")
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True,
              help="Pre-training epochs of every MAE (equal compute for vanilla and guided). 6 keeps the demo "
                   "under 20 minutes on 2 CPU cores, too short for guidance to pay: in the study's 20-epoch runs "
                   "guided and vanilla separate from epoch ~12 (docs/RESULTS.md).")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed of every run.")
def main(out, epochs, seed):
    """Run discover -> train -> eval on the demo dataset and print the comparison."""
    started = time.time()
    run_root = out or agmae_home() / "demo-run"
    run_root.mkdir(parents=True, exist_ok=True)
    click.echo("[demo] demo dataset (built once into AGMAE_HOME)")
    demo_root = ensure_demo()
    data = ["--data", str(demo_root / "train")]
    # bf16 autocast where the CPU has it natively: 2-3x faster discovery and feature extraction here.
    precision = ["--precision", "bf16" if cpu_has_native_bf16() else "auto"]

    for method, options in DISCOVERY.items():
        out_file = maps_path(run_root, method)
        command = [console_script("agmae-discover"), *options, *data, *precision, "--out", str(out_file)]
        _step(f"discover {method}", command, out_file)

    for name, method in RUNS.items():
        run_dir = run_root / name
        guidance = ["--no-guidance"] if method is None else ["--maps", str(maps_path(run_root, method)), *GUIDANCE]
        # no --data: agmae-train's demo recipe (model, batch, blr, bf16 where native) applies to the demo dataset
        train = [console_script("agmae-train"), *guidance, "--epochs", str(epochs), "--seed", str(seed),
                 "--save-every", str(epochs), "--out", str(run_dir)]
        _step(f"train {name}", train, run_dir / "train-done")
        (run_dir / "train-done").touch()
        evaluate = [console_script("agmae-eval"), "robustness", "--checkpoint", str(run_dir / "checkpoint-last.pth"),
                    "--mode", "cached", "--k", "20", *precision]
        _step(f"evaluate {name}", evaluate, run_dir / "results.json")

    attention_file = run_root / "results.json"
    _step("map quality", [console_script("agmae-eval"), "attention", "--run-dir", str(run_root)], attention_file)
    # keys look like "tokencut (maps-tokencut.h5)"; the method alone labels the table and the chart
    attention = {name.split(" (")[0]: entry for name, entry in
                 json.loads(attention_file.read_text())["attention"]["results"].items()}

    table = comparison(run_root)
    click.echo(f"\n[demo] {epochs} epochs per MAE, seed {seed}; top-1 % (k-NN k=20, linear = cached-feature probe)")
    click.echo(format_comparison(table))
    if epochs < SEPARATION_EPOCH:
        click.echo(f"[demo] {epochs} epochs show the pipeline, not the effect: guided and vanilla MAEs separate from "
                   f"epoch ~{SEPARATION_EPOCH} (docs/RESULTS.md, benchmarks/study.py)")
    click.echo("\n[demo] map quality against the ground-truth masks (demo train split)")
    for name, entry in attention.items():
        click.echo(f"  {name:14s} mean IoU {entry['mean_iou']:5.1f} %   pointing {entry['pointing']:5.1f} %")
    report = write_report(run_root, table, attention, demo_root)
    click.echo(f"\n[demo] report: {report}\n[demo] total {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
