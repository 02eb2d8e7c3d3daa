"""One evaluation job, as `agmae-eval` runs it and a Python caller can: a checkpoint, a dataset, the protocols.

    job = EvalJob(checkpoint="run/checkpoint-last.pth", root="/datasets/imagenet", test_split="val")
    job.run([knn_step(KnnOptions()), linear_step(ProbeOptions())])

Each step takes the job and returns an `Outcome` (recorded in RUN_DIR/results.json by rank 0 and printed), a note
saying why it did nothing, or None on a rank with nothing to record. Under torchrun or srun every rank runs the
same job; the features are extracted once per job and shared by its steps.
"""
from pathlib import Path

from agmae import distributed
from agmae.errors import UserError
from agmae.eval import protocols
from agmae.eval.finetune import FinetuneOptions
from agmae.eval.protocols import AttentionOptions, FeatureOptions, KnnOptions, ProbeOptions
from agmae.eval.segment import SegmentOptions
from agmae.paths import default_run_dir, last_checkpoint


class EvalJob:
    """checkpoint: an agmae-train checkpoint or exported encoder [default: RUN_DIR/checkpoint-last.pth]; run_dir:
    where results.json goes [default: the checkpoint's folder, else the default run directory]; root: the dataset
    root; features: how the encoder's features are extracted."""

    def __init__(self, root, checkpoint=None, run_dir=None, train_split="train", test_split=None,
                 features: FeatureOptions | None = None, env=None, device="cpu"):
        checkpoint = Path(checkpoint) if checkpoint else None
        self.run_dir = Path(run_dir or (checkpoint.parent if checkpoint else default_run_dir()))
        self.checkpoint = checkpoint or last_checkpoint(self.run_dir)
        self.root, self.train_split, self.test_split = Path(root), train_split, test_split
        self.features = features or FeatureOptions()
        self.env, self.device = env or distributed.DistEnv(), device
        self._evaluation = None

    @property
    def evaluation(self) -> protocols.Evaluation:
        """The encoder's features on this dataset, built on first use."""
        if self._evaluation is None:
            self._evaluation = protocols.Evaluation(self.checkpoint, self.root, self.features, self.train_split,
                                                    self.test_split, self.env, self.device)
        return self._evaluation

    def run(self, steps, echo=print) -> None:
        """Run each step and record every outcome through the one results path."""
        for step in steps:
            outcome = step(self)
            if isinstance(outcome, str):
                echo(outcome)
            elif outcome is not None and self.env.is_main:
                path = protocols.record(self.run_dir, outcome)
                echo(f"\n{outcome.key} — {outcome.title}\n{outcome.table}\nresults: {path}")


def knn_step(opts: KnnOptions):
    return lambda job: protocols.run_knn(job.evaluation, opts)


def linear_step(opts: ProbeOptions):
    return lambda job: protocols.run_linear(job.evaluation, opts)


def retrieval_step():
    return lambda job: protocols.run_retrieval(job.evaluation)


def robustness_step(splits, clean_fg: bool, knn_opts: KnnOptions, probe_opts: ProbeOptions, only_if_present=False):
    """only_if_present: note and skip a dataset without background splits (agmae-eval all) instead of failing."""
    def step(job):
        if only_if_present and not protocols.robustness_splits(job.evaluation, splits):
            return f"[all] skipped robustness: {job.root} has none of the background splits"
        return protocols.run_robustness(job.evaluation, splits, knn_opts, probe_opts, clean_fg)
    return step


def attention_step(opts: AttentionOptions, only_if_present=False):
    """only_if_present: note and skip a run without map stores or a dataset without masks instead of failing."""
    def step(job):
        if not job.env.is_main:
            return None
        stores = protocols.attention_stores(job.run_dir, opts)
        if only_if_present and not stores:
            return f"[all] skipped attention: no map stores (maps-*.h5) in {job.run_dir}"
        if only_if_present and not protocols.has_masks(job.root, job.train_split):
            return f"[all] skipped attention: {job.root} has no ground-truth masks (masks/{job.train_split})"
        if not stores:
            raise UserError(f"no map stores in {job.run_dir} (maps-*.h5); run agmae-discover or pass --maps FILE")
        return protocols.run_attention(job.root, job.train_split, stores, opts)
    return step


def finetune_step(opts: FinetuneOptions):
    return lambda job: protocols.run_finetune(job.checkpoint, job.root, job.train_split, job.test_split, opts,
                                              job.run_dir, job.env, job.device)


def segment_step(splits, opts: SegmentOptions):
    return lambda job: protocols.run_segment(job.checkpoint, job.root, job.train_split, splits, job.features, opts,
                                             job.env, job.device)
