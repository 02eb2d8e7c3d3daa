"""The one planner of the demo and the study: rows x seeds of a recipe, as steps of the runner (experiments.steps),
each a stage's own command line, and the one run identity that names their run directories.

A run directory is named by what it trains (`run_name`), so the runs of the demo and of the study that train the
same thing are one run: in the same `--out`, a `make demo` of seed 0 is the study's seed 0 of the demo's rows.
"""
import json
import os
import shlex
import sys
from dataclasses import dataclass, field, replace
from hashlib import sha256
from pathlib import Path

import click

from agmae.data.demo import demo_name
from agmae.data.folder import split_folder
from agmae.eval.finetune import RECIPES as FINETUNE_RECIPES
from agmae.eval.knn import HEADLINE_K
from agmae.hardware import resolve_precision
from agmae.paths import agmae_home

from experiments.recipes import (DEFAULT_RECIPE, DISCOVERY_PRECISION, EVAL_PRECISION, EVALS, GUIDANCE_DEFAULTS, MAPS,
                                 OWN_MAP_SOURCES, RECIPES)
from experiments.steps import Step, console_script

REPO = Path(__file__).resolve().parents[1]
DEMO_SEED = 0  # the demo dataset's own seed (its images), not a training seed
# Seed tiers: MAIN rows get --seeds seeds, CLAIM rows (the paper's fine-tuning and masking claims)
# --claim-seeds, ABLATION rows --ablation-seeds.
MAIN, CLAIM, ABLATION = "main", "claim", "ablation"


@dataclass(frozen=True)
class Row:
    name: str
    maps: str | None  # a MAPS key; None = vanilla MAE
    guidance: dict = field(default_factory=dict)  # overrides of GUIDANCE_DEFAULTS
    correlation: float = 0.0
    seeds: str = MAIN  # MAIN, CLAIM or ABLATION
    note: str = ""
    masking: str = "random"  # agmae-train --masking
    weight_loss: bool = True  # False: the maps only choose the masked patches (--no-weight-loss)
    versus: str | None = None  # the row this one varies in one respect: the report pairs them seed by seed too
    finetune: str | None = None  # a seed tier (CLAIM, ABLATION): its seeds are also fine-tuned (agmae-eval
    # finetune, for half the pre-training epochs), which costs more than every other protocol together


def _tau(schedule, start, end=None):
    return {"tau-schedule": schedule, "tau-start": start, **({"tau-end": end} if end is not None else {})}


ROWS = [
    Row("vanilla", None, note="MAE, uniform weights (--no-guidance)", finetune=CLAIM),
    Row("guided-oracle", "oracle", note="ground-truth masks", finetune=CLAIM),
    Row("guided-mae-tokencut-128", "mae-tokencut-128",
        note="TokenCut on the last block of the same seed's vanilla MAE, 128 px (two rounds)", finetune=ABLATION),
    Row("guided-dino-random", "dino-random", note="negative control: DINO attention of a random ViT-S/8"),
    # The paper's masking ablation: the map chooses the masked patches (AttMask's most-attended rule), instead of
    # or besides weighting the loss.
    Row("mask-oracle", "oracle", masking="attention-high", weight_loss=False, seeds=CLAIM, note="masking only",
        versus="guided-oracle"),
    Row("loss+mask-oracle", "oracle", masking="attention-high", seeds=CLAIM, note="guided loss and masking",
        versus="guided-oracle"),
    Row("mask-mae-tokencut-128", "mae-tokencut-128", masking="attention-high", weight_loss=False, seeds=CLAIM,
        note="masking only", versus="guided-mae-tokencut-128"),
    Row("loss+mask-mae-tokencut-128", "mae-tokencut-128", masking="attention-high", seeds=CLAIM,
        note="guided loss and masking", versus="guided-mae-tokencut-128"),
    Row("mask-sampled-oracle", "oracle", masking="attention-sampled", weight_loss=False, seeds=ABLATION,
        note="masking only, sampled by the map", versus="guided-oracle"),
    Row("guided-tokencut", "tokencut", seeds=ABLATION, note="TokenCut on EfficientNet-Lite0"),
    Row("guided-gradcam", "gradcam", seeds=ABLATION, note="Grad-CAM on EfficientNet-Lite0"),
    Row("tau-const-0.25", "oracle", _tau("constant", 0.25), seeds=ABLATION),
    Row("tau-const-0.5", "oracle", _tau("constant", 0.5), seeds=ABLATION),
    Row("tau-const-1", "oracle", _tau("constant", 1.0), seeds=ABLATION),
    Row("tau-const-2", "oracle", _tau("constant", 2.0), seeds=ABLATION),
    Row("tau-cos-1-0.5", "oracle", _tau("cosine", 1.0, 0.5), seeds=ABLATION),
    Row("tau-cos-0.5-1", "oracle", _tau("cosine", 0.5, 1.0), seeds=ABLATION),
    Row("wn-batch", "oracle", {"weight-norm": "batch"}, seeds=ABLATION),
    Row("wn-sample", "oracle", {"weight-norm": "sample"}, seeds=ABLATION),
    Row("wn-none", "oracle", {"weight-norm": "none"}, seeds=ABLATION, note="paper's γΣmwe/Σm, γ = 1"),
    Row("p0.8-vanilla", None, correlation=0.8, seeds=ABLATION),
    Row("p0.8-guided-oracle", "oracle", correlation=0.8, seeds=ABLATION),
    Row("p0.8-guided-mae-tokencut-128", "mae-tokencut-128", correlation=0.8, seeds=ABLATION),
]
ROW_NAMES = [row.name for row in ROWS]
QUICK_ROWS = ("vanilla", "guided-oracle")

# Evaluations every run of the study gets; fine-tuning only the runs of rows that ask for it.
COMMON_EVALS = ("knn", "knn-mean", "linear", "robustness", "robustness-mean", "segment")
# Kept checkpoints per study run (outside the run's identity), for experiments/learning_curve.py.
KEEP_EVERY = 4

# Seconds per step for 10k training images on one core of a 2-core CPU with native bf16, only for the first ETA;
# the ETA rescales them by the measured/estimated ratio of the steps done. A CPU without native bf16 trains about
# 3x slower.
TRAIN_EPOCH_SECONDS = 26.0
STARTUP_SECONDS = 5.0
DISCOVER_SECONDS = {"oracle": 22.0, "mae-tokencut-128": 190.0, "tokencut": 200.0, "gradcam": 450.0,
                    "dino-random": 400.0}
EVAL_SECONDS = {"knn": 60.0, "knn-mean": 55.0, "linear": 9.0, "robustness": 85.0, "robustness-mean": 70.0,
                "finetune": 650.0, "segment": 90.0}
QUALITY_SECONDS = 10.0
DATASET_SECONDS = 22.0

# Every row trains with a recipe (its epochs and batch unless given) and is evaluated on the demo dataset's 10,000
# images per test split.
FULL_DEFAULTS = dict(recipe=DEFAULT_RECIPE, epochs=None, seeds=5, claim_seeds=3, ablation_seeds=1, n_train=10000,
                     n_test=10000, batch_size=None, rows=",".join(ROW_NAMES))
# --quick: the recipe that trains from scratch, so that its two rows need no first round
QUICK_DEFAULTS = dict(recipe="light-b256-e32", epochs=1, seeds=1, claim_seeds=1, ablation_seeds=1, n_train=240,
                      n_test=60, batch_size=64, rows=",".join(QUICK_ROWS))


def default_out() -> Path:
    """Where the demo and the study keep their datasets' step markers, map stores, runs and logs."""
    return agmae_home() / "experiments"


def default_docs(recipe: str) -> Path:
    return REPO / "docs" / "results" / recipe


@dataclass(frozen=True)
class Config:
    recipe: str  # a RECIPES name
    epochs: int
    seeds: int
    claim_seeds: int
    ablation_seeds: int
    n_train: int
    n_test: int
    batch_size: int
    rows: tuple
    out: Path
    docs: Path
    precision: str
    record: Path | None = None  # results.json of an earlier run of this plan (`--record`)
    first_seed: int = 0  # the seeds of a tier of n seeds: first_seed .. first_seed + n - 1
    evaluations: tuple = COMMON_EVALS  # EVALS names every run gets
    keep_every: int = KEEP_EVERY  # agmae-train --keep-every (not part of a run's identity)
    map_quality: bool = False  # also score each seed's map stores against the masks (agmae-eval attention)
    visualize: bool = False  # also draw each seed's runs' reconstructions and attention side by side

    def seeds_in(self, tier: str) -> list[int]:
        count = {MAIN: self.seeds, CLAIM: self.claim_seeds, ABLATION: self.ablation_seeds}[tier]
        return list(range(self.first_seed, self.first_seed + count))

    def seeds_of(self, row: Row) -> list[int]:
        return self.seeds_in(row.seeds)

    def warmup_epochs(self) -> float:
        return RECIPES[self.recipe].warmup(self.epochs)

    def describe(self) -> dict:
        """The plan options as the report records them (results.json's `plan`)."""
        recipe = RECIPES[self.recipe]
        return dict(recipe=self.recipe, epochs=self.epochs, warmup_epochs=self.warmup_epochs(), seeds=self.seeds,
                    claim_seeds=self.claim_seeds, ablation_seeds=self.ablation_seeds, n_train=self.n_train,
                    n_test=self.n_test, batch_size=self.batch_size, precision=self.precision, model=recipe.model,
                    blr=recipe.blr, knn_k=HEADLINE_K,
                    continues_epochs=recipe.first_round_epochs if recipe.continue_first_round else None)

    def command(self) -> str:
        """The study command line that reproduces this plan, every plan option explicit."""
        parts = [_shown(Path(sys.executable)), "-m", "experiments.study", "--recipe", self.recipe,
                 "--epochs", self.epochs, "--seeds", self.seeds, "--claim-seeds", self.claim_seeds,
                 "--ablation-seeds", self.ablation_seeds, "--n-train", self.n_train, "--n-test", self.n_test,
                 "--batch-size", self.batch_size, "--rows", ",".join(self.rows), "--precision", self.precision]
        if self.out != default_out():
            parts += ["--out", self.out]
        if self.docs != default_docs(self.recipe):
            parts += ["--docs", _shown(self.docs)]
        if self.record:
            parts += ["--record", _shown(self.record)]
        env = f"AGMAE_HOME={shlex.quote(os.environ['AGMAE_HOME'])} " if "AGMAE_HOME" in os.environ else ""
        return env + shlex.join(str(part) for part in parts)


def _shown(path: Path) -> Path:
    """A path as the docs print it: relative to the repository when inside it, so the command works in any clone."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


@dataclass
class Run:
    """One training run (a configuration and a seed) and its evaluations, shared by the rows that need it."""
    run_dir: Path
    train: Step
    evals: dict  # step name -> Step
    upstream: list  # the dataset, discovery and first-round steps it needs

    def steps(self) -> list:
        return [*self.upstream, self.train, *self.evals.values()]

    def complete(self) -> bool:
        return all(step.done() for step in [self.train, *self.evals.values()])


@dataclass
class Quality:
    """The map-quality step of one seed and dataset: the stores it scores ({map source: store}) and where its
    results.json is; and the step that draws the runs' reconstructions and attention (agmae-eval visualize) into
    `figure`."""
    step: Step | None
    stores: dict
    run_dir: Path
    figure: Step | None = None


@dataclass(frozen=True)
class Record:
    """The row-seeds an earlier run of the same plan finished (on another machine, or before its cache was
    lost) and this machine has not, read from the results.json it wrote: reported from it, not trained again."""
    path: Path
    summary: dict  # that results.json
    metrics: dict  # (row name, seed) -> {metric: value}
    runs: dict  # (row name, seed) -> its run entry (run directory, commands, `recorded_in` if it took it in turn)

    def source(self) -> str:
        return f"{_shown(self.path)} (generated {self.summary['generated']})"

    def entry(self, key: tuple) -> dict:
        """The run entry of a row-seed taken from this record, naming where its numbers were measured: this
        record, or the record it took them from."""
        return {"recorded_in": self.source(), **self.runs[key]}

    def step_seconds(self) -> dict:
        """Step seconds per source (this record's own steps, and its records'), keyed like `recorded_in`."""
        return {**self.summary.get("recorded_step_seconds", {}), self.source(): self.summary["wall_seconds"]["total"]}


NO_RECORD = Record(Path(), {}, {}, {})

# Plan options in which a record may differ from the plan taking its row-seeds: they add or drop row-seeds
# and change none
SEED_COUNTS = ("seeds", "claim_seeds", "ablation_seeds")


@dataclass
class Plan:
    config: Config
    rows: list  # Row
    runs: dict  # (row name, seed) -> Run
    steps: list  # every Step once, in execution order; none that only row-seeds taken from the record need
    record: Record = NO_RECORD
    quality: dict = field(default_factory=dict)  # (dataset name, seed) -> Quality


def _slug(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def training_options(config: Config, row: Row, seed: int) -> tuple[str, list]:
    """A short name of the row's training configuration and its agmae-train options (without paths)."""
    recipe = RECIPES[config.recipe]
    options = ["--model", recipe.model, *replace(recipe, batch_size=config.batch_size).train_options(config.epochs),
               "--blr", _slug(recipe.blr), "--precision", config.precision, "--seed", str(seed)]
    if row.maps is None:
        return "vanilla", ["--no-guidance", *options]
    guidance = {**GUIDANCE_DEFAULTS, **row.guidance}
    if guidance["tau-schedule"] == "constant":
        guidance.pop("tau-end")
    masking = [] if row.masking == "random" else ["--masking", row.masking]
    masking += [] if row.weight_loss else ["--no-weight-loss"]
    name = "-".join([row.maps, *(_slug(v) for v in guidance.values()), *(m.lstrip("-") for m in masking)])
    return name, [*(arg for key, value in guidance.items() for arg in (f"--{key}", _slug(value))), *masking,
                  *options]


def run_name(config: Config, row: Row, seed: int, dataset: str, first_round: int | None = None,
             init_from: str | None = None) -> str:
    """The run identity: `<configuration>-e<epochs>-s<seed>-<digest>`, the digest a hash of what the run trains on
    and how (the dataset's name, the maps' discovery options, the agmae-train options, the epochs of the first round
    its own maps are cut from, the name of the run it continues), never of a path, so moving AGMAE_HOME or --out
    keeps the names. Runs with one name are one run, whichever rows, demo or study plan them."""
    name, options = training_options(config, row, seed)
    identity = json.dumps({"dataset": dataset, "maps": MAPS.get(row.maps), "train": options,
                           **({"first_round": first_round} if first_round else {}),
                           **({"init_from": init_from} if init_from else {})}, sort_keys=True)
    epochs = f"{RECIPES[config.recipe].first_round_epochs}+{config.epochs}" if init_from else config.epochs
    return f"{name}-e{epochs}-s{seed}-{sha256(identity.encode()).hexdigest()[:8]}"


def require_splits(root, splits) -> None:
    """Refuse, before any work, a dataset root that lacks one of `splits`, with split_folder's one-line error (which
    names the splits ROOT has) as a click usage error."""
    try:
        for split in splits:
            split_folder(root, split, option="--test-split")
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--data / --test-split") from None


def dataset_root(config: Config, correlation: float = 0.0) -> Path:
    """The demo dataset of the plan's size and this background correlation, where ensure_demo builds it."""
    return agmae_home() / "demo" / demo_name(correlation, DEMO_SEED, config.n_train, config.n_test)


def _dataset_step(config: Config, correlation: float) -> tuple[Step, Path]:
    """The step that builds the demo dataset (once, into AGMAE_HOME/demo/, where ensure_demo puts it), and its root."""
    root = dataset_root(config, correlation)
    variant = root.name
    folder = config.out / "data"
    step = Step(id=f"dataset {variant}", kind="dataset",
                argv=[sys.executable, "-c", "import sys; from agmae.data.demo import ensure_demo; "
                      "print(ensure_demo(float(sys.argv[1]), *map(int, sys.argv[2:])))",
                      str(correlation), str(DEMO_SEED), str(config.n_train), str(config.n_test)],
                log=folder / f"{variant}.log", marker=folder / f"{variant}.done.json",
                estimate=DATASET_SECONDS * config.n_train / 10000)
    return step, root


def _discover_step(config: Config, maps: str, dataset: Step, root: Path, maker: Step | None = None,
                   all_cpus: bool = False) -> Step:
    """The step that computes the map store of source `maps` on a dataset's train split (`stale_output`). An
    OWN_MAP_SOURCES store takes the `maker` training step's final checkpoint as its backbone."""
    folder = config.out / "maps" / root.name
    name = maps if maker is None else f"{maps}-{maker.run_dir.name}"
    store = folder / f"{name}.h5"
    backbone = [] if maker is None else ["--backbone", str(maker.run_dir / "checkpoint-last.pth")]
    return Step(id=f"discover {root.name}/{name}", kind="discover",
                argv=[console_script("agmae-discover"), *MAPS[maps], *backbone, *DISCOVERY_PRECISION,
                      "--data", str(root), "--out", str(store)],
                log=folder / f"{name}.log", marker=folder / f"{name}.done.json",
                needs=(dataset,) if maker is None else (dataset, maker),
                estimate=DISCOVER_SECONDS[maps] * config.n_train / 10000, stale_output=store, all_cpus=all_cpus)


def _evals_of(config: Config, row: Row, seed: int) -> dict:
    """The row's evaluations: the plan's, and fine-tuning on the seeds of the row's `finetune` tier with
    agmae-eval's demo fine-tuning recipe, every option explicit, for half the pre-training epochs."""
    evals = {protocol: EVALS[protocol][0] for protocol in config.evaluations}
    if row.finetune and seed in config.seeds_in(row.finetune):
        recipe = {**FINETUNE_RECIPES["demo"], "epochs": max(1, config.epochs // 2)}
        evals["finetune"] = (*EVALS["finetune"][0],
                             *(arg for name, value in recipe.items() for arg in (f"--{name.replace('_', '-')}",
                                                                                 _slug(value))))
    return evals


def _run(config: Config, row: Row, seed: int, root: Path, store: Path | None, upstream: list,
         first_round: int | None = None, init: Step | None = None, all_cpus: bool = False) -> Run:
    """The training run of (row, seed) and its evaluations, in the run directory `run_name` names (rows with the
    same configuration get the same directory, hence share the run). first_round: the epochs of the vanilla run
    whose own maps guide it, when they differ from the run's; init: the training step of the run whose final
    weights it starts from."""
    run_dir = config.out / "runs" / root.name / run_name(config, row, seed, root.name, first_round,
                                                         init.run_dir.name if init else None)
    _, options = training_options(config, row, seed)
    label, step_dir = run_dir.relative_to(config.out), run_dir / "steps"
    maps = ["--maps", str(store)] if store else []
    init_from = ["--init-from", str(init.run_dir / "checkpoint-last.pth")] if init else []
    keep = ["--keep-every", str(config.keep_every)] if config.keep_every else []
    upstream = [*upstream, *([init] if init and all(init is not step for step in upstream) else [])]
    train = Step(id=f"train {label}", kind="train",
                 argv=[console_script("agmae-train"), *maps, *init_from, *options, "--data", str(root),
                       "--out", str(run_dir), "--save-every", "1", *keep],
                 log=step_dir / "train.log", marker=step_dir / "train.done.json",
                 needs=tuple(upstream), run_dir=run_dir, all_cpus=all_cpus,
                 estimate=3 * STARTUP_SECONDS + TRAIN_EPOCH_SECONDS * config.epochs * config.n_train / 10000)
    evals = {
        protocol: Step(id=f"{protocol} {label}", kind="eval",
                       argv=[console_script("agmae-eval"), *args, *EVAL_PRECISION,
                             "--checkpoint", str(run_dir / "checkpoint-last.pth"), "--run-dir", str(run_dir),
                             "--data", str(root)],
                       log=step_dir / f"{protocol}.log", marker=step_dir / f"{protocol}.done.json",
                       needs=(train,), run_dir=run_dir,
                       estimate=STARTUP_SECONDS + EVAL_SECONDS[protocol] * config.n_train / 10000)
        for protocol, args in _evals_of(config, row, seed).items()
    }
    return Run(run_dir, train, evals, upstream)


def _quality_steps(config: Config, root: Path, seed: int, stores: dict, discoveries: list, runs: dict) -> Quality:
    """The steps that score the stores of one seed's rows against the dataset's masks and draw its runs ({row name:
    Run}) side by side, as the config asks."""
    run_dir = config.out / "maps" / root.name / f"quality-s{seed}"
    quality = Quality(None, stores, run_dir)
    if config.map_quality:
        quality.step = Step(id=f"map quality {root.name} seed {seed}", kind="eval",
                            argv=[console_script("agmae-eval"), "attention",
                                  *(arg for store in stores.values() for arg in ("--maps", str(store))),
                                  "--data", str(root), "--run-dir", str(run_dir)],
                            log=run_dir / "attention.log", marker=run_dir / "attention.done.json",
                            needs=tuple(discoveries), estimate=QUALITY_SECONDS * len(stores) * config.n_train / 10000)
    if config.visualize:
        figure = run_dir / "visualize.png"
        quality.figure = Step(id=f"visualize {root.name} seed {seed}", kind="eval",
                              argv=[console_script("agmae-eval"), "visualize",
                                    *(arg for name, run in runs.items()
                                      for arg in ("--checkpoint", str(run.run_dir / "checkpoint-last.pth"),
                                                  "--name", name)),
                                    *(arg for store in stores.values() for arg in ("--maps", str(store))),
                                    "--seed", str(seed), "--data", str(root), "--run-dir", str(run_dir),
                                    "--out", str(figure)],
                              log=run_dir / "visualize.log", marker=run_dir / "visualize.done.json",
                              needs=(*discoveries, *(run.train for run in runs.values())), stale_output=figure,
                              estimate=STARTUP_SECONDS)
    return quality


# The order in which the runner starts a seed's steps when several are ready: the stores that need no training,
# the vanilla runs, the first rounds, the own maps, the guided runs, the evaluations. A step comes after the steps it
# needs (a vanilla run that continues a first round, after it).
STAGES = ("dataset", "stores", "vanilla", "first round", "own stores", "guided", "evaluations", "figures")


def build_plan(config: Config) -> Plan:
    """The steps of the demo or the study in execution order: seed-major (every row's seed 0 first, so a partial
    study already covers every row), each seed in STAGES order. A recipe that continues its first round trains
    that round first, on every CPU (nothing else is ready beside it), then every compared run from its weights; a
    recipe that cuts its own maps from the vanilla run itself cuts them on every CPU (everything after them waits
    for them); from a first round beside the compared runs, on one CPU."""
    runs, quality, by_id, ordered = {}, {}, {}, []
    recipe = RECIPES[config.recipe]
    first_round = recipe.first_round(config.epochs)
    continues = recipe.continue_first_round
    rows = [row for row in ROWS if row.name in config.rows]
    for seed in range(config.first_seed, config.first_seed + max(config.seeds, config.claim_seeds,
                                                                   config.ablation_seeds)):
        stages = {stage: [] for stage in STAGES}
        stores_of = {}  # dataset root -> {map source: (store, discovery step)}

        def add(step: Step, stage: str) -> Step:
            if step.id not in by_id:
                by_id[step.id] = step
                stages[stage].append(step)
            return by_id[step.id]

        for row in rows:
            if seed not in config.seeds_of(row):
                continue
            dataset, root = _dataset_step(config, row.correlation)
            upstream, store, maker = [add(dataset, "dataset")], None, None
            own_maps = row.maps in OWN_MAP_SOURCES
            if own_maps or continues:
                # the recipe's map maker (and, when the recipe continues it, every run's start): the vanilla run of
                # the same seed, or a shorter one (a first round)
                maker_config = replace(config, epochs=first_round) if first_round else config
                vanilla_row = Row(f"vanilla p={row.correlation:g}", None, correlation=row.correlation)
                maker = _run(maker_config, vanilla_row, seed, root, None, upstream, all_cpus=continues).train
                maker = add(maker, "first round" if first_round else "vanilla")
            if row.maps is not None:
                if own_maps:
                    upstream.append(maker)
                discover = _discover_step(config, row.maps, dataset, root, maker if own_maps else None,
                                          all_cpus=own_maps and first_round is None)
                upstream.append(add(discover, "own stores" if own_maps else "stores"))
                store = discover.stale_output
                stores_of.setdefault(root, {})[row.maps] = (store, by_id[discover.id])
            run = _run(config, row, seed, root, store, upstream, first_round if own_maps else None,
                       init=maker if continues else None)
            run.train = add(run.train, "vanilla" if row.maps is None else "guided")
            run.evals = {protocol: add(step, "evaluations") for protocol, step in run.evals.items()}
            runs[row.name, seed] = run
        if config.map_quality or config.visualize:
            for root, stores in stores_of.items():
                seed_runs = {row.name: runs[row.name, seed] for row in rows if (row.name, seed) in runs
                             and runs[row.name, seed].run_dir.parent.name == root.name}
                entry = _quality_steps(config, root, seed, {source: store for source, (store, _) in stores.items()},
                                       [step for _, step in stores.values()], seed_runs)
                entry.step = entry.step and add(entry.step, "figures")
                entry.figure = entry.figure and add(entry.figure, "figures")
                quality[root.name, seed] = entry
        ordered += [step for stage in STAGES for step in stages[stage]]
    record = load_record(config.record, config, runs) if config.record else NO_RECORD
    needed = _needed([step for key, run in runs.items() if key not in record.metrics
                      for step in (run.train, *run.evals.values())]
                     + [step for entry in quality.values() for step in (entry.step, entry.figure) if step])
    return Plan(config, rows, runs, _after_needs([step for step in ordered if step.id in needed]), record, quality)


def _after_needs(steps: list) -> list:
    """The steps in their order, except that each comes after the steps it needs."""
    placed, order = set(), []

    def place(step):
        if step.id not in placed:
            placed.add(step.id)
            for need in step.needs:
                place(need)
            order.append(step)

    for step in steps:
        place(step)
    return order


def _needed(steps: list) -> set:
    """The ids of these steps and of every step they need, directly or not."""
    ids, pending = set(), list(steps)
    while pending:
        step = pending.pop()
        if step.id not in ids:
            ids.add(step.id)
            pending.extend(step.needs)
    return ids


def load_record(path: Path, config: Config, runs: dict, strict: bool = True) -> Record:
    """The finished row-seeds of the results.json at `path` that this plan also has and this machine has not
    finished (its own runs win), checked to be the same training: the record's plan options (seed counts aside) and
    each run's directory name (`run_name`) must equal this plan's. Not strict: an unreadable record or one of
    another plan is empty and a row-seed trained otherwise is left out, instead of refused."""
    def refuse(reason: str):
        raise click.BadParameter(f"{path}: {reason}", param_hint="--record")

    try:
        summary = json.loads(path.read_text())
        recorded_plan, recorded_rows = summary["plan"], summary["rows"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        if not strict:
            return NO_RECORD
        refuse(f"not a results.json of the study ({error!r})")
    differ = [f"{name} {recorded_plan.get(name)!r} (this plan: {value!r})" for name, value in config.describe().items()
              if name not in SEED_COUNTS and recorded_plan.get(name) != value]
    if differ:
        if not strict:
            return NO_RECORD
        refuse(f"recorded with {', '.join(differ)}; pass the options it was run with")
    metrics, entries = {}, {}
    for row in recorded_rows:
        for seed in row["seeds_done"]:
            if (row["name"], seed) not in runs:
                continue
            entry, run_dir = row["runs"][str(seed)], runs[row["name"], seed].run_dir
            if Path(entry["run_dir"]).name != run_dir.name:
                if not strict:
                    continue
                refuse(f"{row['name']} seed {seed} was trained as {Path(entry['run_dir']).name}, this plan trains "
                       f"{run_dir.name}: its configuration changed, so the recorded numbers are not this plan's")
            if runs[row["name"], seed].complete():
                continue
            metrics[row["name"], seed] = {name: values["per_seed"][str(seed)]
                                          for name, values in row["metrics"].items()
                                          if str(seed) in values["per_seed"]}
            entries[row["name"], seed] = entry
    return Record(path, summary, metrics, entries)


def default_precision(recipe: str) -> str:
    """The recipe's training precision on this CPU, as a concrete precision so that the plan records what ran."""
    import torch

    return resolve_precision(RECIPES[recipe].precision, torch.device("cpu"), training=True)


def make_config(quick=False, recipe=None, epochs=None, seeds=None, claim_seeds=None, ablation_seeds=None,
                n_train=None, n_test=None, batch_size=None, rows=None, out=None, docs=None, precision=None,
                record=None, **plan) -> Config:
    """The study's Config from its command-line options (None: the default, or --quick's); `plan`: further Config
    fields (the demo's first_seed, evaluations, keep_every, map_quality)."""
    defaults = QUICK_DEFAULTS if quick else FULL_DEFAULTS
    given = dict(recipe=recipe, epochs=epochs, seeds=seeds, claim_seeds=claim_seeds, ablation_seeds=ablation_seeds,
                 n_train=n_train, n_test=n_test, batch_size=batch_size, rows=rows)
    values = {name: defaults[name] if value is None else value for name, value in given.items()}
    if values["recipe"] not in RECIPES:
        raise click.BadParameter(f"unknown recipe {values['recipe']!r}; choose from {', '.join(RECIPES)}",
                                 param_hint="--recipe")
    chosen = RECIPES[values["recipe"]]
    for name in ("epochs", "batch_size"):
        values[name] = getattr(chosen, name) if values[name] is None else values[name]
    names = tuple(name.strip() for name in values["rows"].split(",") if name.strip()) if isinstance(
        values["rows"], str) else tuple(values["rows"])
    unknown = [name for name in names if name not in ROW_NAMES]
    if unknown or not names:
        raise click.BadParameter(f"unknown row(s) {', '.join(unknown) or '(none given)'}; choose from "
                                 f"{', '.join(ROW_NAMES)}", param_hint="--rows")
    for name, least in (("epochs", 1), ("seeds", 1), ("claim_seeds", 0), ("ablation_seeds", 0), ("batch_size", 1)):
        if values[name] < least:
            raise click.BadParameter(f"{values[name]} must be >= {least}", param_hint="--" + name.replace("_", "-"))
    for row in ROWS:
        tier = {CLAIM: "claim_seeds", ABLATION: "ablation_seeds"}.get(row.seeds)
        if row.name in names and tier and values[tier] == 0:
            raise click.BadParameter(f"row {row.name} runs on the {row.seeds} seeds; give it at least one, or leave "
                                     "it out of --rows", param_hint="--" + tier.replace("_", "-"))
    out = Path(out) if out else default_out()
    docs = Path(docs) if docs else (out / "docs" if quick else default_docs(values["recipe"]))
    return Config(**{**values, "rows": names}, out=out.resolve(), docs=docs.resolve(),
                  precision=precision or default_precision(values["recipe"]),
                  record=Path(record).resolve() if record else None, **plan)
