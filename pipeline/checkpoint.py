"""Checkpoints: atomic save, safe load, and the encoder hand-over from training to evaluation.

A training checkpoint is a `torch.save`d dict: `model` (the MAE state dict; encoder keys named
like timm's `VisionTransformer`, decoder keys starting with `decoder_` or being `mask_token`),
`config` (with `encoder` = the timm `VisionTransformer` kwargs), `optimizer`, `scaler`, `epoch`,
`step`, `rng`, `sampler`, `version`. An exported encoder is a plain timm state dict that carries
its kwargs inside, in the state dict's `_metadata` (which `load_state_dict` ignores) under
ENCODER_KWARGS_KEY, and also in a JSON file beside it (`<file>.json`) for readers outside agmae.
"""
import hashlib
import json
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from agmae.errors import UserError

DECODER_PREFIXES = ("decoder_", "mask_token")
_CLASSIFIER_PREFIXES = ("head.",)
_REQUIRED_ENCODER_KEYS = ("patch_embed.proj.weight", "cls_token", "pos_embed", "norm.weight")
# timm's standard ViTs (tiny, small, base, large) use 64-wide attention heads; a plain state dict
# does not record the head count, so it is assumed from this when no kwargs file says otherwise.
_ASSUMED_HEAD_DIM = 64
ENCODER_KWARGS_KEY = "agmae_encoder_kwargs"
ZIP_MAGIC, PICKLE_PROTOCOL_OPCODE = b"PK\x03\x04", b"\x80"  # torch.save's zip format; a legacy pickle


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(state: dict) -> str:
    """Hex SHA-256 of a state dict's tensors (names, dtypes, shapes, values, in name order): what the weights are,
    whichever file holds them (a checkpoint file's own hash also covers its optimizer state and recorded paths)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim tensors too
    return digest.hexdigest()


def _temporary_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path, write) -> Path:
    """`write(f)` into a temporary binary file beside `path`, then rename: a reader never sees half a file."""
    path = Path(path)
    blocking = next((parent for parent in path.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"{path}: cannot be written, {blocking} is a file, not a directory; write to another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temporary_beside(path)
    try:
        with open(temp, "wb") as f:
            write(f)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def atomic_save(obj, path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def load_checkpoint(path) -> dict:
    """Load with `weights_only=True` (tensors and plain containers only) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train first (agmae-train) or pass --checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path}: {_why_unloadable(path, err)}") from err


def _why_unloadable(path: Path, err: Exception) -> str:
    """What a file that torch.load refused is, and the fix that fits."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    reason = str(err).split(". ")[0].strip() or type(err).__name__
    if size == 0:
        return "is empty (0 bytes), a save or a copy that never finished; copy it again or use another checkpoint"
    if head.startswith(ZIP_MAGIC):
        return (f"is a damaged torch file ({size} bytes, {reason[:120]}): truncated or corrupted, e.g. by an "
                f"unfinished copy; copy it again or use another checkpoint")
    if head.startswith(PICKLE_PROTOCOL_OPCODE):
        detail = str(err).partition("WeightsUnpickler error:")[2].strip().splitlines() or [reason]
        return (f"is a pickle that loading with weights_only=True refuses ({detail[0][:160]}): not a checkpoint "
                f"saved by torch.save, or one holding more than tensors and plain containers; pass an agmae-train "
                f"checkpoint or an exported encoder")
    return (f"is not a torch file (it starts with {head!r}); pass an agmae-train checkpoint (checkpoint-last.pth) "
            f"or an exported encoder (agmae-train export)")


def encoder_kwargs_path(path) -> Path:
    """Where the timm kwargs of an exported encoder live: `<file>.json` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def encoder_weights(state: dict) -> dict:
    """The encoder's weights of an MAE (or classifier) state dict, under timm `VisionTransformer` names."""
    return {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIXES + _CLASSIFIER_PREFIXES)}


def guess_encoder_kwargs(state: dict) -> dict:
    """timm `VisionTransformer` kwargs read off the weights' shapes (square images, class token).

    The head count is not in the weights: it is taken as embed_dim / 64, right for timm's
    tiny/small/base/large but not for ViT-H (80-wide heads); pass a kwargs file for those.
    """
    proj = state["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[-1]
    side = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    warnings.warn(f"no encoder kwargs recorded; assuming {_ASSUMED_HEAD_DIM}-wide attention heads")
    return dict(
        img_size=side * patch_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
        depth=depth, num_heads=max(embed_dim // _ASSUMED_HEAD_DIM, 1), mlp_ratio=hidden / embed_dim,
    )


def load_encoder(path) -> tuple[dict, dict]:
    """`(timm_kwargs, state_dict)` of the ViT encoder in an agmae checkpoint, an MAE-style
    checkpoint (`{"model": ...}`), or an exported timm state dict (kwargs from `<file>.json`, else
    guessed from the shapes). Build the encoder with
    `timm.models.vision_transformer.VisionTransformer(**kwargs, num_classes=0)` and
    `load_state_dict(state_dict)` (strict)."""
    path = Path(path)
    loaded = load_checkpoint(path)
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: holds a {type(loaded).__name__}, expected a checkpoint or a state dict")
    state = loaded["model"] if isinstance(loaded.get("model"), dict) else loaded
    state = encoder_weights(state)
    absent = [k for k in _REQUIRED_ENCODER_KEYS if k not in state]
    if absent:
        raise UserError(
            f"{path}: no ViT encoder in it (missing {', '.join(absent)}); expected an agmae-train "
            f"checkpoint or an exported encoder (agmae-train export)"
        )
    if "model" in loaded:
        kwargs = (loaded.get("config") or {}).get("encoder")
    else:
        kwargs = getattr(loaded, "_metadata", {}).get(ENCODER_KWARGS_KEY)
    kwargs_file = encoder_kwargs_path(path)
    if kwargs is None and kwargs_file.is_file():
        kwargs = json.loads(kwargs_file.read_text())
    return dict(kwargs) if kwargs else guess_encoder_kwargs(state), state


def export_encoder(checkpoint, out) -> Path:
    """Write the encoder of a training checkpoint as a timm `VisionTransformer` state dict to
    `out`, its kwargs inside (`_metadata[ENCODER_KWARGS_KEY]`) and in `<out>.json`; both atomically."""
    out = Path(out)
    kwargs, state = load_encoder(checkpoint)
    state = OrderedDict(state)
    state._metadata = OrderedDict({ENCODER_KWARGS_KEY: kwargs})
    atomic_write_text(json.dumps(kwargs, indent=2) + "\n", encoder_kwargs_path(out))
    return atomic_save(state, out)
