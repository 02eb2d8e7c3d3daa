"""The evaluation protocols as functions: knn, linear, retrieval, robustness over an encoder's features
(`Evaluation`), attention over map stores, finetune over the encoder's weights. Each returns an `Outcome`
(its results.json key, its typed entry `agmae.eval.report.Result`, and its table); `record` writes any of them to
RUN_DIR/results.json, the one results path, and `agmae.eval.report.load_results` reads them back typed.
`agmae-eval` is a thin layer over these (docs/METHOD.md#evaluation-protocols).

The options of each protocol are defined once, as fields (`FeatureOptions`, `KnnOptions`,
`ProbeOptions`, `AttentionOptions`, and `FinetuneOptions` in eval/finetune.py), from which the CLI
generates its click options.
"""
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from agmae import distributed
from agmae.data import demo
from agmae.data.folder import scan, split_folder
from agmae.eval import attention, finetune, knn, linear, retrieval, robustness, segment
from agmae.eval.features import POOLS, FeatureSource, image_size_of, readable_index
from agmae.eval.finetune import FinetuneOptions
from agmae.eval.segment import SegmentOptions
from agmae.eval.report import (AttentionMetrics, AttentionScores, FinetuneMetrics, KnnMetrics, LinearMetrics, Result,
                               RetrievalMetrics, RobustnessMetrics, SplitScores, TopK, format_table, update_results)
from agmae.options import (POSITIVE, POSITIVE_INT, device_option, max_failures_option, option, precision_option,
                           seed_option, validate, verify_images_option, workers_option)
from agmae.hardware import INFERENCE_PRECISIONS
from agmae.store import open_maps
from agmae.checkpoint import file_sha256
from agmae.errors import UserError


@dataclass
class FeatureOptions:
    pool: str = option("cls", "Feature: final-norm CLS token, or mean of the final-norm patch tokens.",
                       type=click.Choice(POOLS))
    batch_size: int = option(128, "Images per extraction batch (per rank).", type=POSITIVE_INT)
    workers: int = workers_option(4, "DataLoader worker processes.")
    device: str = device_option()
    precision: str = precision_option("Encoder autocast while extracting; part of the feature cache key.",
                                      choices=INFERENCE_PRECISIONS)
    no_cache: bool = option(False, "Re-extract features instead of using AGMAE_HOME/features.")
    verify_images: bool = verify_images_option("leave out those that do not")
    max_failures: float = max_failures_option("a split's images", "; fewer are left out and named in results.json")

    def __post_init__(self):
        validate(self)


@dataclass
class KnnOptions:
    ks: tuple = option(knn.KS, "Neighbour counts (repeat the option); one search for the largest, then sliced. "
                               "A k above the bank size is clamped to it (printed, and recorded as k_used).",
                       type=POSITIVE_INT, flags=("--k",), multiple=True)
    temperature: float = option(knn.DEFAULT_T, "Vote weight exp(cos / T).", type=POSITIVE)

    def __post_init__(self):
        validate(self)
        self.ks = tuple(sorted(set(self.ks)))


@dataclass
class ProbeOptions:
    mode: str = option("augmented", "augmented: the MAE protocol (RandomResizedCrop + flip through the frozen "
                                    "encoder); cached: fast probe on the cached eval-view features, no "
                                    "augmentation (labelled so).", type=click.Choice(list(linear.MODES)))
    epochs: int = option(90, "Linear probe epochs.", type=POSITIVE_INT)
    warmup_epochs: float = option(10.0, "Linear warm-up epochs.", type=click.FloatRange(min=0))
    linear_batch_size: int = option(256, "Probe batch size (per rank).", type=POSITIVE_INT)
    blr: float | None = option(None, f"Probe base lr: lr = blr × effective batch / 256. [default: MAE's "
                                     f"{linear.MAE_BLR} on ImageNet-1k, scaled by 1.28M / training images so "
                                     "that LARS trains the probe as far on a smaller set: 12.8 for the demo's 10k]",
                               type=POSITIVE)
    seed: int = seed_option("Seed of the probe's init and data order.")

    def __post_init__(self):
        validate(self)

    def fit_options(self, train_images: int) -> dict:
        """Keyword arguments of eval.linear's probe trainers, the default blr scaled to the training set."""
        blr = self.blr if self.blr is not None else linear.probe_blr(train_images)
        return dict(epochs=self.epochs, warmup_epochs=self.warmup_epochs, batch_size=self.linear_batch_size,
                    blr=blr, seed=self.seed)


@dataclass
class AttentionOptions:
    map_stores: tuple = option((), "Attention stores to score (repeat the option). Default: every "
                                   "RUN_DIR/maps-*.h5.", type=click.Path(exists=True, dir_okay=False),
                               flags=("--maps",), multiple=True)
    prior_sigma: float = option(0.25, "Width of the centre-prior baseline's Gaussian, as a fraction of the "
                                      "image side.", type=POSITIVE)

    def __post_init__(self):
        validate(self)


@dataclass
class Outcome:
    """One protocol's result: its results.json key, its typed entry (`agmae.eval.report.Result`; a plain dict for a
    protocol without a type yet), and the table printed."""

    key: str
    result: Result | dict
    table: str
    title: str = ""

    @property
    def entry(self) -> dict:
        """The entry results.json holds."""
        return self.result.to_json() if isinstance(self.result, Result) else self.result


def build_outcome(key: str, checkpoint, checkpoint_sha256: str, root, indices: dict, options: dict, results,
                  started: float, table: str, unreadable: dict) -> Outcome:
    """The results.json entry of an encoder's evaluation. indices: {split: ImageFolderIndex used}; results: the
    protocol's metrics (agmae.eval.report), or a dict for a protocol without a type; unreadable: {split: {key:
    reason}} of the images left out, named in the entry and under the table."""
    left_out = {split: dict(count=len(bad), examples=sorted(bad)[:5]) for split, bad in unreadable.items() if bad}
    if left_out:
        table += "\n" + "\n".join(f"{split}: {info['count']} unreadable images left out, e.g. "
                                  f"{', '.join(info['examples'][:3])}" for split, info in left_out.items())
    result = Result(key, results, options,
                    dict(root=str(Path(root).resolve()),
                         keys_sha256={split: index.keys_sha256 for split, index in indices.items()}),
                    checkpoint=str(Path(checkpoint).resolve()), checkpoint_sha256=checkpoint_sha256,
                    seconds=round(time.time() - started, 2), unreadable=left_out)
    return Outcome(key, result, table, title=str(checkpoint))


def default_test_split(root) -> str:
    """'original' where the dataset has it (the demo dataset), else 'val' (ImageNet's layout)."""
    return "original" if (Path(root) / "original").is_dir() else "val"


class Evaluation:
    """Features of a dataset's splits under one frozen encoder, shared by the protocols of one command.

    root: the dataset root with ROOT/<split>/<class>/<image>; test_split None = 'original' where ROOT has it
    (the demo dataset), else 'val'. Under torch.distributed every rank extracts its share; the protocols
    return None on ranks other than 0, except where a rank's work is needed (the augmented probe)."""

    def __init__(self, checkpoint, root, features: FeatureOptions, train_split: str = "train",
                 test_split: str | None = None, env=None, device=None):
        self.checkpoint, self.root, self.options = Path(checkpoint), Path(root), features
        self.env = env or distributed.DistEnv()
        self.device = device or "cpu"
        self.train_split = train_split
        self.default_test_split = default_test_split(self.root)
        self.test_split = test_split or self.default_test_split
        for split in (train_split, test_split):  # checked before the checkpoint loads: the cheaper mistake first
            if split is not None:
                self.split_root(split)
        self.source = FeatureSource(self.checkpoint, pool=features.pool, batch_size=features.batch_size,
                                    workers=features.workers, device=self.device, use_cache=not features.no_cache,
                                    progress=self.env.is_main, precision=features.precision,
                                    verify_images=features.verify_images, max_failures=features.max_failures)
        self._features = {}

    def has_split(self, name: str) -> bool:
        return (self.root / name).is_dir()

    def split_root(self, name: str) -> Path:
        return split_folder(self.root, name, option="--train-split/--test-split/--splits")

    def features(self, name: str):
        if name not in self._features:
            self._features[name] = self.source.features(self.split_root(name))
        return self._features[name]

    def key(self, name: str, uses_test_split: bool = True) -> str:
        """results.json key: the protocol, qualified by every choice that changes its numbers
        (a non-default pool or test split), so evaluations of one run never overwrite each other."""
        qualifiers = [f"pool={self.options.pool}"] if self.options.pool != "cls" else []
        if uses_test_split and self.test_split != self.default_test_split:
            qualifiers.append(f"split={self.test_split}")
        return f"{name}[{','.join(qualifiers)}]" if qualifiers else name

    def outcome(self, name: str, options: dict, results, splits, started: float, table: str,
                uses_test_split: bool = True) -> Outcome:
        """The outcome of one protocol; the options record the precision used (never "auto") and the encoder's
        timm kwargs (its head count may have been assumed: agmae.checkpoint.guess_encoder_kwargs)."""
        encoder = self.source.timm_kwargs
        options = dict(pool=self.options.pool, precision=self.source.precision, encoder=encoder, **options)
        if encoder:
            table += (f"\nencoder: depth {encoder.get('depth')}, heads {encoder.get('num_heads')}, dim "
                      f"{encoder.get('embed_dim')}, patch {encoder.get('patch_size')}, image {image_size_of(encoder)}; "
                      f"features {self.options.pool}, {self.source.precision}")
        return build_outcome(self.key(name, uses_test_split), self.checkpoint, self.source.checkpoint_sha256,
                             self.root, {split: self.features(split).index for split in splits}, options, results,
                             started, table, {split: self.features(split).unreadable for split in splits})

    def bank_and_queries(self, protocol: str):
        """(train features, test features): the train split checked to have two classes or more, the test split's
        classes checked to be the train split's (on every rank, so that none waits for one that refused)."""
        train, test = self.features(self.train_split), self.features(self.test_split)
        robustness.check_classes(train.index, protocol)
        robustness.check_same_classes(train.index, {self.test_split: test.index}, protocol)
        return train, test


def run_knn(ev: Evaluation, opts: KnnOptions) -> Outcome | None:
    """Weighted k-NN (DINO protocol): top-1/top-5 for each k; k=20 is the headline."""
    started = time.time()
    train, test = ev.bank_and_queries("k-NN")
    if not ev.env.is_main:
        return None
    results = KnnMetrics.from_json(knn.knn_evaluate(train.feats, train.index.labels, test.feats, test.index.labels,
                                                    len(train.index.classes), ks=opts.ks, T=opts.temperature,
                                                    progress=True))
    table = format_table(["k", "top-1", "top-5"], [[k, r.top1, r.top5] for k, r in results.by_k.items()])
    clamped = [k for k, used in results.k_used.items() if used != k]
    if clamped:
        table += (f"\n{', '.join(f'k={k}' for k in clamped)} exceed the bank of {len(train.index)} images: "
                  f"k={len(train.index)} used (recorded as k_used)")
    options = dict(ks=list(opts.ks), T=opts.temperature, train_split=ev.train_split, test_split=ev.test_split,
                   headline=f"k={knn.HEADLINE_K}")
    return ev.outcome("knn", options, results, [ev.train_split, ev.test_split], started, table)


def run_linear(ev: Evaluation, opts: ProbeOptions) -> Outcome | None:
    """Linear probe (MAE protocol: BN + Linear, LARS, warm-up + cosine); mode cached for the fast variant."""
    started = time.time()
    train, test = ev.bank_and_queries("the linear probe")
    num_classes, fit = len(train.index.classes), opts.fit_options(len(train.index))
    batch_size = linear.probe_batch_size(fit["batch_size"], len(train.index),
                                         1 if opts.mode == "cached" else ev.env.world_size)
    if opts.mode == "cached":
        if not ev.env.is_main:
            return None
        probe, losses, lr = linear.train_probe_cached(train.feats, train.index.labels, num_classes, **fit,
                                                      progress=True)
    else:
        probe, losses, lr = linear.train_probe_augmented(
            ev.source.encoder(), train.index, image_size_of(ev.source.timm_kwargs), num_classes,
            pool=ev.options.pool, workers=ev.options.workers, device=ev.device, progress=ev.env.is_main, **fit)
    if not ev.env.is_main:
        return None
    accuracy = linear.probe_accuracy(probe, test.feats, test.index.labels)
    mode = linear.MODES[opts.mode]
    results = LinearMetrics(mode, accuracy["top1"], accuracy.get("top5"), lr, losses[-1] if losses else None,
                            batch_size)
    table = format_table(["mode", "top-1", "top-5"], [[mode, results.top1, results.top5]])
    table += "\n" + probe_settings(fit, opts, batch_size, lr, len(train.index))
    options = dict(**asdict(opts), train_split=ev.train_split, test_split=ev.test_split)
    options["blr"] = fit["blr"]
    name = "linear" if opts.mode == "augmented" else "linear-cached"
    return ev.outcome(name, options, results, [ev.train_split, ev.test_split], started, table)


def run_retrieval(ev: Evaluation) -> Outcome | None:
    """Retrieval of the train split by each test image: mAP, Recall@1, Recall@5 (same class = relevant)."""
    started = time.time()
    train, test = ev.bank_and_queries("retrieval")
    if not ev.env.is_main:
        return None
    results = RetrievalMetrics.from_json(retrieval.retrieval_metrics(train.feats, train.index.labels, test.feats,
                                                                     test.index.labels))
    table = format_table(["mAP", "R@1", "R@5"], [[results.mAP, results.recall[1], results.recall[5]]])
    options = dict(train_split=ev.train_split, test_split=ev.test_split, relevance="same class")
    return ev.outcome("retrieval", options, results, [ev.train_split, ev.test_split], started, table)


def robustness_splits(ev: Evaluation, requested=()) -> list[str]:
    return list(requested) or [name for name in robustness.DEMO_SPLITS if ev.has_split(name)]


def run_robustness(ev: Evaluation, splits, knn_opts: KnnOptions, probe_opts: ProbeOptions,
                   clean_fg: bool = True) -> Outcome | None:
    """Accuracy on background-changed splits (k-NN + cached-feature linear), BG-gap, and (with clean_fg, where
    the dataset has its splits) clean-fg k-NN."""
    started = time.time()
    names = robustness_splits(ev, splits)
    if not names:
        raise UserError(f"no robustness splits under {ev.root}; pass --splits NAME (repeatable)")
    train = ev.features(ev.train_split)
    robustness.check_classes(train.index, "robustness")
    features = {name: ev.features(name) for name in names}
    clean_fg = clean_fg and ev.has_split(robustness.CLEAN_FG_BANK) and robustness.CLEAN_FG_QUERIES in features
    clean_fg_bank = ev.features(robustness.CLEAN_FG_BANK) if clean_fg else None
    if not ev.env.is_main:
        return None
    fit = probe_opts.fit_options(len(train.index))
    probe, _, lr = linear.train_probe_cached(train.feats, train.index.labels, len(train.index.classes), **fit)
    k = knn.HEADLINE_K if knn.HEADLINE_K in knn_opts.ks else max(knn_opts.ks)
    scores = robustness.robustness_results(train, features, probe=probe, clean_fg_bank=clean_fg_bank, k=k,
                                           T=knn_opts.temperature)
    results = RobustnessMetrics({name: SplitScores(**r) for name, r in scores["splits"].items()},
                                SplitScores(**scores["bg_gap"]) if "bg_gap" in scores else None,
                                scores.get("clean_fg_knn_top1"), linear.CACHED_MODE, min(k, len(train.index)))
    rows = [[name, r.knn_top1, r.linear_top1] for name, r in results.splits.items()]
    if results.bg_gap:
        rows.append(["BG-gap (mixed-same − mixed-rand)", results.bg_gap.knn_top1, results.bg_gap.linear_top1])
    if results.clean_fg_knn_top1 is not None:
        rows.append([f"clean-fg k-NN ({robustness.CLEAN_FG_BANK} bank, {robustness.CLEAN_FG_QUERIES} queries)",
                     results.clean_fg_knn_top1, None])
    table = format_table(["split", f"k-NN top-1 (k={results.k_used})", "linear top-1 (cached)"], rows)
    table += "\n" + probe_settings(fit, probe_opts, linear.probe_batch_size(fit["batch_size"], len(train.index)),
                                   lr, len(train.index))
    options = dict(**{name: value for name, value in asdict(probe_opts).items() if name != "mode"},
                   k=k, T=knn_opts.temperature, train_split=ev.train_split, splits=names)
    options["blr"] = fit["blr"]
    used = [ev.train_split, *names] + ([robustness.CLEAN_FG_BANK] if clean_fg else [])
    # robustness reads its own splits, so a test split must not label it
    return ev.outcome("robustness", options, results, used, started, table, uses_test_split=False)


def run_finetune(checkpoint, root, train_split: str, test_split: str | None, opts: FinetuneOptions, run_dir,
                 env=None, device="cpu") -> Outcome | None:
    """MAE fine-tuning (layer decay, Mixup/CutMix, RandAugment, ...): top-1/top-5 of the fine-tuned classifier
    on the test split and on every background split the dataset has. Resumes RUN_DIR/finetune/."""
    started, root, env = time.time(), Path(root), env or distributed.DistEnv()
    opts = opts.resolved()  # MAE's ImageNet recipe in the fields the caller left None
    readable = {}

    def index_of(split):
        index, readable[split] = readable_index(split_folder(root, split, "--train-split/--test-split"),
                                                opts.verify_images, opts.max_failures, env.is_main)
        return index

    test_split = test_split or default_test_split(root)
    tests = {name: index_of(name) for name in dict.fromkeys([test_split, *robustness.DEMO_SPLITS])
             if name == test_split or (root / name).is_dir()}
    train_index = index_of(train_split)
    robustness.check_classes(train_index, "fine-tuning")
    robustness.check_same_classes(train_index, tests, "fine-tuning")
    tuning = finetune.FineTuning(checkpoint, train_index, opts, Path(run_dir) / "finetune", env=env, device=device)
    model = tuning.run()
    results = {name: finetune.classify(model, index, tuning.image_size, workers=opts.workers, device=device,
                                       progress=env.is_main) for name, index in tests.items()}
    if not env.is_main:
        return None
    table = format_table(["split", "top-1", "top-5"],
                         [[name, r["top1"], r.get("top5")] for name, r in results.items()])
    return build_outcome("finetune", checkpoint, tuning.identity["encoder_sha256"], root,
                         {train_split: train_index, **tests},
                         dict(**opts.identity(), lr=tuning.lr, train_split=train_split, test_split=test_split),
                         FinetuneMetrics({name: TopK(**r) for name, r in results.items()}, list(tuning.losses)),
                         started, table, readable)


def attention_stores(run_dir, opts: AttentionOptions) -> list[Path]:
    return [Path(p) for p in opts.map_stores] or sorted(Path(run_dir).glob("maps-*.h5"))


def has_masks(root, split: str) -> bool:
    return (Path(root) / "masks" / split).is_dir()


def run_attention(root, split: str, stores, opts: AttentionOptions) -> Outcome:
    """Mean IoU and pointing accuracy of map stores against ground-truth masks, plus a centre-prior row
    at each store's grid (a coarser grid scores differently, even for the same prior)."""
    started, root = time.time(), Path(root)
    if not stores:
        raise UserError("no map stores (maps-*.h5) to score; run agmae-discover or pass --maps FILE")
    if not has_masks(root, split):
        raise UserError(f"no ground-truth masks at {root / 'masks' / split}; attention quality needs "
                         f"ROOT/masks/{split}/<key>")
    index = scan(split_folder(root, split))

    def mask_of(key):
        return demo.load_mask(root, split, key)

    results, rows, grids = {}, [], []
    for path in stores:
        store = open_maps(path)
        unknown = set(store.keys) - set(index.keys)
        if unknown:
            raise UserError(f"{path}: {len(unknown)} keys (e.g. {sorted(unknown)[0]}) are not images of "
                             f"{root / split}; pass the store computed on this split")
        counts = store.counts()
        if not counts["done"]:
            raise UserError(f"{path}: no finished map to score ({counts['failed']} failed, {counts['pending']} "
                            "pending); finish it (re-run its agmae-discover, which resumes) or pass another --maps")
        scores = attention.evaluate_store(store, mask_of, progress=True)
        name = f"{store.attrs['method']} ({Path(path).name})"
        results[name] = AttentionScores(**scores, grid=list(store.attrs["grid"]), path=str(Path(path).resolve()),
                                        method=store.attrs["method"])
        rows.append([name, scores["mean_iou"], scores["pointing"], scores["images"], scores["skipped"]])
        if tuple(store.attrs["grid"]) not in grids:
            grids.append(tuple(store.attrs["grid"]))
    for grid in grids:
        prior = attention.evaluate_prior(attention.centre_prior(*grid, sigma=opts.prior_sigma), index.keys, mask_of)
        at_grid = "" if len(grids) == 1 else f" {grid[0]}x{grid[1]}"
        results["centre-prior" + at_grid] = AttentionScores(**prior, grid=list(grid), sigma=opts.prior_sigma)
        rows.append([f"centre prior{at_grid} (σ={opts.prior_sigma})", prior["mean_iou"], prior["pointing"],
                     prior["images"], 0])
    table = format_table(["method", "mean IoU", "pointing", "images", "skipped"], rows)
    chosen = "given (--maps)" if opts.map_stores else "every maps-*.h5 of the run directory (no --maps given)"
    table += f"\nmap stores: {chosen}"
    options = dict(prior_sigma=opts.prior_sigma, threshold="map mean", maps=[str(Path(p).resolve()) for p in stores],
                   maps_chosen=chosen)
    result = Result("attention", AttentionMetrics(results), options,
                    dict(root=str(root.resolve()), split=split, keys_sha256=index.keys_sha256),
                    seconds=round(time.time() - started, 2))
    return Outcome("attention", result, table, title=str(root / split))


def record(run_dir, outcome: Outcome) -> Path:
    """Write the outcome's entry under its key of RUN_DIR/results.json (atomically); returns the file."""
    return update_results(run_dir, outcome.key, outcome.result)


def probe_settings(fit: dict, opts: ProbeOptions, batch_size: int, lr: float, train_images: int) -> str:
    """The probe's line under its table: the blr, batch and lr it trained with, which were defaulted or capped."""
    blr = f"blr {fit['blr']:g}" + (f" (default, scaled to {train_images} training images)" if opts.blr is None else "")
    batch = f"batch {batch_size}" + (f" (--linear-batch-size {fit['batch_size']} capped at the training set)"
                                     if batch_size != fit["batch_size"] else "")
    return f"probe: {blr}, {batch}, lr {lr:.4g}"


def segment_splits(root, requested=()) -> list[str]:
    """The dense probe's test splits: those requested, else the background splits with masks under ROOT."""
    return list(requested) or [name for name in robustness.DEMO_SPLITS if has_masks(root, name)]


def run_segment(checkpoint, root, train_split: str, splits, features: FeatureOptions, opts: SegmentOptions,
                env=None, device="cpu") -> Outcome | None:
    """Dense linear probe on the frozen patch tokens (fg/bg and per-class foreground), trained on the train
    split's masks: mIoU on each test split (eval/segment.py). Runs on rank 0."""
    started, root, env = time.time(), Path(root), env or distributed.DistEnv()
    if not env.is_main:
        return None
    names = segment_splits(root, splits)
    if not names:
        raise UserError(f"no test split with masks under {root} (ROOT/masks/<split>); pass --splits NAME")
    done = segment.evaluate(checkpoint, root, train_split, names, features, opts, device)
    results = done["results"]
    table = format_table(["split", "fg/bg mIoU", "per-class mIoU"],
                         [[name, results["fg"]["splits"][name]["miou"], results["classes"]["splits"][name]["miou"]]
                          for name in names])
    options = dict(**asdict(opts), train_split=train_split, splits=names, grid=list(done["grid"]),
                   precision=done["precision"], scored="pixels, each its patch's class")
    return build_outcome("segment", checkpoint, file_sha256(checkpoint), root, done["indices"], options, results,
                         started, table, done["unreadable"])
