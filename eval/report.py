"""results.json in a run directory, its typed schema, and the compact tables the CLI prints.

results.json maps a protocol key ("knn", "knn[pool=mean]", "linear", "linear-cached", "retrieval", "robustness",
"attention", "finetune", each qualified by a non-default pool or test split) to one entry: checkpoint path and
SHA-256, dataset fingerprint, options (asked and used), numbers, time, `schema_version`. Each command replaces only
its own key; the update is a locked read-modify-write finished by os.replace, so concurrent evaluations of one run
neither lose each other's keys nor leave half a file.

Typed results: every protocol's numbers are a dataclass (`KnnMetrics`, `LinearMetrics`, `RetrievalMetrics`,
`RobustnessMetrics`, `AttentionMetrics`, `FinetuneMetrics`) inside a `Result` (the entry); `Result.to_json` is the
entry results.json holds and `load_results(run_dir)` reads the entries back as `Result`s, so a reader names fields
(`results["knn"].metrics.top1(20)`) instead of key paths.

Schema versions (`SCHEMA_VERSION`, one per entry):
  1  entries written before the field existed: the same layout, without the values used below.
  2  adds `schema_version`; each k-NN k's `k_used` (the k after clamping to the bank size); the linear probe's
     `batch_size` used (capped at the training set); robustness's `k_used`; every encoder entry's `encoder` (the
     timm kwargs the features were computed with, head count included) in its options, and its precision resolved
     (never "auto"). Version 1 entries read as version 2 with those fields None.
"""
import fcntl
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from agmae.checkpoint import atomic_write_text
from agmae.errors import UserError
from agmae.eval.knn import HEADLINE_K

RESULTS_NAME = "results.json"
SCHEMA_VERSION = 2


def results_path(run_dir) -> Path:
    return Path(run_dir) / RESULTS_NAME


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_results(run_dir) -> dict:
    """RUN_DIR/results.json as plain JSON ({} when there is none); `load_results` gives the typed entries."""
    path = results_path(run_dir)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); move it away and re-run the evaluation") from err


def update_results(run_dir, protocol: str, entry) -> Path:
    """Set results[protocol] = entry (a `Result` or its JSON dict) + "time", keeping every other key; atomic.
    Returns the file."""
    path = results_path(run_dir)
    entry = entry.to_json() if isinstance(entry, Result) else {"schema_version": SCHEMA_VERSION, **entry}
    with _locked(path):
        results = read_results(run_dir)
        results[protocol] = {**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", path)
    return path


def _pick(cls, data: dict):
    """An instance of dataclass `cls` from the keys of `data` that are its fields (a missing one takes its default)."""
    return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def _without_none(data: dict) -> dict:
    return {name: value for name, value in data.items() if value is not None}


@dataclass
class TopK:
    """Top-1 and top-5 percent; top-5 is None on 5 classes or fewer, where it would be 100 % by construction."""
    top1: float
    top5: float | None = None

    def to_json(self) -> dict:
        return _without_none(asdict(self))


@dataclass
class KnnMetrics:
    """Weighted k-NN per k asked for. k_used[k]: the k that was used, clamped to the bank size (None: schema 1)."""
    by_k: dict[int, TopK]
    k_used: dict[int, int | None]

    def top1(self, k: int = HEADLINE_K) -> float:
        return self.by_k[k].top1

    def to_json(self) -> dict:
        return {f"k={k}": _without_none({**scores.to_json(), "k_used": self.k_used.get(k)})
                for k, scores in self.by_k.items()}

    @classmethod
    def from_json(cls, data: dict) -> "KnnMetrics":
        by_k = {int(name.removeprefix("k=")): value for name, value in data.items() if name.startswith("k=")}
        return cls({k: _pick(TopK, value) for k, value in by_k.items()},
                   {k: value.get("k_used") for k, value in by_k.items()})


@dataclass
class LinearMetrics:
    """Linear probe: top-1/top-5 percent, its mode (augmented or cached features), the lr and the batch used."""
    mode: str
    top1: float
    top5: float | None = None
    lr: float | None = None
    final_loss: float | None = None
    batch_size: int | None = None  # per rank, after capping at the training set; None: schema 1

    def to_json(self) -> dict:
        return {name: value for name, value in asdict(self).items() if value is not None or name == "final_loss"}

    @classmethod
    def from_json(cls, data: dict) -> "LinearMetrics":
        return _pick(cls, data)


@dataclass
class RetrievalMetrics:
    """mAP and Recall@k percent (recall keyed by k), over `queries` queries."""
    mAP: float
    recall: dict[int, float]
    queries: int
    queries_without_relevant: int

    def to_json(self) -> dict:
        return {"mAP": self.mAP, **{f"R@{k}": value for k, value in self.recall.items()}, "queries": self.queries,
                "queries_without_relevant": self.queries_without_relevant}

    @classmethod
    def from_json(cls, data: dict) -> "RetrievalMetrics":
        return cls(data["mAP"], {int(name[2:]): value for name, value in data.items() if name.startswith("R@")},
                   data["queries"], data["queries_without_relevant"])


@dataclass
class SplitScores:
    """Top-1 percent of k-NN and (where a probe ran) the linear probe on one split."""
    knn_top1: float
    linear_top1: float | None = None

    def to_json(self) -> dict:
        return _without_none(asdict(self))


@dataclass
class RobustnessMetrics:
    """Per-split scores, the BG-gap (mixed-same − mixed-rand, where both exist) and clean-fg k-NN (where run)."""
    splits: dict[str, SplitScores]
    bg_gap: SplitScores | None = None
    clean_fg_knn_top1: float | None = None
    linear_mode: str | None = None
    k_used: int | None = None  # the k-NN k after clamping to the bank size; None: schema 1

    def to_json(self) -> dict:
        return _without_none({"splits": {name: s.to_json() for name, s in self.splits.items()},
                              "bg_gap": self.bg_gap.to_json() if self.bg_gap else None,
                              "clean_fg_knn_top1": self.clean_fg_knn_top1, "linear_mode": self.linear_mode,
                              "k_used": self.k_used})

    @classmethod
    def from_json(cls, data: dict) -> "RobustnessMetrics":
        return cls({name: _pick(SplitScores, s) for name, s in data["splits"].items()},
                   _pick(SplitScores, data["bg_gap"]) if "bg_gap" in data else None,
                   data.get("clean_fg_knn_top1"), data.get("linear_mode"), data.get("k_used"))


@dataclass
class AttentionScores:
    """One row of the attention table: a map store (path, method) or the centre prior (sigma), at its grid."""
    mean_iou: float
    pointing: float
    images: int
    skipped: int
    grid: list[int]
    path: str | None = None
    method: str | None = None
    sigma: float | None = None

    def to_json(self) -> dict:
        return _without_none(asdict(self))


@dataclass
class AttentionMetrics:
    rows: dict[str, AttentionScores]

    def to_json(self) -> dict:
        return {name: row.to_json() for name, row in self.rows.items()}

    @classmethod
    def from_json(cls, data: dict) -> "AttentionMetrics":
        return cls({name: _pick(AttentionScores, row) for name, row in data.items()})


@dataclass
class FinetuneMetrics:
    """The fine-tuned classifier's top-1/top-5 on each test split, and its per-epoch training losses."""
    splits: dict[str, TopK]
    epoch_losses: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"splits": {name: s.to_json() for name, s in self.splits.items()}, "epoch_losses": self.epoch_losses}

    @classmethod
    def from_json(cls, data: dict) -> "FinetuneMetrics":
        return cls({name: _pick(TopK, s) for name, s in data["splits"].items()}, data.get("epoch_losses", []))


# The metrics type of each protocol, by its key less qualifiers ("knn[pool=mean]" -> "knn").
METRICS = {"knn": KnnMetrics, "linear": LinearMetrics, "linear-cached": LinearMetrics,
           "retrieval": RetrievalMetrics, "robustness": RobustnessMetrics, "attention": AttentionMetrics,
           "finetune": FinetuneMetrics}


def base_protocol(key: str) -> str:
    """A results.json key without its qualifiers: "robustness[pool=mean]" -> "robustness"."""
    return key.split("[", 1)[0]


@dataclass
class Result:
    """One results.json entry: what was evaluated (checkpoint, dataset fingerprints per split), with which options
    (those asked and the values used), and the protocol's metrics (a plain dict for a protocol without a type)."""
    protocol: str
    metrics: object
    options: dict = field(default_factory=dict)
    dataset: dict = field(default_factory=dict)
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    seconds: float | None = None
    unreadable: dict = field(default_factory=dict)
    time: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        metrics = self.metrics if isinstance(self.metrics, dict) else self.metrics.to_json()
        entry = dict(schema_version=self.schema_version, protocol=self.protocol, options=self.options,
                     dataset=self.dataset, results=metrics, seconds=self.seconds, checkpoint=self.checkpoint,
                     checkpoint_sha256=self.checkpoint_sha256, unreadable=self.unreadable, time=self.time)
        return {name: value for name, value in entry.items() if value is not None and value != {}}

    @classmethod
    def from_json(cls, key: str, entry: dict, where="results.json") -> "Result":
        """The typed entry under `key`; where: the file, for the message of an entry this agmae cannot read."""
        version = entry.get("schema_version", 1)
        if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
            raise UserError(f"{where}: entry {key!r} has schema_version {version!r}, this agmae reads 1 to "
                            f"{SCHEMA_VERSION}; read it with the agmae that wrote it, or re-run the evaluation")
        protocol = entry.get("protocol", key)
        metrics_type = METRICS.get(base_protocol(protocol))
        raw = entry.get("results", {})
        try:
            metrics = metrics_type.from_json(raw) if metrics_type else raw
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"{where}: entry {key!r} does not hold {base_protocol(protocol)} results ({err!r}); "
                            "re-run the evaluation") from err
        return cls(protocol, metrics, entry.get("options", {}), entry.get("dataset", {}), entry.get("checkpoint"),
                   entry.get("checkpoint_sha256"), entry.get("seconds"), entry.get("unreadable", {}),
                   entry.get("time"), version)


def parse_results(data: dict, where="results.json") -> dict[str, Result]:
    """{key: Result} of the content of a results.json."""
    return {key: Result.from_json(key, entry, where) for key, entry in data.items()}


def load_results(run_dir) -> dict[str, Result]:
    """RUN_DIR/results.json as {key: Result} ({} when there is none)."""
    return parse_results(read_results(run_dir), results_path(run_dir))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def format_table(headers: list[str], rows: list[list]) -> str:
    """Plain-text table: floats with 2 decimals, None as '-', columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
