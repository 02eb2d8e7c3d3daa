"""Everything a training run depends on, each field defined once: `agmae-train`'s options are generated
from these fields (`agmae.options`), and a Python caller's values pass the same validation.

Fields left None take a recipe's value (`RECIPES`, docs/METHOD.md#the-mae): MAE's ImageNet recipe, or the demo
recipe, which a bare `agmae-train` (no --data) fills in where it picks the built-in demo dataset.
"""
from dataclasses import dataclass, replace
from pathlib import Path

import click

from agmae.errors import UserError
from agmae.data.folder import split_folder
from agmae.options import (POSITIVE, POSITIVE_INT, data_option, device_option, max_failures_option, option,
                           precision_option, run_dir_option, seed_option, train_split_option, validate,
                           verify_images_option, workers_option)
from agmae.paths import default_run_dir
from agmae.train.masking import MASKING_RULES, SAMPLING_WEIGHT_FLOOR
from agmae.train.loss import check_temperature

# The model options a run may set over its preset, recorded in its checkpoint's config (agmae.train.model.load_mae).
MODEL_OPTIONS = ("patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
                 "decoder_num_heads")

RECIPES = {
    "demo": dict(model="mae_vit_demo_patch8", epochs=16, warmup_epochs=2.0, batch_size=256, blr=1e-3,
                 precision="native"),
    "paper": dict(model="mae_vit_base_patch16", epochs=800, warmup_epochs=40.0, batch_size=64, blr=1.5e-4,
                  precision="auto"),
}


def _recipe(name: str, text: str) -> str:
    return f"{text} [default: {RECIPES['paper'][name]}; {RECIPES['demo'][name]} with no --data, on the demo dataset]"


@dataclass
class TrainConfig:
    data: str | None = data_option()
    train_split: str = train_split_option()
    out: str | None = run_dir_option("Run directory for checkpoints, metrics.jsonl, config.json. "
                                     "[default: AGMAE_RUN_DIR, else AGMAE_HOME/runs/default]",
                                     flags=("--out", "--run-dir"))
    maps: str | None = option(None, "Attention store (agmae-discover's output) that weights the loss (and with "
                                    "--masking attention-*, chooses the masked patches); none trains the vanilla "
                                    "MAE. [agmae-train's default: the best store in the default run directory]",
                              type=click.Path(dir_okay=False))
    model: str | None = option(None, _recipe("model", "MAE preset, mae_vit_{tiny,small,base,large,huge}_patch"
                                                      "{16,14,8} or mae_vit_demo_patch8."))
    input_size: int | None = option(None, "Training image size in pixels. [default: the preset's, 224 or 64 "
                                          "for the demo preset]", type=POSITIVE_INT)
    patch_size: int | None = option(None, "Override the preset's patch size.", type=POSITIVE_INT)
    embed_dim: int | None = option(None, "Override the preset's encoder width.", type=click.IntRange(min=4))
    depth: int | None = option(None, "Override the preset's encoder depth.", type=POSITIVE_INT)
    num_heads: int | None = option(None, "Override the preset's encoder head count.", type=POSITIVE_INT)
    decoder_embed_dim: int | None = option(None, "Override the decoder width (default 512).",
                                           type=click.IntRange(min=4))
    decoder_depth: int | None = option(None, "Override the decoder depth (default 8).", type=POSITIVE_INT)
    decoder_num_heads: int | None = option(None, "Override the decoder head count (default 16).",
                                           type=POSITIVE_INT)
    fused_attn: bool | None = option(None, "Use torch's scaled_dot_product_attention. [default: on for CUDA; on a "
                                           "CPU from 128 patches (base/16's 196), off below, where matmul-softmax "
                                           "attention is faster]", flags=("--fused-attn/--no-fused-attn",))
    compile: bool = option(False, "torch.compile the MAE (inductor; needs a C compiler on a CPU). Same results up to "
                                  "float rounding, exact resume kept; DDP runs compile the wrapped model. Off by "
                                  "default: on a CPU it did not pay for its compile time (docs/PERFORMANCE.md).",
                           flags=("--compile/--no-compile",))
    epochs: int | None = option(None, _recipe("epochs", "Training epochs."), type=POSITIVE_INT)
    warmup_epochs: float | None = option(None, _recipe("warmup_epochs", "Epochs of linear learning-rate "
                                                                        "warm-up (per iteration)."),
                                         type=click.FloatRange(min=0))
    batch_size: int | None = option(None, _recipe("batch_size", "Images per process and step."),
                                    type=POSITIVE_INT)
    accum_iter: int = option(1, "Gradient accumulation: micro-batches per optimizer step.", type=POSITIVE_INT)
    blr: float | None = option(None, _recipe("blr", "Base learning rate; lr = blr x effective batch / 256."),
                               type=POSITIVE)
    weight_decay: float = option(0.05, "AdamW weight decay (none on norms, biases and tokens).",
                                 type=click.FloatRange(min=0))
    clip_grad: float | None = option(None, "Clip the gradient norm to this value. [default: no clipping]",
                                     type=POSITIVE)
    mask_ratio: float = option(0.75, "Share of patches masked per image.",
                               type=click.FloatRange(0, 1, min_open=True, max_open=True))
    tau_start: float = option(1.0, "Temperature τ of the loss weights exp(a/τ) at the first step.", type=POSITIVE)
    tau_end: float = option(0.5, "τ at the last step (cosine schedule).", type=POSITIVE)
    tau_schedule: str = option("cosine", "Half-cycle cosine from --tau-start to --tau-end, or --tau-start "
                                         "throughout.", type=click.Choice(["cosine", "constant"]))
    weight_norm: str = option("batch", "Loss normalisation: Σmwe/Σmw over the batch, per image then averaged, "
                                       "or γΣmwe/Σm (paper).", type=click.Choice(["batch", "sample", "none"]))
    gamma: float = option(1.0, "γ of --weight-norm none.", type=POSITIVE)
    masking: str = option("random", "Which patches are masked (always the same number): at random (MAE); "
                                    "attention-high, the patches of highest map value (AttMask), ties broken at "
                                    "random; attention-sampled, a sample without replacement by the Efraimidis-"
                                    "Spirakis keys u^(1/w) of the random noise u, w = map value + "
                                    f"{SAMPLING_WEIGHT_FLOOR:g}, highest keys masked. The map is the crop's, as in "
                                    "the loss; a failed or constant map masks at random. Needs --maps.",
                          type=click.Choice(MASKING_RULES))
    weight_loss: bool = option(True, "Weight the loss by the maps; --no-weight-loss with --masking attention-* "
                                     "uses the maps only to choose the masked patches.",
                               flags=("--weight-loss/--no-weight-loss",))
    require_maps: bool = option(False, "Fail when a training image's map failed (default: train it unguided).")
    allow_missing_maps: bool = option(False, "Train the images whose maps are still pending (an unfinished "
                                             "agmae-discover) unguided instead of refusing the store.")
    verify_images: bool = verify_images_option("skip those that do not")
    max_failures: float = max_failures_option("the training images",
                                              "; fewer are skipped and named in the log and metrics.jsonl")
    save_every: int = option(5, "Write RUN_DIR/checkpoint-last.pth every this many epochs (and at the end).",
                             type=POSITIVE_INT)
    keep_every: int = option(0, "Also keep RUN_DIR/checkpoint-<epoch>.pth every this many epochs, for "
                                "evaluating the encoder along training (0: keep only checkpoint-last.pth).",
                             type=click.IntRange(min=0))
    resume: str | None = option(None, "Checkpoint to resume from. [default: RUN_DIR/checkpoint-last.pth when "
                                      "present]", type=click.Path(dir_okay=False))
    init_from: str | None = option(None, "Start from the MAE weights (encoder and decoder) of this checkpoint, with "
                                         "a fresh optimizer and schedules: continued pre-training, e.g. a guided "
                                         "round that continues the vanilla round whose maps guide it. An "
                                         "agmae-train checkpoint or any {'model': state dict} of the same MAE (the "
                                         "official MAE's pre-training checkpoints share its parameter names). A run "
                                         "that has a checkpoint of its own resumes that instead.",
                                   type=click.Path(exists=True, dir_okay=False))
    workers: int = workers_option(8, "DataLoader worker processes per training process.")
    seed: int = seed_option("Seeds initialisation, data order, crops, flips and masks (runs are reproducible).")
    device: str = device_option()
    precision: str | None = precision_option(_recipe("precision", "Autocast precision."), default=None)

    def __post_init__(self):
        validate(self)
        self._check_map_uses()
        if self.maps is not None and self.weight_loss:
            lowest = self.tau_start if self.tau_schedule == "constant" else min(self.tau_start, self.tau_end)
            check_temperature(lowest, self.weight_norm, self.gamma)

    def _check_map_uses(self) -> None:
        """The maps weight the loss, choose the masked patches, or both: refuse a use without maps, and
        maps given for no use (the vanilla MAE in disguise)."""
        if self.maps is None and self.masking != "random":
            raise UserError(f"--masking {self.masking} chooses the masked patches by the maps: it needs --maps "
                             f"(not --no-guidance)")
        if self.maps is None and not self.weight_loss:
            raise UserError("--no-weight-loss keeps the maps out of the loss, for --masking attention-* only: "
                             "it needs --maps (not --no-guidance)")
        if not self.weight_loss and self.masking == "random":
            raise UserError("--no-weight-loss with --masking random uses --maps for nothing: that is the vanilla "
                             "MAE, train it with --no-guidance")

    def check_run(self, num_patches: int) -> None:
        """Refuse the combinations that only fail together, once the model's patch count is known (call on the
        resolved config): a mask ratio that leaves no visible patch, a warm-up longer than the run."""
        if int(num_patches * (1 - self.mask_ratio)) == 0:
            raise UserError(f"--mask-ratio {self.mask_ratio:g} keeps int({num_patches} x {1 - self.mask_ratio:.4g}) = 0 "
                            f"of the model's {num_patches} patches visible, so the encoder would see none; lower "
                            f"--mask-ratio below {1 - 1 / num_patches:.4g}")
        if self.warmup_epochs > self.epochs:
            raise UserError(f"--warmup-epochs {self.warmup_epochs:g} is longer than the run's --epochs {self.epochs}: the "
                            f"lr would never reach its peak; lower --warmup-epochs or raise --epochs")

    def image_folder(self) -> Path:
        """The training images: the --train-split folder of --data."""
        return split_folder(self.data, self.train_split)

    def model_overrides(self) -> dict:
        return {"img_size": self.input_size, **{name: getattr(self, name) for name in MODEL_OPTIONS}}

    def resolved(self) -> "TrainConfig":
        """This config with MAE's ImageNet recipe in the fields left None and the default run directory. (A bare
        `agmae-train`, with no --data, fills in the demo recipe at the command line, where it picks the demo
        dataset.)"""
        if self.data is None:
            raise UserError("no dataset: pass --data ROOT, the folder holding ROOT/<split>/<class>/<image>")
        unset = {name: value for name, value in RECIPES["paper"].items() if getattr(self, name) is None}
        return replace(self, out=self.out or str(default_run_dir()), **unset)
