"""Stage 1: unsupervised object discovery, image -> patch-attention map.

`d = build("tokencut")` then `maps = d(imgs)`: imgs [B, 3, S, S] normalised with `d.mean/d.std`
-> maps [B, h, w] in [0, 1] on `d.grid(S)`. `d.options` holds every option that shapes the maps.
"""
import inspect

from agmae.discovery import dino, gradcam, oracle, tokencut
from agmae.errors import UserError

METHODS = {
    "tokencut": (tokencut.build, tokencut.TokenCut),
    "dino": (dino.build, dino.DinoAttention),
    "gradcam": (gradcam.build, gradcam.GradCAM),
    "oracle": (oracle.build, oracle.Oracle),
}


def method_options(method) -> list:
    """Names of the options `build(method, ...)` accepts besides backbone/weights/device/random_init/seed."""
    if method not in METHODS:
        raise UserError(f"unknown discovery method {method!r}; use one of {', '.join(METHODS)}")
    params = inspect.signature(METHODS[method][1].__init__).parameters
    return [name for name in params if name not in ("self", "backbone")]


def build(method, backbone=None, weights=None, device="auto", random_init=False, seed=0, precision="auto", **opts):
    """A discovery callable. backbone: timm name (method default when None); weights: checkpoint file;
    random_init/seed: deterministic random weights for smoke tests; precision: auto (bf16 autocast on
    CUDA, fp32 on CPU), fp32 or bf16; opts: the method's options."""
    unknown = sorted(set(opts) - set(method_options(method)))
    if unknown:
        raise UserError(f"method {method} has no option {', '.join(unknown)}; "
                         f"its options are {', '.join(method_options(method))}")
    return METHODS[method][0](backbone=backbone, weights=weights, device=device,
                              random_init=random_init, seed=seed, precision=precision, **opts)
