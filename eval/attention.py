"""Quality of attention maps against ground-truth object masks: IoU at the mean threshold, pointing.

Both scores follow docs/METHOD.md#attention: each map is upsampled bilinearly to the
mask's resolution, thresholded at its own mean (IoU with the mask), and its argmax is
checked against the mask (pointing). `centre_prior` is the baseline every method must beat:
a Gaussian bump in the middle of the image, which scores well on object-centred datasets
without looking at the image at all.
"""
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from agmae.store import STATUS_DONE

# Upsampling a whole store at once would hold N masks' worth of float32 maps; chunks keep it small.
_CHUNK = 256


def _as_float_tensor(array) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach().to("cpu", torch.float32)
    return torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: inputs may be read-only views


def map_scores(maps, masks) -> dict:
    """Score maps against object masks.

    maps: [N, h, w] float (numpy, memmap or torch), any range.
    masks: [N, H, W] bool or float in [0, 1] (> 0.5 is object).
    Returns dict(iou=[N] float64 array, pointing=[N] bool array):
      iou — IoU of (upsampled map > its mean) with the mask; a constant map predicts nothing,
            so it scores 0 unless the mask is empty too (empty ∩ empty scores 1);
      pointing — the upsampled map's argmax (first one in row-major order on ties) lies on the object.
    """
    if len(maps) != len(masks):
        raise ValueError(f"map_scores: {len(maps)} maps but {len(masks)} masks; pass one mask per map")
    if len(maps) == 0:
        return dict(iou=np.zeros(0), pointing=np.zeros(0, dtype=bool))
    if np.ndim(maps) != 3 or np.ndim(masks) != 3:
        raise ValueError(
            f"map_scores: maps must be [N, h, w] and masks [N, H, W], got {tuple(np.shape(maps))} "
            f"and {tuple(np.shape(masks))}"
        )
    ious, pointing = [], []
    for start in range(0, len(maps), _CHUNK):
        chunk_maps = _as_float_tensor(maps[start : start + _CHUNK])
        chunk_masks = _as_float_tensor(masks[start : start + _CHUNK]) > 0.5
        upsampled = F.interpolate(
            chunk_maps[:, None], size=chunk_masks.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0]
        predicted = upsampled > upsampled.mean(dim=(1, 2), keepdim=True)
        intersection = (predicted & chunk_masks).flatten(1).sum(1).double()
        union = (predicted | chunk_masks).flatten(1).sum(1).double()
        ious.append(torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union)))
        peak = upsampled.flatten(1).argmax(dim=1)
        pointing.append(chunk_masks.flatten(1).gather(1, peak[:, None])[:, 0])
    return dict(iou=torch.cat(ious).numpy(), pointing=torch.cat(pointing).numpy())


def centre_prior(h: int, w: int, sigma: float = 0.25) -> np.ndarray:
    """Centre-prior baseline map: [h, w] float32, a Gaussian bump with peak 1 at the image centre.

    sigma is a fraction of the image side (per axis), so the bump scales with the grid.
    Cell centres sit at (i + 0.5) / h, matching bilinear upsampling with align_corners=False.
    """
    if sigma <= 0:
        raise ValueError(f"centre_prior: sigma must be > 0, got {sigma}")
    ys = (np.arange(h) + 0.5) / h - 0.5
    xs = (np.arange(w) + 0.5) / w - 0.5
    squared_distance = ys[:, None] ** 2 + xs[None, :] ** 2
    return np.exp(-squared_distance / (2 * sigma**2)).astype(np.float32)


def _summary(iou: np.ndarray, pointing: np.ndarray, skipped: int) -> dict:
    return dict(mean_iou=100.0 * float(iou.mean()) if len(iou) else float("nan"),
                pointing=100.0 * float(pointing.mean()) if len(pointing) else float("nan"),
                images=int(len(iou)), skipped=skipped)


def evaluate_store(store, load_mask, chunk: int = 512, progress: bool = False) -> dict:
    """Mean IoU and pointing accuracy (percent) of a map store against ground-truth masks.

    store: a `agmae.store.MapStore` (.maps [N, h, w], .keys, .status); load_mask(key) ->
    [H, W] mask of that image. Only maps with status done count; the rest are `skipped`.
    Returns dict(mean_iou, pointing, images, skipped).
    """
    done = np.flatnonzero(np.asarray(store.status) == STATUS_DONE)
    ious, pointing = [], []
    for start in tqdm(range(0, len(done), chunk), desc="attention", unit="chunk", disable=not progress):
        rows = done[start : start + chunk]
        scores = map_scores(np.asarray(store.maps[rows], dtype=np.float32),
                            np.stack([load_mask(store.keys[i]) for i in rows]))
        ious.append(scores["iou"])
        pointing.append(scores["pointing"])
    return _summary(np.concatenate(ious or [np.zeros(0)]), np.concatenate(pointing or [np.zeros(0, bool)]),
                    skipped=len(store.status) - len(done))


def evaluate_prior(prior: np.ndarray, keys, load_mask, chunk: int = 512) -> dict:
    """The same scores for one fixed map prior: [h, w] (e.g. `centre_prior`) used for every key."""
    ious, pointing = [], []
    for start in range(0, len(keys), chunk):
        masks = np.stack([load_mask(key) for key in keys[start : start + chunk]])
        scores = map_scores(np.broadcast_to(prior, (len(masks), *prior.shape)), masks)
        ious.append(scores["iou"])
        pointing.append(scores["pointing"])
    return _summary(np.concatenate(ious or [np.zeros(0)]), np.concatenate(pointing or [np.zeros(0, bool)]), skipped=0)
