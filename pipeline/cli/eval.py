"""`agmae-eval`: frozen-feature evaluation of a checkpoint (SPEC.md Stage 3).

Subcommands knn, linear, retrieval, robustness, attention, and all. With no options they
evaluate the default run directory's last checkpoint on the built-in demo dataset (train =
bank / probe training set, `original` = queries); `--data ROOT` takes an image-folder dataset
with ROOT/train and ROOT/val. Features are cached per checkpoint hash + dataset fingerprint +
options, so re-running with other k, T or probe settings does not re-extract. Every command
updates its own key of RUN_DIR/results.json (atomically) and prints a compact table.
Distributed: launch with torchrun/srun; extraction and the augmented linear probe use every
rank, rank 0 writes the results.
"""
import time
from pathlib import Path

import click

from agmae.eval.knn import DEFAULT_T, HEADLINE_K, KS
from agmae import options
from agmae.hardware import INFERENCE_PRECISIONS
from agmae.options import click_option

POOLS = ("cls", "mean")
LINEAR_MODES = ("augmented", "cached")


def _compose(*decorators):
    """Apply click decorators in the order listed, so one definition serves every subcommand."""
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


checkpoint_option = click.option(
    "--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="agmae-train checkpoint or exported timm ViT state dict. Default: RUN_DIR/checkpoint-last.pth.")
run_dir_option = click.option(
    "--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where results.json is written (and the default checkpoint and map stores are found). Default: the "
         "checkpoint's folder if --checkpoint is given, else the default run directory (AGMAE_RUN_DIR or "
         "AGMAE_HOME/runs/default).")
dataset_options = _compose(
    click_option("data", options.data_option("Dataset root holding one image folder per split "
                                             "(ROOT/<split>/<class>/<image>). Default: the built-in demo dataset.")),
    click.option("--train-split", default="train", show_default=True,
                 help="Split used as the k-NN / retrieval bank and the linear probe's training set."),
    click.option("--demo-correlation", type=float, default=0.0, show_default=True,
                 help="Background-class correlation of the demo dataset to use when --data is not given "
                      "(> 0 adds the mixed-same split and the BG-gap)."),
)
test_split_option = click.option(
    "--test-split", default=None,
    help="Split used as queries / test set. Default: 'original' where ROOT has it (demo), else 'val'.")
feature_options = _compose(
    click.option("--pool", type=click.Choice(POOLS), default="cls", show_default=True,
                 help="Feature: final-norm CLS token, or mean of the final-norm patch tokens."),
    click.option("--batch-size", type=int, default=128, show_default=True, help="Images per extraction batch (per rank)."),
    click_option("workers", options.workers_option(4, "DataLoader worker processes (up to 4, one CPU left to "
                                                      "this process).")),
    click_option("device", options.device_option()),
    click_option("precision", options.precision_option("Encoder autocast while extracting; part of the feature "
                                                       "cache key.", choices=INFERENCE_PRECISIONS)),
    click.option("--no-cache", is_flag=True, help="Re-extract features instead of using AGMAE_HOME/features."),
)
knn_options = _compose(
    click.option("--k", "ks", type=int, multiple=True, default=KS, show_default=True,
                 help="Neighbour counts (repeat the option); one search for the largest, then sliced. "
                      "A k above the bank size is clamped to it with a warning."),
    click.option("--temperature", type=float, default=DEFAULT_T, show_default=True, help="Vote weight exp(cos / T)."),
)
linear_options = _compose(
    click.option("--mode", type=click.Choice(LINEAR_MODES), default="augmented", show_default=True,
                 help="augmented: the MAE protocol (RandomResizedCrop + flip through the frozen encoder); "
                      "cached: fast probe on the cached eval-view features, no augmentation (labelled so)."),
    click.option("--epochs", type=int, default=90, show_default=True, help="Linear probe epochs."),
    click.option("--warmup-epochs", type=float, default=10, show_default=True, help="Linear warm-up epochs."),
    click.option("--linear-batch-size", type=int, default=256, show_default=True, help="Probe batch size (per rank)."),
    click.option("--blr", type=float, default=None,
                 help="Probe base lr: lr = blr × effective batch / 256. [default: MAE's 0.1; 12.8 on the built-in "
                      "demo dataset, whose 10k images need 128x the LARS steps' length to train the probe as far]"),
    click_option("seed", options.seed_option("Seed of the probe's init and data order.")),
)
splits_option = click.option(
    "--splits", multiple=True,
    help="Test splits for robustness (repeat the option); they must share the train split's class names. "
         "Default: those of original, mixed-rand, only-fg, mixed-same that exist under the dataset root.")
attention_options = _compose(
    click.option("--maps", "map_stores", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
                 help="Attention stores to score (repeat the option). Default: every RUN_DIR/maps-*.h5."),
    click.option("--prior-sigma", type=float, default=0.25, show_default=True,
                 help="Width of the centre-prior baseline's Gaussian, as a fraction of the image side."),
)


class Session:
    """What every subcommand shares: process group, run directory, dataset root, cached features."""

    def __init__(self, opts: dict):
        from agmae import distributed
        from agmae.paths import default_run_dir, last_checkpoint

        self.opts = opts
        self.env, self.device = distributed.init(opts.get("device", "auto"))
        checkpoint = opts.get("checkpoint")
        self.run_dir = opts["run_dir"] or (checkpoint.parent if checkpoint else default_run_dir())
        self.checkpoint = checkpoint or last_checkpoint(self.run_dir)
        if opts["data"] is None:
            from agmae.data.demo import ensure_demo

            self.root = Path(ensure_demo(correlation=opts["demo_correlation"]))
        else:
            self.root = opts["data"]
        if "blr" in opts and opts["blr"] is None:
            from agmae.data.demo import is_demo_root
            from agmae.eval.linear import DEMO_BLR, MAE_BLR

            opts["blr"] = DEMO_BLR if is_demo_root(self.root) else MAE_BLR
        self.default_test_split = "original" if (self.root / "original").is_dir() else "val"
        self.test_split = opts.get("test_split") or self.default_test_split
        self._source = None
        self._features = {}

    @property
    def source(self):
        if self._source is None:
            from agmae.eval.features import FeatureSource

            self._source = FeatureSource(self.checkpoint, pool=self.opts["pool"], batch_size=self.opts["batch_size"],
                                         workers=self.opts["workers"], device=self.device,
                                         use_cache=not self.opts["no_cache"], progress=self.env.is_main,
                                         precision=self.opts["precision"])
        return self._source

    def has_split(self, name: str) -> bool:
        return (self.root / name).is_dir()

    def split_root(self, name: str) -> Path:
        if not self.has_split(name):
            raise click.ClickException(f"split folder {self.root / name} does not exist; pass --data ROOT with "
                                       f"ROOT/{name}, or choose another split (--train-split/--test-split/--splits)")
        return self.root / name

    def features(self, name: str):
        if name not in self._features:
            self._features[name] = self.source.features(self.split_root(name))
        return self._features[name]

    def protocol_key(self, name: str, uses_test_split: bool = True) -> str:
        """results.json key: the protocol, qualified by every choice that changes its numbers
        (a non-default pool or test split), so evaluations of one run never overwrite each other."""
        qualifiers = [f"pool={self.opts['pool']}"] if self.opts["pool"] != "cls" else []
        if uses_test_split and self.test_split != self.default_test_split:
            qualifiers.append(f"split={self.test_split}")
        return f"{name}[{','.join(qualifiers)}]" if qualifiers else name

    def record(self, protocol: str, options: dict, results: dict, splits, started: float, table: str) -> None:
        """Write results.json's entry for protocol and print the table (rank 0 only)."""
        if not self.env.is_main:
            return
        from agmae.eval.report import update_results

        entry = dict(
            checkpoint=str(Path(self.checkpoint).resolve()), checkpoint_sha256=self.source.checkpoint_sha256,
            dataset=dict(root=str(self.root.resolve()),
                         keys_sha256={name: self.features(name).index.keys_sha256 for name in splits}),
            protocol=protocol, options=options, results=results, seconds=round(time.time() - started, 2),
        )
        path = update_results(self.run_dir, protocol, entry)
        click.echo(f"\n{protocol} — {self.checkpoint}\n{table}\nresults: {path}")


def _feature_opts(opts: dict) -> dict:
    return {name: opts[name] for name in ("pool", "precision")}


def _linear_opts(opts: dict) -> dict:
    return {name: opts[name] for name in ("epochs", "warmup_epochs", "linear_batch_size", "blr", "seed")}


def run_knn(session: Session) -> None:
    from agmae.eval.knn import knn_evaluate
    from agmae.eval.report import format_table
    from agmae.eval.robustness import check_same_classes

    opts, started = session.opts, time.time()
    train, test = session.features(opts["train_split"]), session.features(session.test_split)
    if not session.env.is_main:
        return
    check_same_classes(train, {session.test_split: test})
    ks = tuple(sorted(set(opts["ks"])))
    results = knn_evaluate(train.feats, train.index.labels, test.feats, test.index.labels, len(train.index.classes),
                           ks=ks, T=opts["temperature"], progress=True)
    table = format_table(["k", "top-1", "top-5"], [[k, r["top1"], r["top5"]] for k, r in
                                                   ((int(key[2:]), r) for key, r in results.items())])
    options = dict(**_feature_opts(opts), ks=list(ks), T=opts["temperature"], train_split=opts["train_split"],
                   test_split=session.test_split, headline=f"k={HEADLINE_K}")
    session.record(session.protocol_key("knn"), options, results, [opts["train_split"], session.test_split],
                   started, table)


def run_linear(session: Session) -> None:
    from agmae.eval.features import image_size_of
    from agmae.eval.linear import MODES, probe_accuracy, train_probe_augmented, train_probe_cached
    from agmae.eval.report import format_table
    from agmae.eval.robustness import check_same_classes

    opts, started = session.opts, time.time()
    train, test = session.features(opts["train_split"]), session.features(session.test_split)
    check_same_classes(train, {session.test_split: test})
    num_classes = len(train.index.classes)
    common = dict(epochs=opts["epochs"], warmup_epochs=opts["warmup_epochs"], batch_size=opts["linear_batch_size"],
                  blr=opts["blr"], seed=opts["seed"], progress=session.env.is_main)
    if opts["mode"] == "cached":
        if not session.env.is_main:
            return
        probe, losses, lr = train_probe_cached(train.feats, train.index.labels, num_classes, **common)
    else:
        encoder = session.source.encoder()
        probe, losses, lr = train_probe_augmented(
            encoder, train.index, image_size_of(session.source.timm_kwargs), num_classes, pool=opts["pool"],
            workers=opts["workers"], device=session.device, **common)
    if not session.env.is_main:
        return
    accuracy = probe_accuracy(probe, test.feats, test.index.labels)
    results = dict(mode=MODES[opts["mode"]], **accuracy, lr=lr, final_loss=losses[-1] if losses else None)
    table = format_table(["mode", "top-1", "top-5"], [[MODES[opts["mode"]], accuracy["top1"], accuracy["top5"]]])
    key = "linear" if opts["mode"] == "augmented" else "linear-cached"
    options = dict(**_feature_opts(opts), **_linear_opts(opts), mode=opts["mode"], train_split=opts["train_split"],
                   test_split=session.test_split)
    session.record(session.protocol_key(key), options, results, [opts["train_split"], session.test_split],
                   started, table)


def run_retrieval(session: Session) -> None:
    from agmae.eval.report import format_table
    from agmae.eval.retrieval import retrieval_metrics
    from agmae.eval.robustness import check_same_classes

    opts, started = session.opts, time.time()
    train, test = session.features(opts["train_split"]), session.features(session.test_split)
    if not session.env.is_main:
        return
    check_same_classes(train, {session.test_split: test})
    results = retrieval_metrics(train.feats, train.index.labels, test.feats, test.index.labels)
    table = format_table(["mAP", "R@1", "R@5"], [[results["mAP"], results["R@1"], results["R@5"]]])
    options = dict(**_feature_opts(opts), train_split=opts["train_split"], test_split=session.test_split,
                   relevance="same class")
    session.record(session.protocol_key("retrieval"), options, results, [opts["train_split"], session.test_split],
                   started, table)


def robustness_splits(session: Session) -> list[str]:
    from agmae.eval.robustness import DEMO_SPLITS

    return list(session.opts["splits"]) or [name for name in DEMO_SPLITS if session.has_split(name)]


def run_robustness(session: Session) -> None:
    from agmae.eval.linear import train_probe_cached
    from agmae.eval.report import format_table
    from agmae.eval.robustness import CLEAN_FG_BANK, CLEAN_FG_QUERIES, robustness_results

    opts, started = session.opts, time.time()
    names = robustness_splits(session)
    if not names:
        raise click.ClickException(f"no robustness splits under {session.root}; pass --splits NAME (repeatable)")
    train = session.features(opts["train_split"])
    splits = {name: session.features(name) for name in names}
    clean_fg = session.has_split(CLEAN_FG_BANK) and CLEAN_FG_QUERIES in splits
    clean_fg_bank = session.features(CLEAN_FG_BANK) if clean_fg else None
    if not session.env.is_main:
        return
    probe, _, _ = train_probe_cached(train.feats, train.index.labels, len(train.index.classes),
                                     epochs=opts["epochs"], warmup_epochs=opts["warmup_epochs"],
                                     batch_size=opts["linear_batch_size"], blr=opts["blr"], seed=opts["seed"])
    k = HEADLINE_K if HEADLINE_K in opts["ks"] else max(opts["ks"])
    results = robustness_results(train, splits, probe=probe, clean_fg_bank=clean_fg_bank, k=k, T=opts["temperature"])
    results["linear_mode"] = "cached-features (no augmentation)"
    rows = [[name, r["knn_top1"], r["linear_top1"]] for name, r in results["splits"].items()]
    if "bg_gap" in results:
        rows.append(["BG-gap (mixed-same − mixed-rand)", results["bg_gap"]["knn_top1"], results["bg_gap"]["linear_top1"]])
    if "clean_fg_knn_top1" in results:
        rows.append([f"clean-fg k-NN ({CLEAN_FG_BANK} bank, {CLEAN_FG_QUERIES} queries)", results["clean_fg_knn_top1"], None])
    table = format_table(["split", f"k-NN top-1 (k={k})", "linear top-1 (cached)"], rows)
    options = dict(**_feature_opts(opts), **_linear_opts(opts), k=k, T=opts["temperature"],
                   train_split=opts["train_split"], splits=names)
    used = [opts["train_split"], *names] + ([CLEAN_FG_BANK] if clean_fg else [])
    # robustness reads its own --splits, so `all --test-split X` must not label it with X
    session.record(session.protocol_key("robustness", uses_test_split=False), options, results, used, started, table)


def attention_stores(session: Session) -> list[Path]:
    return list(session.opts["map_stores"]) or sorted(Path(session.run_dir).glob("maps-*.h5"))


def run_attention(session: Session) -> None:
    from agmae.data.demo import load_mask
    from agmae.data.folder import scan
    from agmae.eval.attention import centre_prior, evaluate_prior, evaluate_store
    from agmae.eval.report import format_table, update_results
    from agmae.store import open_maps

    opts, started = session.opts, time.time()
    if not session.env.is_main:
        return
    stores = attention_stores(session)
    if not stores:
        raise click.ClickException(f"no map stores in {session.run_dir} (maps-*.h5); run agmae-discover or pass --maps FILE")
    split = opts["train_split"]
    masks_dir = session.root / "masks" / split
    if not masks_dir.is_dir():
        raise click.ClickException(f"no ground-truth masks at {masks_dir}; attention quality needs ROOT/masks/{split}/<key>")
    index = scan(session.split_root(split))

    def mask_of(key):
        return load_mask(session.root, split, key)

    results, rows, grids = {}, [], []
    for path in stores:
        store = open_maps(path)
        unknown = set(store.keys) - set(index.keys)
        if unknown:
            raise click.ClickException(f"{path}: {len(unknown)} keys (e.g. {sorted(unknown)[0]}) are not images of "
                                       f"{session.root / split}; pass the store computed on this split")
        scores = evaluate_store(store, mask_of, progress=True)
        name = f"{store.attrs['method']} ({path.name})"
        results[name] = dict(path=str(path.resolve()), method=store.attrs["method"], grid=list(store.attrs["grid"]),
                             **scores)
        rows.append([name, scores["mean_iou"], scores["pointing"], scores["images"], scores["skipped"]])
        if tuple(store.attrs["grid"]) not in grids:
            grids.append(tuple(store.attrs["grid"]))
    # The baseline at each store's grid: a coarser grid scores differently, even for the same prior.
    for grid in grids:
        prior = evaluate_prior(centre_prior(*grid, sigma=opts["prior_sigma"]), index.keys, mask_of)
        at_grid = "" if len(grids) == 1 else f" {grid[0]}x{grid[1]}"
        results["centre-prior" + at_grid] = dict(grid=list(grid), sigma=opts["prior_sigma"], **prior)
        rows.append([f"centre prior{at_grid} (σ={opts['prior_sigma']})", prior["mean_iou"], prior["pointing"],
                     prior["images"], 0])
    table = format_table(["method", "mean IoU", "pointing", "images", "skipped"], rows)
    entry = dict(dataset=dict(root=str(session.root.resolve()), split=split, keys_sha256=index.keys_sha256),
                 protocol="attention", options=dict(prior_sigma=opts["prior_sigma"], threshold="map mean"),
                 results=results, seconds=round(time.time() - started, 2))
    path = update_results(session.run_dir, "attention", entry)
    click.echo(f"\nattention — {session.root / split}\n{table}\nresults: {path}")


def _run(protocols, opts: dict) -> None:
    from agmae import distributed

    try:
        session = Session(opts)
        for protocol in protocols:
            protocol(session)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    finally:
        distributed.shutdown()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Evaluate a frozen encoder: k-NN, linear probe, retrieval, background robustness, attention quality."""


encoder_options = _compose(checkpoint_option, run_dir_option, dataset_options, feature_options)
common_options = _compose(encoder_options, test_split_option)


@main.command()
@common_options
@knn_options
def knn(**opts):
    """Weighted k-NN (DINO protocol): top-1/top-5 for each --k; k=20 is the headline."""
    _run([run_knn], opts)


@main.command()
@common_options
@linear_options
def linear(**opts):
    """Linear probe (MAE protocol: BN + Linear, LARS, warm-up + cosine); --mode cached for the fast variant."""
    _run([run_linear], opts)


@main.command()
@common_options
def retrieval(**opts):
    """Retrieval of the train split by each test image: mAP, Recall@1, Recall@5 (same class = relevant)."""
    _run([run_retrieval], opts)


@main.command()
@encoder_options
@splits_option
@knn_options
@linear_options
def robustness(**opts):
    """Accuracy on background-changed splits (k-NN + cached-feature linear), BG-gap, clean-fg k-NN."""
    _run([run_robustness], opts)


@main.command()
@run_dir_option
@dataset_options
@attention_options
def attention(**opts):
    """Mean IoU and pointing accuracy of map stores against ground-truth masks, plus a centre-prior row."""
    _run([run_attention], opts)


@main.command(name="all")
@common_options
@knn_options
@linear_options
@splits_option
@attention_options
def run_all(**opts):
    """Every protocol that applies: knn, linear, retrieval; robustness where the dataset has background
    splits; attention where the run has map stores and the dataset has masks."""

    def robustness_if_any(session):
        if robustness_splits(session):
            run_robustness(session)

    def attention_if_any(session):
        if attention_stores(session) and (session.root / "masks" / opts["train_split"]).is_dir():
            run_attention(session)

    _run([run_knn, run_linear, run_retrieval, robustness_if_any, attention_if_any], opts)


if __name__ == "__main__":
    main()
