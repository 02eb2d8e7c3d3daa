"""The AttG study (project issue 6 item 2): vanilla vs guided MAE on the demo dataset.

Rows (a declarative plan, `ROWS`): vanilla and guided MAE with oracle, TokenCut, Grad-CAM and
random-weight DINO maps (the negative control), `--seeds` seeds each; a temperature ablation
(constant τ ∈ {0.25, 0.5, 1, 2}, cosine 1→0.5 and 0.5→1), the three `--weight-norm` modes, and
vanilla / oracle / TokenCut on the background-correlated demo dataset (p = 0.8, for the BG-gap),
`--ablation-seeds` seeds each. Every row trains the same model for the same epochs and batch
(the demo recipe of agmae-train), so rows differ only in their maps and loss options.

The study only orchestrates: each step (build a dataset, discover a map store, train a run,
one evaluation protocol) is a subprocess of the console scripts users run (agmae-discover,
agmae-train, agmae-eval), logging to a file beside its output. A step that finished leaves a
marker (command, seconds) and is skipped when the study is run again with the same command; a
step whose command changed (a new discovery recipe, other eval options) is redone, its stale
map store removed first. A killed step resumes (the CLIs resume a half-written store or a
half-trained run by themselves). Rows whose runs
have the same configuration share them (guided-oracle seed 0 is also the τ row `cosine 1→0.5`
and the weight-norm row `batch`); rows that use one discovery method on one dataset share
its map store.

docs/RESULTS.md and docs/results.json are regenerated from whatever runs are complete after
every run, so a partial study gives a partial table that names what is missing.

    python benchmarks/study.py                  # the whole plan: ~25 runs of 20 epochs, ~7 h on a 2-core CPU
    python benchmarks/study.py --rows vanilla,guided-oracle --seeds 2   # the core comparison first
    python benchmarks/study.py --report-only    # regenerate the docs (pass the same plan options)
    python benchmarks/study.py --quick          # smoke test: tiny dataset, 1 epoch, 2 rows, 1 seed
"""
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import click

from agmae.data.demo import demo_name
from agmae.checkpoint import atomic_write_text
from agmae.cli.demo import console_script, nested
from agmae.hardware import resolve_precision
from agmae.paths import agmae_home
from agmae.train.config import RECIPES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DOCS = REPO / "docs"
DEMO_SEED = 0

# Discovery recipes, one map store per (recipe, dataset). The CNN methods use the offline
# ImageNet EfficientNet-Lite0 at 224 px (the 64-px images up-sampled; 448, the tokencut CNN
# default, costs 4x the time); the oracle area-averages the masks onto a 28x28 grid (224 px / patch 8),
# finer than the model's 8x8 patch grid so that a random crop cuts it between cells;
# the negative control is DINO's CLS attention of a randomly initialised ViT-S/8 at 64 px.
MAPS = {
    "oracle": ("--method", "oracle", "--patch", "8"),
    "tokencut": ("--method", "tokencut", "--backbone", "tf_efficientnet_lite0", "--image-size", "224"),
    "gradcam": ("--method", "gradcam", "--backbone", "tf_efficientnet_lite0", "--image-size", "224"),
    "dino-random": ("--method", "dino", "--backbone", "vit_small_patch8_224", "--random-init", "--seed", "0",
                    "--image-size", "64"),
}
# agmae-train's guidance defaults, passed explicitly so every run's command says what it trained.
GUIDANCE_DEFAULTS = {"tau-schedule": "cosine", "tau-start": 1.0, "tau-end": 0.5, "weight-norm": "batch"}
MAIN, ABLATION = "main", "ablation"
# Kept checkpoints per run (outside the run's identity), for benchmarks/learning_curve.py.
KEEP_EVERY = 4
# Options that change how a step runs but not what it computes: a marker that differs from the
# step's command only in these still counts as done (runs trained before --keep-every existed).
RESULT_NEUTRAL_OPTIONS = ("--keep-every",)
# Hand-written reading of the numbers, kept beside them: RESULTS.md embeds it above the generated tables.
FINDINGS = "FINDINGS.md"


@dataclass(frozen=True)
class Row:
    name: str
    maps: str | None  # a MAPS key; None = vanilla MAE
    guidance: dict = field(default_factory=dict)  # overrides of GUIDANCE_DEFAULTS
    correlation: float = 0.0
    seeds: str = MAIN  # MAIN rows get --seeds seeds, ABLATION rows --ablation-seeds
    note: str = ""


def _tau(schedule, start, end=None):
    return {"tau-schedule": schedule, "tau-start": start, **({"tau-end": end} if end is not None else {})}


ROWS = [
    Row("vanilla", None, note="MAE, uniform weights (--no-guidance)"),
    Row("guided-oracle", "oracle", note="ground-truth masks"),
    Row("guided-tokencut", "tokencut", note="TokenCut on EfficientNet-Lite0"),
    Row("guided-gradcam", "gradcam", note="Grad-CAM on EfficientNet-Lite0"),
    Row("guided-dino-random", "dino-random", note="negative control: DINO attention of a random ViT-S/8"),
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
    Row("p0.8-guided-tokencut", "tokencut", correlation=0.8, seeds=ABLATION),
]
ROW_NAMES = [row.name for row in ROWS]
QUICK_ROWS = ("vanilla", "guided-oracle")

# Evaluation protocols: step name -> (agmae-eval arguments, results.json key).
EVALS = {
    "knn": (("knn",), "knn"),
    "knn-mean": (("knn", "--pool", "mean"), "knn[pool=mean]"),
    "linear": (("linear", "--mode", "cached"), "linear-cached"),
    "robustness": (("robustness",), "robustness"),
}
# Reported numbers: name -> (column header, path into the run's results.json). k-NN at k = 20.
METRICS = {
    "knn_cls": ("k-NN CLS", ("knn", "results", "k=20", "top1")),
    "knn_mean": ("k-NN mean-pool", ("knn[pool=mean]", "results", "k=20", "top1")),
    "linear": ("linear (cached)", ("linear-cached", "results", "top1")),
    "mixed_rand_knn": ("mixed-rand k-NN", ("robustness", "results", "splits", "mixed-rand", "knn_top1")),
    "mixed_rand_linear": ("mixed-rand linear", ("robustness", "results", "splits", "mixed-rand", "linear_top1")),
    "only_fg_knn": ("only-fg k-NN", ("robustness", "results", "splits", "only-fg", "knn_top1")),
    "only_fg_linear": ("only-fg linear", ("robustness", "results", "splits", "only-fg", "linear_top1")),
    "clean_fg_knn": ("clean-fg k-NN", ("robustness", "results", "clean_fg_knn_top1")),
    "bg_gap_knn": ("BG-gap k-NN", ("robustness", "results", "bg_gap", "knn_top1")),
    "bg_gap_linear": ("BG-gap linear", ("robustness", "results", "bg_gap", "linear_top1")),
}
FEATURE_COLUMNS = ("knn_cls", "knn_mean", "linear")
ROBUSTNESS_COLUMNS = ("mixed_rand_knn", "mixed_rand_linear", "only_fg_knn", "only_fg_linear", "clean_fg_knn",
                      "bg_gap_knn", "bg_gap_linear")

# Seconds measured on this 2-core CPU for 10k training images (bf16 training, fp32 extraction),
# only for the first ETA; the ETA rescales them by the measured/estimated ratio of the steps done.
TRAIN_EPOCH_SECONDS = 38.0
STARTUP_SECONDS = 5.0
DISCOVER_SECONDS = {"oracle": 40.0, "tokencut": 200.0, "gradcam": 450.0, "dino-random": 400.0}
EVAL_SECONDS = {"knn": 55.0, "knn-mean": 55.0, "linear": 5.0, "robustness": 75.0}
DATASET_SECONDS = 90.0

# 20 epochs: guided and vanilla MAEs on the demo dataset separate only after ~10-20 (docs/RESULTS.md).
FULL_DEFAULTS = dict(epochs=20, seeds=3, ablation_seeds=1, n_train=10000, n_test=2000,
                     batch_size=RECIPES["demo"]["batch_size"], rows=",".join(ROW_NAMES))
QUICK_DEFAULTS = dict(epochs=1, seeds=1, ablation_seeds=1, n_train=240, n_test=60, batch_size=64,
                      rows=",".join(QUICK_ROWS))


@dataclass(frozen=True)
class Config:
    epochs: int
    seeds: int
    ablation_seeds: int
    n_train: int
    n_test: int
    batch_size: int
    rows: tuple
    out: Path
    docs: Path
    precision: str

    def seeds_of(self, row: Row) -> list[int]:
        return list(range(self.seeds if row.seeds == MAIN else self.ablation_seeds))

    def warmup_epochs(self) -> float:
        """The demo recipe's warm-up share (2 of 30 epochs) of --epochs."""
        return round(RECIPES["demo"]["warmup_epochs"] * self.epochs / RECIPES["demo"]["epochs"], 4)

    def command(self) -> str:
        """The study command line that reproduces this plan, every plan option explicit."""
        python = Path(sys.executable)
        python = python.relative_to(REPO) if python.is_relative_to(REPO) else python
        parts = [str(python), "benchmarks/study.py", "--epochs", self.epochs, "--seeds", self.seeds,
                 "--ablation-seeds", self.ablation_seeds, "--n-train", self.n_train, "--n-test", self.n_test,
                 "--batch-size", self.batch_size, "--rows", ",".join(self.rows), "--precision", self.precision]
        if self.out != agmae_home() / "study":
            parts += ["--out", self.out]
        if self.docs != DEFAULT_DOCS:
            parts += ["--docs", self.docs]
        env = f"AGMAE_HOME={shlex.quote(os.environ['AGMAE_HOME'])} " if "AGMAE_HOME" in os.environ else ""
        return env + shlex.join(str(part) for part in parts)


def result_argv(argv: list) -> list:
    """A command as far as its result goes: the program by name (another clone's .venv computes the
    same) and without RESULT_NEUTRAL_OPTIONS and their values."""
    kept, skip_value = [Path(argv[0]).name], False
    for arg in argv[1:]:
        if skip_value:
            skip_value = False
        elif arg in RESULT_NEUTRAL_OPTIONS:
            skip_value = True
        else:
            kept.append(arg)
    return kept


@dataclass
class Step:
    """One subprocess of the plan. Done when its marker (written after exit status 0) records the
    same command, up to result_argv."""
    id: str
    kind: str  # dataset, discover, train, eval
    argv: list
    log: Path
    marker: Path
    needs: tuple = ()
    estimate: float = 0.0
    run_dir: Path | None = None
    stale_output: Path | None = None  # removed before the step is redone with another command

    def done(self) -> bool:
        if not self.marker.is_file():
            return False
        return result_argv(json.loads(self.marker.read_text())["argv"]) == result_argv(self.argv)

    def stale(self) -> bool:
        """Finished once, with a command other than the plan's now."""
        return self.marker.is_file() and not self.done()

    def seconds(self) -> float:
        return json.loads(self.marker.read_text())["seconds"] if self.done() else 0.0


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


@dataclass
class Plan:
    config: Config
    rows: list  # Row
    runs: dict  # (row name, seed) -> Run
    steps: list  # every Step once, in execution order


def _slug(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _dataset_step(config: Config, correlation: float) -> tuple[Step, Path]:
    """The step that builds the demo dataset (once, into AGMAE_HOME/demo/, where ensure_demo puts it), and its root."""
    variant = demo_name(correlation, DEMO_SEED, config.n_train, config.n_test)
    folder = config.out / "data"
    step = Step(id=f"dataset {variant}", kind="dataset",
                argv=[sys.executable, "-c", "import sys; from data.demo import ensure_demo; "
                      "print(ensure_demo(float(sys.argv[1]), *map(int, sys.argv[2:])))",
                      str(correlation), str(DEMO_SEED), str(config.n_train), str(config.n_test)],
                log=folder / f"{variant}.log", marker=folder / f"{variant}.done.json",
                estimate=DATASET_SECONDS * config.n_train / 10000)
    return step, agmae_home() / "demo" / variant


def _discover_step(config: Config, maps: str, dataset: Step, root: Path) -> tuple[Step, Path]:
    """The step that computes the map store of recipe `maps` on a dataset's train split, and the store."""
    folder = config.out / "maps" / root.name
    store = folder / f"{maps}.h5"
    step = Step(id=f"discover {root.name}/{maps}", kind="discover",
                argv=[console_script("agmae-discover"), *MAPS[maps], "--data", str(root / "train"), "--out", str(store)],
                log=folder / f"{maps}.log", marker=folder / f"{maps}.done.json", needs=(dataset.id,),
                estimate=DISCOVER_SECONDS[maps] * config.n_train / 10000, stale_output=store)
    return step, store


def _training_options(config: Config, row: Row, seed: int) -> tuple[str, list]:
    """A short name of the row's training configuration and its agmae-train options (without paths)."""
    options = ["--model", RECIPES["demo"]["model"], "--epochs", str(config.epochs),
               "--warmup-epochs", _slug(config.warmup_epochs()), "--batch-size", str(config.batch_size),
               "--blr", _slug(RECIPES["demo"]["blr"]), "--precision", config.precision, "--seed", str(seed)]
    if row.maps is None:
        return "vanilla", ["--no-guidance", *options]
    guidance = {**GUIDANCE_DEFAULTS, **row.guidance}
    if guidance["tau-schedule"] == "constant":
        guidance.pop("tau-end")
    name = "-".join([row.maps, *(_slug(v) for v in guidance.values())])
    return name, [*(arg for key, value in guidance.items() for arg in (f"--{key}", _slug(value))), *options]


def _run(config: Config, row: Row, seed: int, root: Path, store: Path | None, upstream: list) -> Run:
    """The training run of (row, seed) and its evaluations, in a run directory named by its configuration
    (rows with the same configuration get the same directory, hence share the run)."""
    name, options = _training_options(config, row, seed)
    # Paths stay out of the identity, so moving AGMAE_HOME or --out keeps the run names.
    identity = json.dumps({"dataset": root.name, "maps": MAPS.get(row.maps), "train": options}, sort_keys=True)
    run_dir = (config.out / "runs" / root.name /
               f"{name}-e{config.epochs}-s{seed}-{sha256(identity.encode()).hexdigest()[:8]}")
    label, step_dir = run_dir.relative_to(config.out), run_dir / "study"
    maps = ["--maps", str(store)] if store else []
    train = Step(id=f"train {label}", kind="train",
                 argv=[console_script("agmae-train"), *maps, *options, "--data", str(root / "train"), "--out", str(run_dir),
                       "--save-every", "1", "--keep-every", str(KEEP_EVERY)],
                 log=step_dir / "train.log", marker=step_dir / "agmae.train.done.json",
                 needs=tuple(step.id for step in upstream), run_dir=run_dir,
                 estimate=3 * STARTUP_SECONDS + TRAIN_EPOCH_SECONDS * config.epochs * config.n_train / 10000)
    evals = {
        protocol: Step(id=f"{protocol} {label}", kind="eval",
                       argv=[console_script("agmae-eval"), *args, "--checkpoint", str(run_dir / "checkpoint-last.pth"),
                             "--run-dir", str(run_dir), "--data", str(root)],
                       log=step_dir / f"{protocol}.log", marker=step_dir / f"{protocol}.done.json",
                       needs=(train.id,), run_dir=run_dir,
                       estimate=STARTUP_SECONDS + EVAL_SECONDS[protocol] * config.n_train / 10000)
        for protocol, (args, _) in EVALS.items()
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
    for seed in range(max(config.seeds, config.ablation_seeds)):
        for row in rows:
            if seed not in config.seeds_of(row):
                continue
            dataset, root = _dataset_step(config, row.correlation)
            upstream, store = [add(dataset)], None
            if row.maps is not None:
                discover, store = _discover_step(config, row.maps, dataset, root)
                upstream.append(add(discover))
            run = _run(config, row, seed, root, store, upstream)
            run.train = add(run.train)
            run.evals = {protocol: add(step) for protocol, step in run.evals.items()}
            runs[row.name, seed] = run
    return Plan(config, rows, runs, steps)


def subprocess_runner(step: Step) -> int:
    """Run the step's command with stdout and stderr appended to its log; a study killed by SIGINT or
    SIGTERM takes the running step down with it (the step resumes on the next study run)."""
    step.log.parent.mkdir(parents=True, exist_ok=True)
    with open(step.log, "a") as log:
        log.write(f"\n$ {shlex.join(step.argv)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        log.flush()
        process = subprocess.Popen(step.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            return process.wait()
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
    return lines[-1].strip()[-200:] if lines else "(empty log)"


def execute(plan: Plan, runner=subprocess_runner, echo=click.echo, on_run_complete=lambda: None) -> list:
    """Run every pending step in order; returns the ids of the steps that failed or were skipped because a
    step they need failed. Prints one line per finished step with the elapsed time and the plan's ETA."""
    pending = [step for step in plan.steps if not step.done()]
    total_estimate = sum(step.estimate for step in pending)
    echo(f"plan: {len(plan.runs)} row-seeds on {len({r.run_dir for r in plan.runs.values()})} runs, "
         f"{len(plan.steps)} steps, {len(pending)} to do, first estimate {_duration(total_estimate)}")
    measured, estimated = {}, {}
    failed, started = [], time.monotonic()

    def eta(remaining) -> float:
        overall = sum(measured.values()) / sum(estimated.values()) if estimated else 1.0
        return sum(step.estimate * (measured[step.kind] / estimated[step.kind] if step.kind in estimated
                                    else overall) for step in remaining)

    for position, step in enumerate(pending, 1):
        if any(need in failed for need in step.needs):
            failed.append(step.id)
            echo(f"[{position:>3}/{len(pending)}] skipped {step.id}: a step it needs failed")
            continue
        if step.stale():
            echo(f"[{position:>3}/{len(pending)}] {step.id}: its command changed since it ran; redoing it")
            if step.stale_output is not None:
                step.stale_output.unlink(missing_ok=True)
        step_started = time.monotonic()
        status = runner(step)
        seconds = time.monotonic() - step_started
        if status == 0:
            atomic_write_text(json.dumps({"argv": step.argv, "seconds": round(seconds, 2),
                                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1), step.marker)
            measured[step.kind] = measured.get(step.kind, 0.0) + seconds
            estimated[step.kind] = estimated.get(step.kind, 0.0) + step.estimate
            outcome = "ok"
        else:
            failed.append(step.id)
            outcome = f"FAILED (exit {status}; {step.log}: {_last_line(step.log)})"
        remaining = [s for s in pending[position:] if not any(need in failed for need in s.needs)]
        echo(f"[{position:>3}/{len(pending)}] {step.id}: {outcome} in {_duration(seconds)} | elapsed "
             f"{_duration(time.monotonic() - started)} | ETA {_duration(eta(remaining))}")
        if step.kind == "eval" and all(s.done() for s in plan.steps if s.run_dir == step.run_dir):
            on_run_complete()
    return failed


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


def aggregate(plan: Plan) -> dict:
    """results.json of the study: per row the per-seed numbers and their mean ± std, from complete runs."""
    config, rows, missing = plan.config, [], []
    for row in plan.rows:
        seeds = config.seeds_of(row)
        done = [seed for seed in seeds if plan.runs[row.name, seed].complete()]
        missing += [f"{row.name} seed {seed}" for seed in seeds if seed not in done]
        per_seed = {seed: plan.runs[row.name, seed].results() for seed in done}
        metrics = {}
        for name, (_, path) in METRICS.items():
            values = {seed: nested(results, path) for seed, results in per_seed.items()}
            if any(v is not None for v in values.values()):
                metrics[name] = {**summarise(list(values.values())), "per_seed": {str(s): v for s, v in values.items()}}
        first = plan.runs[row.name, seeds[0]]
        rows.append(dict(
            name=row.name, note=row.note, maps=row.maps, maps_command=list(MAPS[row.maps]) if row.maps else None,
            correlation=row.correlation, guidance=({**GUIDANCE_DEFAULTS, **row.guidance} if row.maps else None),
            seeds_planned=seeds, seeds_done=done, metrics=metrics,
            runs={str(seed): dict(run_dir=str(plan.runs[row.name, seed].run_dir),
                                  commands=[display_command(step.argv) for step in plan.runs[row.name, seed].steps()])
                  for seed in seeds},
            train_command_seed0=display_command(first.train.argv),
        ))
    seconds = {}
    for step in plan.steps:
        seconds[step.kind] = seconds.get(step.kind, 0.0) + step.seconds()
    return dict(
        command=config.command(), generated=time.strftime("%Y-%m-%dT%H:%M:%S%z"), complete=not missing,
        missing=missing, plan=dict(epochs=config.epochs, warmup_epochs=config.warmup_epochs(), seeds=config.seeds,
                                   ablation_seeds=config.ablation_seeds, n_train=config.n_train,
                                   n_test=config.n_test, batch_size=config.batch_size, precision=config.precision,
                                   model=RECIPES["demo"]["model"], blr=RECIPES["demo"]["blr"], knn_k=20),
        wall_seconds=dict(total=round(sum(seconds.values()), 1), **{k: round(v, 1) for k, v in seconds.items()}),
        rows=rows,
    )


def _cell(metric: dict | None) -> str:
    if not metric or metric["mean"] is None:
        return "—"
    return f"{metric['mean']:.1f}" + (f" ± {metric['std']:.1f}" if metric["std"] is not None else "")


def _setup(row: dict) -> str:
    if row["maps"] is None:
        return "—"
    g = row["guidance"]
    tau = (f"τ = {g['tau-start']:g}" if g["tau-schedule"] == "constant"
           else f"τ cos {g['tau-start']:g}→{g['tau-end']:g}")
    return f"{row['maps']}, {tau}, {g['weight-norm']}"


def render_markdown(summary: dict, findings: str = "") -> str:
    """RESULTS.md: the generated tables, after the hand-written findings (docs/FINDINGS.md) when there are any."""
    plan, rows = summary["plan"], summary["rows"]
    wall = summary["wall_seconds"]
    lines = ["# AttG study results", ""]
    if findings.strip():
        lines += [findings.strip(), "", "## The tables (generated by benchmarks/study.py)", ""]
    if not summary["complete"]:
        lines += [f"**PARTIAL**: {len(summary['missing'])} row-seeds not finished yet: "
                  + ", ".join(summary["missing"]) + ". Re-run the command below to continue.", ""]
    lines += [
        "Reproduce (resumable; each finished run is skipped):", "", "```", summary["command"], "```", "",
        f"Demo dataset ({plan['n_train']} train / {plan['n_test']} per test split, 64 px), model "
        f"`{plan['model']}`, epochs {plan['epochs']} (warm-up {plan['warmup_epochs']:g}), batch {plan['batch_size']}, "
        f"blr {plan['blr']:g}, precision {plan['precision']}, identical for every row. Numbers are top-1 % "
        f"(k-NN: k = {plan['knn_k']}, CLS features unless marked; linear: cached-feature probe), "
        "mean ± sample std (n − 1) over the n finished seeds. Maps: oracle = masks area-averaged to a 28×28 "
        "grid (resampled with each crop onto the 8×8 patch grid); "
        "tokencut / gradcam = EfficientNet-Lite0 at 224 px; dino-random = CLS attention of a random ViT-S/8 "
        "at 64 px. BG-gap = mixed-same − mixed-rand (only with correlated backgrounds, p > 0). "
        "clean-fg = k-NN of only-fg queries against the training objects on black.",
        "",
        f"Wall time (sum of the recorded step times): {_duration(wall['total'])} ("
        + ", ".join(f"{kind} {_duration(s)}" for kind, s in wall.items() if kind != "total") + ").",
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
    lines += ["", "## Training command of each row (seed 0; other seeds differ in --seed and --out)", ""]
    for row in rows:
        lines += [f"- `{row['name']}`" + (f" ({row['note']})" if row["note"] else "") + ":",
                  f"  `{row['train_command_seed0']}`"]
    lines += ["", "Per-seed numbers, run directories and every command: `results.json` beside this file.", ""]
    return "\n".join(lines)


def write_report(plan: Plan) -> dict:
    summary = aggregate(plan)
    atomic_write_text(json.dumps(summary, indent=2) + "\n", plan.config.docs / "results.json")
    findings = plan.config.docs / FINDINGS
    atomic_write_text(render_markdown(summary, findings.read_text() if findings.is_file() else ""),
                      plan.config.docs / "RESULTS.md")
    return summary


def _default_precision() -> str:
    """What agmae-train picks on the demo dataset (the demo recipe's `native`) on this CPU, as a concrete
    precision so that the plan records what ran."""
    import torch

    return resolve_precision(RECIPES["demo"]["precision"], torch.device("cpu"), training=True)


def make_config(quick=False, epochs=None, seeds=None, ablation_seeds=None, n_train=None, n_test=None,
                batch_size=None, rows=None, out=None, docs=None, precision=None) -> Config:
    defaults = QUICK_DEFAULTS if quick else FULL_DEFAULTS
    given = dict(epochs=epochs, seeds=seeds, ablation_seeds=ablation_seeds, n_train=n_train, n_test=n_test,
                 batch_size=batch_size, rows=rows)
    values = {name: defaults[name] if value is None else value for name, value in given.items()}
    names = tuple(name.strip() for name in values["rows"].split(",") if name.strip())
    unknown = [name for name in names if name not in ROW_NAMES]
    if unknown or not names:
        raise click.BadParameter(f"unknown row(s) {', '.join(unknown) or '(none given)'}; choose from "
                                 f"{', '.join(ROW_NAMES)}", param_hint="--rows")
    for name in ("epochs", "seeds", "ablation_seeds", "batch_size"):
        if values[name] < 1:
            raise click.BadParameter(f"{values[name]} must be >= 1", param_hint="--" + name.replace("_", "-"))
    out = Path(out) if out else agmae_home() / "study"
    docs = Path(docs) if docs else (out / "docs" if quick else DEFAULT_DOCS)
    return Config(**{**values, "rows": names}, out=out.resolve(), docs=docs.resolve(),
                  precision=precision or _default_precision())


def run_study(config: Config, runner=subprocess_runner, echo=click.echo, report_only=False) -> dict:
    """Run (or, with report_only, only report) the plan; returns the summary written to the docs."""
    plan = build_plan(config)
    failed = [] if report_only else execute(plan, runner, echo, on_run_complete=lambda: write_report(plan))
    summary = write_report(plan)
    echo(f"wrote {config.docs / 'RESULTS.md'} and results.json: {sum(len(r['seeds_done']) for r in summary['rows'])}"
         f" row-seeds complete, {len(summary['missing'])} missing; recorded step time "
         f"{_duration(summary['wall_seconds']['total'])}")
    if failed:
        raise click.ClickException(f"{len(failed)} steps failed or were skipped (first: {failed[0]}); their logs "
                                   "are in the run directories; fix the cause and re-run to continue")
    return summary


def print_plan(plan: Plan, echo=click.echo) -> None:
    """One line per step (done with its recorded time, or pending with its first estimate), then the total
    estimate of what is pending."""
    for step in plan.steps:
        state, seconds = (("done   ", step.seconds()) if step.done() else
                          ("stale  " if step.stale() else "pending", step.estimate))
        echo(f"{state} {_duration(seconds):>7}  {step.id}")
    pending = [step for step in plan.steps if not step.done()]
    echo(f"{len(pending)} of {len(plan.steps)} steps pending, first estimate "
         f"{_duration(sum(step.estimate for step in pending))}; row-seeds: {len(plan.runs)}, distinct runs: "
         f"{len({run.run_dir for run in plan.runs.values()})}")


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--epochs", type=int, help=f"Training epochs of every run. [default: {FULL_DEFAULTS['epochs']}; "
                                         f"--quick {QUICK_DEFAULTS['epochs']}]")
@click.option("--seeds", type=int, help=f"Seeds of the main rows (vanilla, guided-*). [default: "
                                        f"{FULL_DEFAULTS['seeds']}; --quick {QUICK_DEFAULTS['seeds']}]")
@click.option("--ablation-seeds", type=int, help="Seeds of the τ, weight-norm and p = 0.8 rows. [default: 1]")
@click.option("--n-train", type=int, help=f"Demo training images (both datasets). [default: "
                                          f"{FULL_DEFAULTS['n_train']}; --quick {QUICK_DEFAULTS['n_train']}]")
@click.option("--n-test", type=int, help=f"Demo images per test split. [default: {FULL_DEFAULTS['n_test']}; "
                                         f"--quick {QUICK_DEFAULTS['n_test']}]")
@click.option("--batch-size", type=int, help=f"Training batch of every run. [default: {FULL_DEFAULTS['batch_size']}"
                                             f" (the demo recipe); --quick {QUICK_DEFAULTS['batch_size']}]")
@click.option("--rows", help="Comma-separated subset of the rows: " + ", ".join(ROW_NAMES)
                             + f". [default: all; --quick {','.join(QUICK_ROWS)}]")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]),
              help="Training autocast precision. [default: bf16 where the CPU has native bf16, else fp32, as "
                   "agmae-train does on the demo dataset]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Study directory: map stores, runs, logs, step markers. [default: AGMAE_HOME/study]")
@click.option("--docs", type=click.Path(file_okay=False, path_type=Path),
              help="Where RESULTS.md and results.json go. [default: the repository's docs/; --quick OUT/docs]")
@click.option("--quick", is_flag=True, help="Smoke configuration: 240 train / 60 test images, 1 epoch, batch 64, "
                                           "1 seed, rows vanilla and guided-oracle (any option above overrides).")
@click.option("--report-only", is_flag=True, help="Only regenerate the docs from the finished runs of this plan.")
@click.option("--dry-run", is_flag=True, help="Print the plan's steps, which are done, and the time estimate; "
                                             "run nothing, write nothing.")
def main(quick, report_only, dry_run, **options):
    """Run the AttG study (vanilla vs guided MAE, τ and weight-norm ablations, BG-gap) and write its tables."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    config = make_config(quick=quick, **options)
    if dry_run:
        print_plan(build_plan(config))
        return
    try:
        run_study(config, report_only=report_only)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; re-run the same command to continue where it stopped") from None


if __name__ == "__main__":
    main()
