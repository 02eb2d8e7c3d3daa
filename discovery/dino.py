"""`dino`: the last block's CLS-to-patch self-attention of a (DINO) ViT."""
from dataclasses import dataclass

import click
import torch

from agmae.discovery.backbones import load_backbone
from agmae.discovery.base import Discoverer, to_grid
from agmae.errors import UserError
from agmae.options import option, validate

HEAD_COMBINE = ("mean", "max")


@dataclass
class DinoOptions:
    heads: str = option("mean", "Combine the CLS attention of the heads by their mean or max.",
                        type=click.Choice(HEAD_COMBINE))
    mass_threshold: float | None = option(None, "Keep per head the patches holding this fraction of the attention "
                                                "mass (DINO's rule); the map is the mean of the keep-masks. "
                                                "[default: off, the attention itself]",
                                          type=click.FloatRange(0, 1, min_open=True))

    def __post_init__(self):
        validate(self)


def cls_attention(q, k, scale, num_prefix_tokens):
    """Post-softmax attention of the CLS query over the patch keys.

    q, k: [B, heads, T, head_dim] -> [B, heads, N] (N = T - num_prefix_tokens). The softmax runs over
    all T keys, as in the block itself; only the CLS row is formed.
    """
    attn = ((q[:, :, :1] * scale) @ k.transpose(-2, -1)).softmax(-1)
    return attn[:, :, 0, num_prefix_tokens:]


def mass_keep(attn, threshold):
    """DINO's visualisation rule: per head, the patches that hold the top `threshold` of the attention mass.

    attn: [B, heads, N] -> keep: [B, heads, N] float {0, 1}
    """
    values, order = attn.sort(-1)
    cumulative = (values / values.sum(-1, keepdim=True)).cumsum(-1)
    return torch.zeros_like(attn).scatter_(-1, order, (cumulative > 1 - threshold).float())


class DinoAttention(Discoverer):
    method = "dino"

    def __init__(self, backbone, options: DinoOptions):
        if backbone.kind != "vit":
            raise UserError(f"method dino needs a ViT backbone, got {backbone.name}")
        super().__init__(backbone, {"heads": options.heads, "mass_threshold": options.mass_threshold})

    def compute(self, imgs, keys=None, labels=None):
        q, k = self.backbone.last_qk(imgs)
        model = self.backbone.model
        attn = cls_attention(q, k, model.blocks[-1].attn.scale, model.num_prefix_tokens)
        if self.options["mass_threshold"] is not None:
            attn = mass_keep(attn, self.options["mass_threshold"])
        combined = attn.mean(1) if self.options["heads"] == "mean" else attn.amax(1)
        return to_grid(combined, self.grid(imgs.shape[-1]))


def build(options: DinoOptions, backbone=None, weights=None, device="auto", random_init=False, seed=0,
          precision="auto"):
    return DinoAttention(load_backbone(backbone, weights, random_init, seed, device, precision=precision), options)
