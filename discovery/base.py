"""What every discovery method shares: the callable interface, the per-image min-max, the feature-layer option."""
import torch

from agmae.options import option

# A map whose range is below this fraction of its magnitude is constant up to rounding.
CONSTANT_RTOL = 1e-6


def normalise_maps(maps):
    """Min-max each map to [0, 1]; a constant map becomes zeros, a non-finite one stays NaN.

    maps: [B, h, w] -> [B, h, w] float32
    """
    flat = maps.float().flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    varies = span > CONSTANT_RTOL * torch.maximum(hi.abs(), lo.abs())
    out = torch.where(varies, (flat - lo) / torch.where(varies, span, 1.0), 0.0)
    out[~torch.isfinite(flat).all(1)] = float("nan")
    return out.view_as(maps)


def layer_option():
    """The feature layer of the methods that read one (tokencut, gradcam): one definition for both."""
    return option(None, "Module name of the feature layer, e.g. blocks.5. [default: tokencut on EfficientNets "
                        "blocks.5, other CNNs their head features, ViTs the last block's keys (`norm`: their final "
                        "tokens); gradcam the head features for CNNs, blocks[-1].norm1 for ViTs]")


def to_grid(tokens, grid):
    """tokens: [B, N] -> [B, h, w]"""
    return tokens.reshape(tokens.shape[0], *grid)


class Discoverer:
    """`maps = d(imgs)`: imgs [B, 3, S, S] (normalised with `.mean/.std`) -> maps [B, h, w] in [0, 1].

    Subclasses set `method`, fill `options` (everything that changes the maps, JSON-able) and
    implement `compute(imgs, keys, labels) -> [B, h, w]` raw scores.
    """

    method = None
    default_image_size = 224
    # False for a method whose maps come from elsewhere (oracle: the masks): the images are then not
    # decoded at all, and `compute` gets placeholder zeros of the right shape.
    reads_images = True

    def __init__(self, backbone, options):
        self.backbone = backbone
        self.options = options
        self.failures = {}  # {key: why no map was made} for an image the method could not map (the store's /errors)

    @property
    def backbone_name(self) -> str:
        return self.backbone.name

    @property
    def weights_sha256(self) -> str:
        return self.backbone.weights_sha256

    @property
    def mean(self):
        return self.backbone.mean

    @property
    def std(self):
        return self.backbone.std

    def grid(self, size: int) -> tuple:
        return self.backbone.grid(size)

    def compute(self, imgs, keys=None, labels=None):
        raise NotImplementedError

    def __call__(self, imgs, keys=None, labels=None):
        """imgs: [B, 3, S, S]; keys: dataset keys (oracle); labels: [B] class indices (Grad-CAM `target=label`)."""
        self.grid(imgs.shape[-1])
        with torch.no_grad():
            return normalise_maps(self.compute(imgs, keys=keys, labels=labels)).cpu()
