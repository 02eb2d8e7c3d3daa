"""`make demo`: the whole pipeline on the built-in demo dataset, as a user would run it.

Builds the demo dataset, discovers oracle maps (from the masks), trains a vanilla MAE and, with the
same compute, two guided MAEs: one on the oracle maps and one on maps that need no outside weights,
TokenCut on a vanilla MAE's own tokens (the two-round pipeline). By default all three continue one 16-epoch
vanilla MAE, the first round whose tokens the own maps are cut from, for 10 epochs each (`--recipe
light-b256-continue`); other recipes train them from scratch (`--recipe light-b256-e32`: 32 epochs, own maps from a
16-epoch first round beside them). Then it evaluates them
(mean-pooled k-NN, cached linear probe, background robustness, map quality), prints one comparison
table with the guided - vanilla differences and writes `report.png`.

Every step is the stage's own CLI in a subprocess, run by the step runner it shares with the study
(agmae.cli.steps), two side by side on a 2-core machine, each on its own core: a second `make demo`
(or one after a crash) skips the steps finished with the same recipe and redoes those whose options
or inputs changed.
"""
import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import click
import numpy as np

from agmae.data.demo import ensure_demo
from agmae.data.folder import load_rgb, scan
from agmae.eval.features import FeatureSource
from agmae.eval.knn import knn_correct, paired_difference
from agmae.eval.report import format_table
from agmae.store import open_maps
from agmae.cli.steps import Step, console_script, cpu_set, execute, interrupt_on_sigterm, log_runner
from agmae.options import click_option, seed_option
from agmae.paths import agmae_home, maps_path
from agmae.train.config import RECIPES, TrainConfig

ORACLE_MAPS = ["--method", "oracle", "--patch", "8"]
# TokenCut on the vanilla MAE's final tokens, mean-centred, with the border rule (an MAE's most distinctive
# token is often background, which misleads TokenCut's seed rule), on inputs up-sampled to 96 px (a 12x12
# grid). On 1,000 demo test images of all ten classes these maps beat TokenCut on the offline ImageNet
# EfficientNet-Lite0 at 224 px (mean IoU 54.5-56.0 against 49.7; docs/CALIBRATION.md, lever 9).
MAE_TOKENCUT_MAPS = ["--method", "tokencut", "--layer", "norm", "--center", "--fg-rule", "border",
                     "--image-size", "96"]
# The same cut on the tokens the light MAE's last block (blocks.3) outputs, before the final LayerNorm, at 128 px
# (a 16x16 grid). On 1,000 test images of all ten classes, with the vanilla MAEs of seeds 0-2: mean IoU 59.1-60.6
# against 54.5-56.0 at the setting above, for about 2.5x its discovery time (docs/CALIBRATION.md, lever 9). Named
# for the light demo MAE (depth 4).
MAE_TOKENCUT_128_MAPS = ["--method", "tokencut", "--layer", "blocks.3", "--center", "--fg-rule", "border",
                         "--image-size", "128"]
# TokenCut on the offline ImageNet EfficientNet-Lite0, the 64-px images up-sampled to 224 px (448, the CNN
# default, costs 4x the time)
LITE0_TOKENCUT_MAPS = ["--method", "tokencut", "--backbone", "tf_efficientnet_lite0", "--image-size", "224"]
MAP_OPTIONS = {"oracle": ORACLE_MAPS, "mae-tokencut": MAE_TOKENCUT_MAPS, "mae-tokencut-128": MAE_TOKENCUT_128_MAPS,
               "tokencut": LITE0_TOKENCUT_MAPS}


# Discovery in bf16 where the CPU has it natively (2-3x faster there); evaluation in fp32, since bf16
# features moved a run's k-NN by up to 0.65 points (docs/CALIBRATION.md, lever 6).
DISCOVERY_PRECISION = ("--precision", "native")
# Map sources computed on the vanilla MAE of the same seed (`--backbone RUN/checkpoint-last.pth`): their discovery
# waits for the vanilla run.
OWN_MAP_SOURCES = ("mae-tokencut", "mae-tokencut-128")


@dataclass(frozen=True)
class DemoRecipe:
    """What the demo (and the study) trains: `epochs` with `warmup_epochs` of warm-up (the share kept when --epochs
    changes) at `batch_size`, `model_options` on top of agmae-train's demo preset, and the map source of the
    third run beside vanilla and oracle guidance. Own maps are cut from the vanilla run, or, with
    `first_round_epochs`, from a vanilla MAE of that many epochs of the same recipe (a short first round: a
    32-epoch vanilla MAE's maps are worse than a 16-epoch one's). With `continue_first_round`, every compared run
    starts from the first round's final weights (agmae-train --init-from) with a schedule of its own over `epochs`,
    so the first round's epochs are trained once, not three times. `headline`: the COLUMNS entry the demo's verdict
    judges; `study`: where the study of this recipe gives the spread over seeds."""
    epochs: int
    warmup_epochs: float
    batch_size: int
    model_options: tuple[str, ...]
    offline_maps: str
    summary: str
    first_round_epochs: int | None = None
    headline: str = "k-NN original"
    study: str = "docs/RESULTS.md"
    continue_first_round: bool = False

    def __post_init__(self):
        if self.continue_first_round and self.first_round_epochs is None:
            raise ValueError("a recipe that continues its first round needs first_round_epochs")

    def warmup(self, epochs: int) -> float:
        return round(self.warmup_epochs * epochs / self.epochs, 4)

    def train_options(self, epochs: int) -> list[str]:
        """agmae-train's options for `epochs` epochs of this recipe (model, schedule, batch)."""
        return [*self.model_options, "--epochs", str(epochs), "--warmup-epochs", f"{self.warmup(epochs):g}",
                "--batch-size", str(self.batch_size)]

    def runs(self) -> dict:
        """{run name: the map source that guides it (None: vanilla)}"""
        return {"vanilla": None, "guided-oracle": "oracle", f"guided-{self.offline_maps}": self.offline_maps}

    def first_round(self, epochs: int) -> int | None:
        """Epochs of the vanilla MAE whose tokens the own maps are cut from (and whose weights the compared runs
        continue, with `continue_first_round`) when the compared runs train `epochs`; None: the own maps are cut
        from the vanilla run itself."""
        if self.continue_first_round or self.first_round_epochs != epochs:
            return self.first_round_epochs
        return None

    def epochs_text(self, epochs: int) -> str:
        """How long each compared MAE trains, as the demo's table heading says it."""
        if self.continue_first_round:
            return f"{self.first_round_epochs} epochs of a shared vanilla first round, then {epochs} epochs each"
        return f"{epochs} epochs per MAE"


# Lever 8 of docs/CALIBRATION.md: the light demo MAE at batch 256 (a quarter of light's optimizer steps), where
# vanilla stalls on the background and oracle guidance gained on each of seeds 0-2 (+2.62, +1.68, +0.64
# mean-pooled k-NN); own maps +1.39, +0.10 and -0.01. agmae-train's own demo recipe.
LIGHT_B256 = DemoRecipe(RECIPES["demo"]["epochs"], RECIPES["demo"]["warmup_epochs"], RECIPES["demo"]["batch_size"],
                        (), "mae-tokencut",
                        "agmae-train's demo recipe (the light demo MAE, batch 256), own maps from the vanilla MAE (no "
                        "outside weights); about 16-17 min; oracle guidance won on seeds 0-2, own maps tied vanilla on "
                        "seed 2", study="docs/RESULTS.md#the-light-b256-recipe-16-epochs-5-seeds")
DEMO_RECIPES = {
    "light-b256": LIGHT_B256,
    # Lever 9 of docs/CALIBRATION.md: lever 8's runs with better own maps (IoU 60-62 against 56-57); vanilla and
    # oracle guidance train exactly as in light-b256. The own maps gained +1.09, +0.36 and -0.20 on seeds 0-2.
    "light-b256-maps128": replace(LIGHT_B256, offline_maps="mae-tokencut-128",
                                  summary="light-b256 with own maps cut from the vanilla MAE's last block at 128 px "
                                          "(IoU 61 against 56, yet no larger gain: below vanilla on seed 2); "
                                          "about 21 min"),
    # Lever 12 of docs/CALIBRATION.md: lever 8's runs for 32 epochs, own maps from a 16-epoch first round (lever 9's
    # 128-px last-block maps, IoU 60-62, against 47-48 cut from the 32-epoch vanilla MAE), judged on unseen
    # backgrounds (mixed-rand k-NN, chosen in lever 11 before its runs).
    "light-b256-e32": replace(LIGHT_B256, epochs=32, warmup_epochs=2 * LIGHT_B256.warmup_epochs,
                              offline_maps="mae-tokencut-128", first_round_epochs=LIGHT_B256.epochs,
                              headline="k-NN mixed-rand", study="docs/RESULTS.md",
                              summary="light-b256 for 32 epochs, own maps from a 16-epoch vanilla MAE's last block "
                                      "(a short first round), judged on mixed-rand k-NN: both guided runs beat "
                                      "vanilla there on each of seeds 0-5; about 34 min"),
    # Levers 13 and 14 of docs/CALIBRATION.md: light-b256's 16-epoch vanilla MAE as one first round, which every
    # compared run continues for 10 epochs (agmae-train --init-from) with a schedule of its own (10 epochs: what the
    # 20-minute budget holds); own maps as in light-b256-e32, cut from that first round; judged on mixed-rand k-NN.
    # Both guided runs beat vanilla there on each of seeds 0-2: oracle +0.83, +0.74, +0.47; own maps +0.65, +0.76,
    # +0.63 (14-17.5 min); its 5-seed study +0.87 and +0.80, each on 5/5 seeds. The default.
    "light-b256-continue": replace(LIGHT_B256, epochs=10, warmup_epochs=LIGHT_B256.warmup(10),
                                   offline_maps="mae-tokencut-128", first_round_epochs=LIGHT_B256.epochs,
                                   continue_first_round=True, headline="k-NN mixed-rand",
                                   study="docs/continue/RESULTS.md",
                                   summary="a 16-epoch vanilla MAE (light-b256's) continued for 10 epochs by each "
                                           "compared run, own maps from that first round's last block, judged on "
                                           "mixed-rand k-NN: both guided runs beat vanilla there on each of seeds "
                                           "0-4 of its study, by 0.5-1.2 points; about 14-18 min"),
    # Levers 3-6: the same model at batch 64 for 18 epochs, the demo's recipe until lever 8; oracle guidance
    # +1.65, -0.96 and +0.43 on seeds 0-2.
    "light": DemoRecipe(18, 6.0, 64, (), "mae-tokencut",
                        "the light demo MAE at batch 64, own maps from the vanilla MAE; about 16 min, and both "
                        "guided runs lost on seed 1",
                        study="docs/RESULTS.md#the-light-recipe-at-batch-64-18-epochs-5-seeds"),
    # The earlier study's recipe (docs/RESULTS-earlier-recipe.md), on which both kinds of guided MAE beat
    # vanilla on mean-pooled k-NN on each of its 3 seeds (2,000 test images): the 192-wide demo MAE, 20 epochs at
    # batch 256.
    "wide": DemoRecipe(20, 4 / 3, 256, ("--embed-dim", "192", "--depth", "6", "--num-heads", "3",
                                        "--decoder-embed-dim", "128", "--decoder-depth", "2",
                                        "--decoder-num-heads", "4"), "tokencut",
                       "the 192-wide demo MAE of the earlier study, batch 256, maps of TokenCut on the offline "
                       "EfficientNet-Lite0; about 23-26 min, and guidance did not win on every seed either",
                       study="docs/RESULTS.md#the-earlier-recipe-the-192-wide-demo-mae-20-epochs-3-seeds"),
}
DEFAULT_RECIPE = "light-b256-continue"
# Mean-pooled features: the headline metric, chosen from the 20-epoch study's signal-to-noise before any
# calibration run (docs/CALIBRATION.md); CLS k-NN moved 3.5 points between vanilla seeds there. A recipe's
# `headline` names one of the k-NN COLUMNS (original by default).
EVALUATION = "robustness[pool=mean]"
KNN_K = 20
COLUMNS = {
    "k-NN original": ("splits", "original", "knn_top1"),
    "k-NN mixed-rand": ("splits", "mixed-rand", "knn_top1"),
    "k-NN only-fg": ("splits", "only-fg", "knn_top1"),
    "linear original": ("splits", "original", "linear_top1"),
    "linear mixed-rand": ("splits", "mixed-rand", "linear_top1"),
}


def run_directory(run_root: Path, name: str, train: Step) -> Path:
    """RUN_ROOT/runs/NAME-<digest of the training recipe>: a run made another way gets a directory of
    its own, since agmae-train resumes (or refuses) whatever checkpoint its directory holds."""
    digest = hashlib.sha256(json.dumps(train.recipe(), sort_keys=True).encode()).hexdigest()[:8]
    return run_root / "runs" / f"{name}-{digest}"


def plan(run_root: Path, demo_root: Path, epochs: int, seed: int, recipe: str = DEFAULT_RECIPE,
         keep_every: int = 0) -> tuple[list, dict]:
    """The demo's steps in the order the runner starts them when several are ready, and {run name: run
    directory}. Vanilla and guided-oracle train side by side; own maps (mae-tokencut) are discovered once the
    vanilla MAE is done, and their run trains beside the first evaluations. With a recipe's short first round, the
    own maps come from a vanilla run of its `first_round_epochs` instead ("vanilla-first-round", trained beside
    vanilla, its maps on one core), and guided-oracle waits for a free core. A recipe that continues its first
    round trains that round first, on both cores; then the own maps on one core beside the vanilla continuation,
    and the guided continuations as cores free up. `keep_every` > 0 keeps every run's
    checkpoint of every this many epochs (for benchmarks/learning_curve.py); it leaves the runs' identities as
    they are."""
    demo_recipe = DEMO_RECIPES[recipe]
    data = ["--data", str(demo_root)]
    logs = run_root / "logs"

    def discover(method: str, options: list, needs=(), all_cpus=False) -> Step:
        out_file = maps_path(run_root, method)
        return Step(f"discover {method}", [console_script("agmae-discover"), *options, *data,
                                           *DISCOVERY_PRECISION, "--out", str(out_file)],
                    out_file.with_suffix(".done.json"), needs, kind="discover", log=logs / f"discover-{method}.log",
                    stale_output=out_file, all_cpus=all_cpus)

    def train(name: str, maps: Step | None, run_epochs: int = epochs, init: tuple | None = None,
              all_cpus: bool = False) -> tuple[Step, Path]:
        # no --data: agmae-train's demo recipe (model, batch, blr, native bf16) applies to the demo dataset;
        # guided runs take the trainer's default tau schedule, chosen by the study (docs/RESULTS.md).
        # init: (training step, run directory) of the run whose final weights this one starts from.
        argv = [console_script("agmae-train"),
                *(["--no-guidance"] if maps is None else ["--maps", str(maps.stale_output)]),
                *(["--init-from", str(init[1] / "checkpoint-last.pth")] if init else []),
                *demo_recipe.train_options(run_epochs), "--seed", str(seed),
                "--save-every", "1",  # a killed demo resumes per epoch
                *(["--keep-every", str(keep_every)] if keep_every else [])]
        needs = tuple(step for step in (maps, init and init[0]) if step is not None)
        run_dir = run_directory(run_root, name, Step(name, argv, Path(), needs))
        return Step(f"train {name}", [*argv, "--out", str(run_dir)], run_dir / "train.done.json", needs,
                    kind="train", log=logs / f"train-{name}.log", all_cpus=all_cpus), run_dir

    def evaluate(name: str, trained: Step, run_dir: Path) -> Step:
        # clean-fg (k-NN against the training objects on black) is the study's diagnostic, not the demo's
        argv = [console_script("agmae-eval"), "robustness", "--checkpoint", str(run_dir / "checkpoint-last.pth"),
                "--pool", "mean", "--k", str(KNN_K), "--no-clean-fg", "--precision", "fp32"]
        return Step(f"evaluate {name}", argv, run_dir / "eval.done.json", (trained,), kind="eval",
                    log=logs / f"evaluate-{name}.log")

    runs = demo_recipe.runs()
    first_round = demo_recipe.first_round(epochs)
    continues = demo_recipe.continue_first_round
    # a first round that every run continues has no other training beside it: it takes both cores
    first_round_run = train("vanilla-first-round", None, first_round, all_cpus=continues) if first_round else None
    init = first_round_run if continues else None
    vanilla, vanilla_dir = train("vanilla", None, init=init)
    map_maker, map_maker_dir = first_round_run or (vanilla, vanilla_dir)
    own_backbone = ["--backbone", str(map_maker_dir / "checkpoint-last.pth")]
    # Own maps cut from the vanilla run lie on the critical path (vanilla -> its maps -> the third training), the
    # evaluations ready beside them do not: they take both cores, once guided-oracle's training has finished too.
    # Cut from a first round, they run on one core beside the vanilla training.
    maps = {source: discover(source, [*MAP_OPTIONS[source], *own_backbone], needs=(map_maker,),
                             all_cpus=first_round is None)
            if source in OWN_MAP_SOURCES else discover(source, MAP_OPTIONS[source])
            for source in filter(None, runs.values())}
    trained = {"vanilla": (vanilla, vanilla_dir)}
    trained.update({name: train(name, maps[source], init=init) for name, source in runs.items()
                    if source is not None})
    steps = [maps["oracle"], vanilla, *([map_maker] if first_round else []),
             *(maps[source] for source in maps if source != "oracle"),
             *(trained[name][0] for name in runs if name != "vanilla")]
    steps += [evaluate(name, *trained[name]) for name in runs]
    steps.append(Step("map quality", [console_script("agmae-eval"), "attention", "--run-dir", str(run_root)],
                      run_root / "attention.done.json", tuple(maps.values()), kind="eval",
                      log=logs / "map-quality.log"))
    return steps, {name: run_dir for name, (_, run_dir) in trained.items()}


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
        table[name] = {column: nested(results, (EVALUATION, "results", *path)) for column, path in COLUMNS.items()}
    return table


def differences(table: dict) -> dict:
    """{guided run: {column: guided - vanilla}} (None where either is missing)."""
    vanilla = table["vanilla"]
    return {name: {column: None if row[column] is None or vanilla[column] is None else row[column] - vanilla[column]
                   for column in COLUMNS}
            for name, row in table.items() if name != "vanilla"}


def headline_errors(run_dirs: dict, demo_root: Path, headline: str) -> dict:
    """{guided run: standard error of its difference to vanilla in the k-NN column `headline` over the choice of
    test images}, from each run's per-image k-NN hits on the features its evaluation cached (no extraction)."""
    _, split, _ = COLUMNS[headline]
    hits = {}
    for name, run_dir in run_dirs.items():
        source = FeatureSource(run_dir / "checkpoint-last.pth", pool="mean", precision="fp32", progress=False)
        bank, queries = source.features(demo_root / "train"), source.features(demo_root / split)
        hits[name] = knn_correct(bank, queries, k=KNN_K)
    return {name: paired_difference(hits[name], hits["vanilla"])["standard_error"] for name in hits
            if name != "vanilla"}


def verdict(table: dict, seed: int, errors: dict, headline: str) -> list[str]:
    """One plain line per guided run: did it beat vanilla on the headline metric (the recipe's `headline` column)
    on this seed, and is the difference beyond two standard errors of the test sampling (`errors`, from
    `headline_errors`)."""
    lines = []
    for name, delta in differences(table).items():
        gain = delta[headline]
        if gain is None:
            lines.append(f"{name}: no {headline} result")
            continue
        noise = (f"; standard error {errors[name]:.2f}, so "
                 + ("beyond the test sampling" if abs(gain) > 2 * errors[name]
                    else "within two standard errors: this seed alone does not decide"))
        if gain > 0:
            lines.append(f"{name} beat vanilla on {headline} (mean-pooled, the headline metric) by {gain:+.2f} "
                         f"points on seed {seed}{noise}")
        else:
            lines.append(f"{name} did NOT beat vanilla on {headline} (mean-pooled, the headline metric) on seed "
                         f"{seed}: {gain:+.2f} points{noise}")
    return lines


def store_label(result_name: str) -> str:
    """'tokencut (maps-mae-tokencut.h5)' -> 'mae-tokencut': the map source, as the runs name it."""
    if "(maps-" in result_name:
        return result_name.split("(maps-")[1].removesuffix(".h5)")
    return result_name


def write_report(run_root: Path, table: dict, attention: dict, demo_root: Path, recipe: str) -> Path:
    """report.png: grouped bars of the comparison table and the map quality, then demo images with each
    map source's maps."""
    import matplotlib  # the demo extra: imported only where a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = [source for source in DEMO_RECIPES[recipe].runs().values()
               if source and maps_path(run_root, source).exists()]
    fig = plt.figure(figsize=(14, 4 + 1.6 * len(sources)))
    grid = fig.add_gridspec(1 + len(sources), 8, height_ratios=[2.5] + [1] * len(sources), hspace=0.35)
    bars = fig.add_subplot(grid[0, :5])  # column 5 left free for the quality chart's labels
    columns = list(COLUMNS)
    width = 0.8 / len(table)
    for i, (name, row) in enumerate(table.items()):
        values = [row[c] if row[c] is not None else 0.0 for c in columns]
        bars.bar(np.arange(len(columns)) + i * width, values, width, label=name)
    bars.set_xticks(np.arange(len(columns)) + width * (len(table) - 1) / 2, columns, fontsize=8)
    bars.set_ylabel("top-1 % (mean-pooled features)")
    bars.legend(fontsize=8)
    bars.set_title(f"vanilla vs attention-guided MAE on the demo dataset (recipe {recipe}, one seed)")
    quality = fig.add_subplot(grid[0, 6:])
    names = list(attention)
    quality.barh(names, [attention[n]["mean_iou"] for n in names])
    quality.set_title("map mean IoU vs masks (%)", fontsize=9)
    quality.tick_params(labelsize=8)

    index = scan(demo_root / "train")
    shown = np.linspace(0, len(index) - 1, 8).astype(int)
    for row, source in enumerate(sources, start=1):
        store = open_maps(maps_path(run_root, source))
        for col, i in enumerate(shown):
            ax = fig.add_subplot(grid[row, col])
            image = np.asarray(load_rgb(index.path(i)))
            ax.imshow(image)
            ax.imshow(np.asarray(store.maps[i], dtype=np.float32), cmap="jet", alpha=0.45,
                      extent=(0, image.shape[1], image.shape[0], 0), interpolation="bilinear")
            ax.set_axis_off()
            if col == 0:
                ax.set_title(f"{source} maps", fontsize=8, loc="left")
    out = run_root / "report.png"
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return out


def format_comparison(table: dict) -> str:
    """The runs' scores, then one row per guided run with its difference to vanilla."""
    columns = list(COLUMNS)
    rows = [[name, *(row[c] for c in columns)] for name, row in table.items()]
    rows += [[f"{name} - vanilla", *(delta[c] for c in columns)] for name, delta in differences(table).items()]
    return format_table(["run", *columns], rows)


def step_times(steps: list) -> str:
    """Recorded seconds per step, for the timing lines the README quotes."""
    return "\n".join(f"  {step.id:32s} {step.seconds():7.1f} s" for step in steps if step.done())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--recipe", type=click.Choice(list(DEMO_RECIPES)), default=DEFAULT_RECIPE, show_default=True,
              help="What the demo trains. " + "; ".join(f"{name}: {r.summary}, {r.epochs} epochs"
                                                        for name, r in DEMO_RECIPES.items())
                   + " (on 2 CPU cores with native bf16; docs/CALIBRATION.md).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Run root for the maps, the runs, the logs and report.png. [default: AGMAE_HOME/demo-run/RECIPE]")
@click.option("--epochs", type=click.IntRange(min=1),
              help="Pre-training epochs of every compared MAE (equal compute for vanilla and guided; the warm-up "
                   "keeps its share of them; a recipe's first round keeps its own). [default: the recipe's]")
@click_option("seed", seed_option("Training seed of every run."))
@click_option("keep_every", TrainConfig.__dataclass_fields__["keep_every"])  # agmae-train's own definition
def main(recipe, out, epochs, seed, keep_every):
    """Run discover -> train -> eval on the demo dataset and print the comparison."""
    started = time.time()
    epochs = epochs or DEMO_RECIPES[recipe].epochs
    run_root = out or agmae_home() / "demo-run" / recipe
    run_root.mkdir(parents=True, exist_ok=True)
    click.echo("[demo] demo dataset (built once into AGMAE_HOME)")
    demo_root = ensure_demo()
    click.echo(f"[demo] dataset ready after {time.time() - started:.0f} s; step logs in {run_root / 'logs'}")
    steps, run_dirs = plan(run_root, demo_root, epochs, seed, recipe, keep_every)
    interrupt_on_sigterm()
    try:
        failed = execute(steps, log_runner, echo=lambda line: click.echo(f"[demo] {line}"), cpus=cpu_set())
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; the running steps were stopped and resume on the next "
                                   "`make demo`") from None
    if failed:
        raise click.ClickException(f"{len(failed)} demo steps failed or were skipped (first: {failed[0]}); "
                                   "fix the cause shown above and re-run `make demo` to continue")
    attention = {store_label(name): entry for name, entry in
                 json.loads((run_root / "results.json").read_text())["attention"]["results"].items()}

    table = comparison(run_dirs)
    click.echo(f"\n[demo] recipe {recipe}, {DEMO_RECIPES[recipe].epochs_text(epochs)}, seed {seed}; top-1 % of "
               f"mean-pooled features (k-NN k={KNN_K}, linear = cached-feature probe)")
    click.echo(format_comparison(table))
    headline = DEMO_RECIPES[recipe].headline
    for line in verdict(table, seed, headline_errors(run_dirs, demo_root, headline), headline):
        click.echo(f"[demo] {line}")
    click.echo(f"[demo] one seed is one draw: the spread over seeds, with paired tests, is in "
               f"{DEMO_RECIPES[recipe].study} (benchmarks/study.py)")
    click.echo("\n[demo] map quality against the ground-truth masks (demo train split)")
    width = max(map(len, attention))
    for name, entry in attention.items():
        click.echo(f"  {name:{width}s}  mean IoU {entry['mean_iou']:5.1f} %   pointing {entry['pointing']:5.1f} %")
    report = write_report(run_root, table, attention, demo_root, recipe)
    click.echo(f"\n[demo] seconds per step (this invocation's steps; earlier ones were reused)\n{step_times(steps)}")
    click.echo(f"[demo] report: {report}\n[demo] total {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
