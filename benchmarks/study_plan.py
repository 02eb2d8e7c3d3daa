"""The study's plan (benchmarks/study.py runs it, benchmarks/study_report.py reports it): its rows,
datasets, map stores, runs and evaluations as steps of the runner that `make demo` shares
(agmae.cli.steps), seed-major so that a partial study already covers every row."""
import json
import os
import shlex
import sys
from dataclasses import dataclass, field, replace
from hashlib import sha256
from pathlib import Path

import click

from agmae.cli.demo import DEMO_RECIPES, DISCOVERY_PRECISION, MAP_OPTIONS, OWN_MAP_SOURCES
from agmae.cli.steps import Step, console_script
from agmae.data.demo import demo_name
from agmae.hardware import resolve_precision
from agmae.paths import agmae_home
from agmae.train.config import RECIPES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DOCS = REPO / "docs"
DEMO_SEED = 0

# Discovery recipes, one map store per (recipe, dataset), as `make demo` computes them where it uses them (in its
# precision, so that the two-round maps of a seed are the demo's bit for bit).
# The CNN methods use the offline ImageNet EfficientNet-Lite0 at 224 px (the 64-px images up-sampled; 448,
# the tokencut CNN default, costs 4x the time); the oracle area-averages the masks onto a 28x28 grid
# (224 px / patch 8), finer than the model's 8x8 patch grid so that a random crop cuts it between cells;
# mae-tokencut is TokenCut on the final tokens of the same seed's vanilla run (the two-round pipeline,
# one store per seed), mae-tokencut-128 the same on its last block's tokens at 128 px; the negative control
# is DINO's CLS attention of a randomly initialised ViT-S/8 at 64 px.
MAPS = {
    **{source: tuple(options) for source, options in MAP_OPTIONS.items()},
    "gradcam": ("--method", "gradcam", "--backbone", "tf_efficientnet_lite0", "--image-size", "224"),
    "dino-random": ("--method", "dino", "--backbone", "vit_small_patch8_224", "--random-init", "--seed", "0",
                    "--image-size", "64"),
}
# agmae-train's guidance defaults, passed explicitly so every run's command says what it trained.
GUIDANCE_DEFAULTS = {"tau-schedule": "cosine", "tau-start": 1.0, "tau-end": 0.5, "weight-norm": "batch"}
# Seed tiers: MAIN rows get --seeds seeds, CLAIM rows (the paper's fine-tuning and masking claims)
# --claim-seeds, ABLATION rows --ablation-seeds.
MAIN, CLAIM, ABLATION = "main", "claim", "ablation"
# Kept checkpoints per run (outside the run's identity), for benchmarks/learning_curve.py.
KEEP_EVERY = 4
# Hand-written reading of the numbers, kept beside them: RESULTS.md embeds it above the generated tables.
FINDINGS = "FINDINGS.md"
# Earlier recipes' findings and tables, frozen, newest first: RESULTS.md ends with each as a section.
EARLIER_RECIPES = ("RESULTS-light-b256-16-epochs.md", "RESULTS-light-18-epochs.md", "RESULTS-earlier-recipe.md")


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
    # finetune), which costs more than every other protocol together (about 11 min a run on one core)


def _tau(schedule, start, end=None):
    return {"tau-schedule": schedule, "tau-start": start, **({"tau-end": end} if end is not None else {})}


ROWS = [
    # Fine-tuning: vanilla against the strongest guidance (oracle maps) on the claim seeds; own maps, whose
    # feature gains are smaller, on the ablation seeds.
    Row("vanilla", None, note="MAE, uniform weights (--no-guidance)", finetune=CLAIM),
    Row("guided-oracle", "oracle", note="ground-truth masks", finetune=CLAIM),
    Row("guided-mae-tokencut", "mae-tokencut", note="TokenCut on the vanilla MAE of the same seed (two rounds)",
        finetune=ABLATION),
    Row("guided-mae-tokencut-128", "mae-tokencut-128",
        note="TokenCut on the last block of the vanilla MAE of the same seed, 128 px (two rounds)"),
    Row("guided-dino-random", "dino-random", note="negative control: DINO attention of a random ViT-S/8"),
    # The paper's masking ablation: the map chooses the masked patches (AttMask's most-attended rule),
    # instead of or besides weighting the loss.
    Row("mask-oracle", "oracle", masking="attention-high", weight_loss=False, seeds=CLAIM, note="masking only",
        versus="guided-oracle"),
    Row("loss+mask-oracle", "oracle", masking="attention-high", seeds=CLAIM, note="guided loss and masking",
        versus="guided-oracle"),
    Row("mask-mae-tokencut", "mae-tokencut", masking="attention-high", weight_loss=False, seeds=CLAIM,
        note="masking only", versus="guided-mae-tokencut"),
    Row("loss+mask-mae-tokencut", "mae-tokencut", masking="attention-high", seeds=CLAIM,
        note="guided loss and masking", versus="guided-mae-tokencut"),
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
    Row("p0.8-guided-mae-tokencut", "mae-tokencut", correlation=0.8, seeds=ABLATION),
]
ROW_NAMES = [row.name for row in ROWS]
QUICK_ROWS = ("vanilla", "guided-oracle")

# Evaluation protocols: step name -> (agmae-eval arguments, results.json key).
EVALS = {
    "knn": (("knn",), "knn"),
    "knn-mean": (("knn", "--pool", "mean"), "knn[pool=mean]"),
    "linear": (("linear", "--mode", "cached"), "linear-cached"),
    "robustness": (("robustness",), "robustness"),
    # the demo's evaluation: mean-pooled features, judged on the recipe's headline column (light-b256-e32:
    # mixed-rand k-NN); clean-fg is the CLS evaluation's diagnostic
    "robustness-mean": (("robustness", "--pool", "mean", "--no-clean-fg"), "robustness[pool=mean]"),
    "finetune": (("finetune",), "finetune"),
}
# Evaluations every run gets; the others only the runs of rows that ask for them.
COMMON_EVALS = ("knn", "knn-mean", "linear", "robustness", "robustness-mean")
# Reported numbers: name -> (column header, path into the run's results.json). k-NN at k = 20.
METRICS = {
    "knn_cls": ("k-NN CLS", ("knn", "results", "k=20", "top1")),
    "knn_mean": ("k-NN mean-pool", ("knn[pool=mean]", "results", "k=20", "top1")),
    "linear": ("linear (cached)", ("linear-cached", "results", "top1")),
    "mixed_rand_knn": ("mixed-rand k-NN", ("robustness", "results", "splits", "mixed-rand", "knn_top1")),
    "mixed_rand_linear": ("mixed-rand linear", ("robustness", "results", "splits", "mixed-rand", "linear_top1")),
    "mixed_rand_knn_mean": ("mixed-rand k-NN mean-pool",
                            ("robustness[pool=mean]", "results", "splits", "mixed-rand", "knn_top1")),
    "mixed_rand_linear_mean": ("mixed-rand linear mean-pool",
                               ("robustness[pool=mean]", "results", "splits", "mixed-rand", "linear_top1")),
    "only_fg_knn": ("only-fg k-NN", ("robustness", "results", "splits", "only-fg", "knn_top1")),
    "only_fg_linear": ("only-fg linear", ("robustness", "results", "splits", "only-fg", "linear_top1")),
    "only_fg_knn_mean": ("only-fg k-NN mean-pool",
                         ("robustness[pool=mean]", "results", "splits", "only-fg", "knn_top1")),
    "clean_fg_knn": ("clean-fg k-NN", ("robustness", "results", "clean_fg_knn_top1")),
    "bg_gap_knn": ("BG-gap k-NN", ("robustness", "results", "bg_gap", "knn_top1")),
    "bg_gap_linear": ("BG-gap linear", ("robustness", "results", "bg_gap", "linear_top1")),
    "finetune": ("fine-tuned", ("finetune", "results", "splits", "original", "top1")),
}
FEATURE_COLUMNS = ("knn_cls", "knn_mean", "linear", "finetune")
# The columns each guided row is compared on, seed by seed, with the vanilla row of its dataset.
PAIRED_COLUMNS = ("knn_mean", "knn_cls", "linear", "only_fg_knn", "only_fg_knn_mean", "mixed_rand_knn",
                  "mixed_rand_knn_mean", "mixed_rand_linear_mean", "finetune")
ROBUSTNESS_COLUMNS = ("mixed_rand_knn", "mixed_rand_linear", "mixed_rand_knn_mean", "mixed_rand_linear_mean",
                      "only_fg_knn", "only_fg_linear", "only_fg_knn_mean", "clean_fg_knn", "bg_gap_knn",
                      "bg_gap_linear")

# Seconds per step for 10k training images on one core of a 2-core AMD EPYC with native bf16 (bf16 training,
# fp32 evaluation, the demo MAE, steps side by side; the claims study of 2026-12-02), only for the first ETA;
# the ETA rescales them by the measured/estimated ratio of the steps done. CNN and random-ViT discovery are
# the earlier 2-core AVX2 machine's figures. A CPU without native bf16 trains about 3x slower.
TRAIN_EPOCH_SECONDS = 26.0
STARTUP_SECONDS = 5.0
DISCOVER_SECONDS = {"oracle": 22.0, "mae-tokencut": 90.0, "mae-tokencut-128": 190.0, "tokencut": 200.0,
                    "gradcam": 450.0, "dino-random": 400.0}
EVAL_SECONDS = {"knn": 60.0, "knn-mean": 55.0, "linear": 9.0, "robustness": 85.0, "robustness-mean": 70.0,
                "finetune": 650.0}
DATASET_SECONDS = 22.0

# Every row trains with a demo recipe (`make demo --recipe`; its epochs and batch unless given) and is evaluated
# on the demo's 10,000 images per test split. By default light-b256, from scratch: the rows beyond the main ones
# (ablations, guided masking, fine-tuning for half the pre-training epochs) were laid out for runs trained from
# scratch; a recipe that continues a first round (the demo's default) is studied by naming it and its rows.
STUDY_RECIPE = "light-b256"
FULL_DEFAULTS = dict(recipe=STUDY_RECIPE, epochs=None, seeds=5, claim_seeds=3, ablation_seeds=1, n_train=10000,
                     n_test=10000, batch_size=None, rows=",".join(ROW_NAMES))
QUICK_DEFAULTS = dict(recipe=STUDY_RECIPE, epochs=1, seeds=1, claim_seeds=1, ablation_seeds=1, n_train=240,
                      n_test=60, batch_size=64, rows=",".join(QUICK_ROWS))


@dataclass(frozen=True)
class Config:
    recipe: str  # a DEMO_RECIPES name
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

    def seeds_in(self, tier: str) -> list[int]:
        return list(range({MAIN: self.seeds, CLAIM: self.claim_seeds, ABLATION: self.ablation_seeds}[tier]))

    def seeds_of(self, row: Row) -> list[int]:
        return self.seeds_in(row.seeds)

    def warmup_epochs(self) -> float:
        return DEMO_RECIPES[self.recipe].warmup(self.epochs)

    def describe(self) -> dict:
        """The plan options as the report records them (results.json's `plan`)."""
        recipe = DEMO_RECIPES[self.recipe]
        return dict(recipe=self.recipe, epochs=self.epochs, warmup_epochs=self.warmup_epochs(), seeds=self.seeds,
                    claim_seeds=self.claim_seeds, ablation_seeds=self.ablation_seeds, n_train=self.n_train,
                    n_test=self.n_test, batch_size=self.batch_size, precision=self.precision,
                    model=RECIPES["demo"]["model"], blr=RECIPES["demo"]["blr"], knn_k=20,
                    continues_epochs=recipe.first_round_epochs if recipe.continue_first_round else None)

    def command(self) -> str:
        """The study command line that reproduces this plan, every plan option explicit."""
        parts = [_shown(Path(sys.executable)), "benchmarks/study.py", "--recipe", self.recipe, "--epochs", self.epochs,
                 "--seeds", self.seeds, "--claim-seeds", self.claim_seeds, "--ablation-seeds", self.ablation_seeds,
                 "--n-train", self.n_train, "--n-test", self.n_test,
                 "--batch-size", self.batch_size, "--rows", ",".join(self.rows), "--precision", self.precision]
        if self.out != agmae_home() / "study":
            parts += ["--out", self.out]
        if self.docs != DEFAULT_DOCS:
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
    upstream: list  # dataset and discovery steps it needs

    def steps(self) -> list:
        return [*self.upstream, self.train, *self.evals.values()]

    def complete(self) -> bool:
        return all(step.done() for step in [self.train, *self.evals.values()])

    def results(self) -> dict:
        return json.loads((self.run_dir / "results.json").read_text())


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


def _slug(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _dataset_step(config: Config, correlation: float) -> tuple[Step, Path]:
    """The step that builds the demo dataset (once, into AGMAE_HOME/demo/, where ensure_demo puts it), and its root."""
    variant = demo_name(correlation, DEMO_SEED, config.n_train, config.n_test)
    folder = config.out / "data"
    step = Step(id=f"dataset {variant}", kind="dataset",
                argv=[sys.executable, "-c", "import sys; from agmae.data.demo import ensure_demo; "
                      "print(ensure_demo(float(sys.argv[1]), *map(int, sys.argv[2:])))",
                      str(correlation), str(DEMO_SEED), str(config.n_train), str(config.n_test)],
                log=folder / f"{variant}.log", marker=folder / f"{variant}.done.json",
                estimate=DATASET_SECONDS * config.n_train / 10000)
    return step, agmae_home() / "demo" / variant


def _discover_step(config: Config, maps: str, dataset: Step, root: Path, vanilla: Step | None = None
                   ) -> tuple[Step, Path]:
    """The step that computes the map store of recipe `maps` on a dataset's train split, and the store.
    An OWN_MAP_SOURCES recipe takes the `vanilla` training step's final checkpoint as its backbone."""
    folder = config.out / "maps" / root.name
    name = maps if vanilla is None else f"{maps}-{vanilla.run_dir.name}"
    store = folder / f"{name}.h5"
    backbone = [] if vanilla is None else ["--backbone", str(vanilla.run_dir / "checkpoint-last.pth")]
    step = Step(id=f"discover {root.name}/{name}", kind="discover",
                argv=[console_script("agmae-discover"), *MAPS[maps], *backbone, *DISCOVERY_PRECISION,
                      "--data", str(root), "--out", str(store)],
                log=folder / f"{name}.log", marker=folder / f"{name}.done.json",
                needs=(dataset,) if vanilla is None else (dataset, vanilla),
                estimate=DISCOVER_SECONDS[maps] * config.n_train / 10000, stale_output=store)
    return step, store


def _training_options(config: Config, row: Row, seed: int) -> tuple[str, list]:
    """A short name of the row's training configuration and its agmae-train options (without paths)."""
    recipe = replace(DEMO_RECIPES[config.recipe], batch_size=config.batch_size)
    options = ["--model", RECIPES["demo"]["model"], *recipe.train_options(config.epochs),
               "--blr", _slug(RECIPES["demo"]["blr"]), "--precision", config.precision, "--seed", str(seed)]
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


def _evals_of(config: Config, row: Row, seed: int) -> dict:
    """The row's evaluations: every common one, and fine-tuning on the seeds of the row's `finetune` tier,
    for half the pre-training epochs (9 fine-tuning epochs after the demo recipe's 18)."""
    evals = {protocol: EVALS[protocol] for protocol in COMMON_EVALS}
    if row.finetune and seed in config.seeds_in(row.finetune):
        args, key = EVALS["finetune"]
        evals["finetune"] = ((*args, "--epochs", str(max(1, config.epochs // 2))), key)
    return evals


def _run(config: Config, row: Row, seed: int, root: Path, store: Path | None, upstream: list,
         first_round: int | None = None, init: Step | None = None) -> Run:
    """The training run of (row, seed) and its evaluations, in a run directory named by its configuration
    (rows with the same configuration get the same directory, hence share the run). first_round: the epochs of
    the vanilla run whose own maps guide it, when they differ from the run's; init: the training step of the run
    whose final weights it starts from (a recipe that continues its first round), named `-e<first>+<epochs>`."""
    name, options = _training_options(config, row, seed)
    # Paths stay out of the identity, so moving AGMAE_HOME or --out keeps the run names.
    identity = json.dumps({"dataset": root.name, "maps": MAPS.get(row.maps), "train": options,
                           **({"first_round": first_round} if first_round else {}),
                           **({"init_from": init.run_dir.name} if init else {})}, sort_keys=True)
    epochs = f"{DEMO_RECIPES[config.recipe].first_round_epochs}+{config.epochs}" if init else config.epochs
    run_dir = (config.out / "runs" / root.name /
               f"{name}-e{epochs}-s{seed}-{sha256(identity.encode()).hexdigest()[:8]}")
    label, step_dir = run_dir.relative_to(config.out), run_dir / "study"
    maps = ["--maps", str(store)] if store else []
    init_from = ["--init-from", str(init.run_dir / "checkpoint-last.pth")] if init else []
    train = Step(id=f"train {label}", kind="train",
                 argv=[console_script("agmae-train"), *maps, *init_from, *options, "--data", str(root),
                       "--out", str(run_dir), "--save-every", "1", "--keep-every", str(KEEP_EVERY)],
                 log=step_dir / "train.log", marker=step_dir / "agmae.train.done.json",
                 needs=(*upstream, *([init] if init else [])), run_dir=run_dir,
                 estimate=3 * STARTUP_SECONDS + TRAIN_EPOCH_SECONDS * config.epochs * config.n_train / 10000)
    evals = {
        protocol: Step(id=f"{protocol} {label}", kind="eval",
                       argv=[console_script("agmae-eval"), *args, "--checkpoint", str(run_dir / "checkpoint-last.pth"),
                             "--run-dir", str(run_dir), "--data", str(root)],
                       log=step_dir / f"{protocol}.log", marker=step_dir / f"{protocol}.done.json",
                       needs=(train,), run_dir=run_dir,
                       estimate=STARTUP_SECONDS + EVAL_SECONDS[protocol] * config.n_train / 10000)
        for protocol, (args, _) in _evals_of(config, row, seed).items()
    }
    return Run(run_dir, train, evals, upstream)


def build_plan(config: Config) -> Plan:
    """The steps of the study in execution order: seed-major (every row's seed 0 first, so a partial
    study already covers every row), each dataset and map store just before its first user."""
    steps, by_id, runs = [], {}, {}

    def add(step: Step) -> Step:
        if step.id not in by_id:
            by_id[step.id] = step
            steps.append(step)
        return by_id[step.id]

    rows = [row for row in ROWS if row.name in config.rows]
    demo_recipe = DEMO_RECIPES[config.recipe]
    for seed in range(max(config.seeds, config.claim_seeds, config.ablation_seeds)):
        for row in rows:
            if seed not in config.seeds_of(row):
                continue
            dataset, root = _dataset_step(config, row.correlation)
            upstream, store, first_round, maker = [add(dataset)], None, None, None
            own_maps, continues = row.maps in OWN_MAP_SOURCES, demo_recipe.continue_first_round
            if own_maps or continues:
                # the recipe's map maker (and, when the recipe continues it, every run's start): the vanilla run of
                # the same seed, or a shorter one (a first round)
                first_round = demo_recipe.first_round(config.epochs)
                maker_config = replace(config, epochs=first_round) if first_round else config
                vanilla_row = Row(f"vanilla p={row.correlation:g}", None, correlation=row.correlation)
                maker = add(_run(maker_config, vanilla_row, seed, root, None, upstream).train)
            if row.maps is not None:
                upstream += [maker] if own_maps else []
                discover, store = _discover_step(config, row.maps, dataset, root, maker if own_maps else None)
                upstream.append(add(discover))
            run = _run(config, row, seed, root, store, upstream, first_round if own_maps else None,
                       init=maker if continues else None)
            run.train = add(run.train)
            run.evals = {protocol: add(step) for protocol, step in run.evals.items()}
            runs[row.name, seed] = run
    record = load_record(config.record, config, runs) if config.record else NO_RECORD
    needed = _needed([step for key, run in runs.items() if key not in record.metrics
                      for step in (run.train, *run.evals.values())])
    return Plan(config, rows, runs, [step for step in steps if step.id in needed], record)


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
    each run's directory name (a hash of its configuration) must equal this plan's. Not strict: an unreadable record
    or one of another plan is empty and a row-seed trained otherwise is left out, instead of refused."""
    def refuse(reason: str):
        raise click.BadParameter(f"{path}: {reason}", param_hint="--record")

    try:
        summary = json.loads(path.read_text())
        recorded_plan, recorded_rows = summary["plan"], summary["rows"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        if not strict:
            return NO_RECORD
        refuse(f"not a results.json of benchmarks/study.py ({error!r})")
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


def _default_precision() -> str:
    """What agmae-train picks on the demo dataset (the demo recipe's `native`) on this CPU, as a concrete
    precision so that the plan records what ran."""
    import torch

    return resolve_precision(RECIPES["demo"]["precision"], torch.device("cpu"), training=True)


def make_config(quick=False, recipe=None, epochs=None, seeds=None, claim_seeds=None, ablation_seeds=None,
                n_train=None, n_test=None, batch_size=None, rows=None, out=None, docs=None, precision=None,
                record=None) -> Config:
    defaults = QUICK_DEFAULTS if quick else FULL_DEFAULTS
    given = dict(recipe=recipe, epochs=epochs, seeds=seeds, claim_seeds=claim_seeds, ablation_seeds=ablation_seeds,
                 n_train=n_train, n_test=n_test, batch_size=batch_size, rows=rows)
    values = {name: defaults[name] if value is None else value for name, value in given.items()}
    if values["recipe"] not in DEMO_RECIPES:
        raise click.BadParameter(f"unknown recipe {values['recipe']!r}; choose from {', '.join(DEMO_RECIPES)}",
                                 param_hint="--recipe")
    demo_recipe = DEMO_RECIPES[values["recipe"]]
    for name in ("epochs", "batch_size"):
        values[name] = getattr(demo_recipe, name) if values[name] is None else values[name]
    names = tuple(name.strip() for name in values["rows"].split(",") if name.strip())
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
    out = Path(out) if out else agmae_home() / "study"
    docs = Path(docs) if docs else (out / "docs" if quick else DEFAULT_DOCS)
    return Config(**{**values, "rows": names}, out=out.resolve(), docs=docs.resolve(),
                  precision=precision or _default_precision(), record=Path(record).resolve() if record else None)
