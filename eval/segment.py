"""Dense linear probe: how much of an object's extent the frozen patch tokens carry, scored by mIoU.

A linear classifier on each final-norm patch token (a 1x1 convolution over the patch grid, as the linear
segmentation probes of frozen ViTs) learns, with cross-entropy, the patch labels of the training split:
each image's object mask (ROOT/masks/<split>/<key>) area-averaged onto the patch grid, a patch being object
where the object covers more than half of it. Two tasks: `fg` (background 0, object 1) and `classes`
(background 0, the object of class c labelled c + 1: the image's class label times its mask). Each test
split is scored at the masks' own resolution: each pixel takes its patch's predicted class (nearest, so a
probe that labels every patch right scores 100 on patch-aligned masks and, elsewhere, what the grid can
draw), a confusion matrix summed over the split, IoU per class, mIoU = the mean over the classes present in
the prediction or the truth. The image is seen whole, resized to S x S (no crop), so the grid covers the
mask.

Tokens are standardised per channel with the training split's mean and standard deviation (MAE's linear
probe normalises likewise), the classifier starts at zero, and AdamW visits the training images in an order
drawn from `seed`: the result is a function of the seed.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from agmae.data.demo import load_mask
from agmae.data.folder import split_folder
from agmae.data.transforms import discovery_transform
from agmae.errors import UserError
from agmae.eval.features import FolderImages, build_encoder, readable_index
from agmae.hardware import resolve_precision
from agmae.options import POSITIVE, POSITIVE_INT, option, seed_option, validate

TASKS = ("fg", "classes")
STD_EPS = 1e-6


@dataclass
class SegmentOptions:
    epochs: int = option(10, "Epochs of the dense probe over the training split's patch tokens.", type=POSITIVE_INT)
    lr: float = option(1e-3, "AdamW learning rate of the dense probe (no weight decay).", type=POSITIVE)
    segment_batch_size: int = option(64, "Images whose patch tokens make one step of the dense probe.",
                                     type=POSITIVE_INT)
    seed: int = seed_option("Seed of the dense probe's data order.")

    def __post_init__(self):
        validate(self)


def patch_labels(mask: np.ndarray, grid: tuple) -> np.ndarray:
    """mask [H, W] in [0, 1] -> bool [gh, gw]: the object covers more than half of the cell (area average;
    exact when the grid divides the mask)."""
    cover = F.adaptive_avg_pool2d(torch.as_tensor(mask, dtype=torch.float32)[None, None], grid)[0, 0]
    return (cover > 0.5).numpy()


def task_labels(fg: np.ndarray, class_labels: np.ndarray, task: str) -> np.ndarray:
    """fg: bool [N, ...], class_labels: [N] -> int64 [N, ...]: `fg` 0/1; `classes` 0 or the class + 1."""
    fg = fg.astype(np.int64)
    if task == "fg":
        return fg
    return fg * (np.asarray(class_labels, dtype=np.int64) + 1).reshape(-1, *[1] * (fg.ndim - 1))


def num_task_classes(task: str, num_image_classes: int) -> int:
    return 2 if task == "fg" else num_image_classes + 1


@torch.no_grad()
def extract_tokens(encoder, index, batch_size: int = 128, workers: int = 4, device="cpu",
                   precision: str = "fp32", progress: bool = True) -> np.ndarray:
    """Final-norm patch tokens of every image of `index`, seen whole at the encoder's size:
    float16 [N, gh * gw, D] in dataset order (row-major over the grid)."""
    size = int(encoder.patch_embed.img_size[0])
    loader = DataLoader(FolderImages(index, discovery_transform(size)), batch_size=batch_size, num_workers=workers)
    encoder = encoder.to(device)
    rows = []
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for imgs, _ in tqdm(loader, desc=f"patch tokens {index.root.name}", unit="batch", disable=not progress):
            tokens = encoder.forward_features(imgs.to(device))[:, encoder.num_prefix_tokens:]
            rows.append(tokens.float().cpu().numpy().astype(np.float16))
    return np.concatenate(rows)


def grid_of(encoder) -> tuple:
    return tuple(int(g) for g in encoder.patch_embed.grid_size)


class DenseProbe(torch.nn.Module):
    """Per-token standardisation with fixed statistics, then a linear layer: [..., D] -> [..., C] logits."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = torch.nn.Linear(mean.numel(), num_classes)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear((tokens.float() - self.mean) / self.std)


def token_statistics(tokens: np.ndarray) -> tuple:
    """Per-channel mean and standard deviation (+ STD_EPS) of tokens [N, L, D], accumulated in float64."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    total, squares = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
    for start in range(0, len(flat), 1 << 16):
        chunk = flat[start:start + (1 << 16)].astype(np.float64)
        total += chunk.sum(0)
        squares += (chunk ** 2).sum(0)
    mean = total / len(flat)
    std = np.sqrt(np.maximum(squares / len(flat) - mean ** 2, 0)) + STD_EPS
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def fit_probe(tokens: np.ndarray, labels: np.ndarray, num_classes: int, opts: SegmentOptions,
              progress: bool = False) -> tuple:
    """Train a DenseProbe on tokens [N, L, D] with patch labels int [N, L]; returns (probe, last epoch's mean loss)."""
    mean, std = token_statistics(tokens)
    probe = DenseProbe(mean, std, num_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=opts.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(opts.seed)
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    for _ in tqdm(range(opts.epochs), desc="dense probe", unit="epoch", disable=not progress):
        order = torch.randperm(len(tokens), generator=generator)
        loss_sum, steps = 0.0, 0
        for start in range(0, len(order), opts.segment_batch_size):
            rows = np.sort(order[start:start + opts.segment_batch_size].numpy())  # read front to back
            logits = probe(torch.from_numpy(tokens[rows]))
            loss = F.cross_entropy(logits.reshape(-1, num_classes), targets[rows].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, steps = loss_sum + loss.item(), steps + 1
    return probe.eval(), loss_sum / steps


@torch.no_grad()
def confusion(probe: DenseProbe, tokens: np.ndarray, grid: tuple, truths, num_classes: int) -> np.ndarray:
    """Confusion matrix [truth, prediction] (int64 [C, C]) over images: tokens [N, gh * gw, D]; truths: N int
    label maps [H, W] (any size; each pixel takes the prediction of the patch it lies in)."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i, truth in enumerate(truths):
        predicted = probe(torch.from_numpy(np.asarray(tokens[i]))).argmax(1).reshape(1, 1, *grid).float()
        predicted = F.interpolate(predicted, size=truth.shape, mode="nearest-exact")[0, 0].long().numpy()
        matrix += np.bincount(truth.reshape(-1) * num_classes + predicted.reshape(-1),
                              minlength=num_classes ** 2).reshape(num_classes, num_classes)
    return matrix


def iou_per_class(matrix: np.ndarray) -> np.ndarray:
    """IoU of each class (NaN where it is neither predicted nor true) from a confusion matrix [truth, prediction]."""
    hits = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - hits
    return np.where(union > 0, hits / np.maximum(union, 1), np.nan)


def mean_iou(matrix: np.ndarray) -> float:
    """mIoU in percent over the classes present in the truth or the prediction."""
    return 100.0 * float(np.nanmean(iou_per_class(matrix)))


def mask_labels(masks, grid: tuple) -> np.ndarray:
    """Patch-level object labels of masks [H, W] (any sizes): bool [N, gh * gw]."""
    return np.stack([patch_labels(mask, grid).reshape(-1) for mask in masks])


def dense_probe(train_tokens: np.ndarray, train_masks, train_classes, tests: dict, grid: tuple,
                num_image_classes: int, opts: SegmentOptions, progress: bool = False) -> dict:
    """The whole protocol on tokens already extracted.

    train_tokens [N, L, D], train_masks: N masks [H, W] in [0, 1], train_classes [N]; tests: {split: (tokens,
    masks, classes)}. Returns {task: dict(splits={split: dict(miou, iou=[per class, None where absent])},
    final_loss)} for the tasks of TASKS."""
    train_fg = mask_labels(train_masks, grid)
    test_fg = {split: [np.asarray(mask) > 0.5 for mask in masks] for split, (_, masks, _) in tests.items()}
    results = {}
    for task in TASKS:
        classes = num_task_classes(task, num_image_classes)
        probe, loss = fit_probe(train_tokens, task_labels(train_fg, train_classes, task), classes, opts, progress)
        splits = {}
        for split, (tokens, _, image_classes) in tests.items():
            truths = [task_labels(fg[None], [c], task)[0] for fg, c in zip(test_fg[split], image_classes)]
            matrix = confusion(probe, tokens, grid, truths, classes)
            splits[split] = dict(miou=mean_iou(matrix),
                                 iou=[None if np.isnan(v) else 100.0 * float(v) for v in iou_per_class(matrix)])
        results[task] = dict(splits=splits, final_loss=loss)
    return results


def split_masks(root, split: str, keys) -> list:
    """The ground-truth masks of a split's images (ROOT/masks/<split>/<key>), one-line error where one is missing."""
    return [load_mask(root, split, key) for key in keys]


def evaluate(checkpoint, root, train_split: str, test_splits, features, opts: SegmentOptions, device="cpu",
             progress: bool = True) -> dict:
    """The dense probe of a checkpoint's encoder on a dataset with masks.

    features: the extraction options (agmae.eval.protocols.FeatureOptions: batch_size, workers, precision,
    verify_images, max_failures). Returns dict(results, indices={split: index}, unreadable={split: {key: reason}},
    grid, precision: the resolved one)."""
    splits = list(dict.fromkeys([train_split, *test_splits]))
    for split in splits:  # every split checked before any work
        split_folder(root, split, "--train-split/--splits")
        if not (Path(root) / "masks" / split).is_dir():
            raise UserError(f"no ground-truth masks at {Path(root) / 'masks' / split}; the dense probe needs "
                            f"ROOT/masks/{split}/<key> for its training split and every test split")
    encoder, _ = build_encoder(checkpoint)
    grid = grid_of(encoder)
    precision = resolve_precision(features.precision, torch.device(device))
    indices, unreadable, data = {}, {}, {}
    for split in splits:
        index, unreadable[split] = readable_index(split_folder(root, split, "--train-split/--splits"),
                                                  features.verify_images, features.max_failures, progress)
        indices[split] = index
        tokens = extract_tokens(encoder, index, features.batch_size, features.workers, device, precision, progress)
        data[split] = (tokens, split_masks(root, split, index.keys), index.labels)
    train = indices[train_split]
    for split in test_splits:
        if indices[split].classes != train.classes:
            raise UserError(f"{indices[split].root}: its classes differ from those of {train.root}; the per-class "
                            "task needs the same class folders")
    tokens, masks, labels = data[train_split]
    results = dense_probe(tokens, masks, labels, {split: data[split] for split in test_splits}, grid,
                          len(train.classes), opts, progress)
    return dict(results=results, indices=indices, unreadable=unreadable, grid=grid, precision=precision)
