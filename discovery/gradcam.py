"""`gradcam`: Grad-CAM of a classifier's target class at one layer, one backward pass per batch."""
from dataclasses import dataclass

import click
import torch

from agmae.discovery.backbones import OFFLINE_LITE0, capture_output, load_backbone
from agmae.discovery.base import Discoverer, layer_option, to_grid
from agmae.errors import UserError
from agmae.options import option, validate

TARGETS = ("predicted", "label")


@dataclass
class GradCAMOptions:
    target: str = option("predicted", "Explain the top-1 predicted class or the dataset label.",
                         type=click.Choice(TARGETS))
    layer: str | None = layer_option()

    def __post_init__(self):
        validate(self)


class GradCAM(Discoverer):
    method = "gradcam"

    def __init__(self, backbone, options: GradCAMOptions):
        target, layer = options.target, options.layer
        if layer is None:
            vit = backbone.kind == "vit"
            layer = f"blocks.{len(backbone.model.blocks) - 1}.norm1" if vit else backbone.head_layer()
        backbone.module(layer)
        super().__init__(backbone, {"target": target, "layer": layer})

    def grid(self, size):
        return self.backbone.grid(size, None if self.backbone.kind == "vit" else self.options["layer"])

    def compute(self, imgs, keys=None, labels=None):
        if self.options["target"] == "label" and labels is None:
            raise UserError("gradcam target=label needs the images' labels")
        backbone = self.backbone
        with torch.enable_grad(), capture_output(backbone.module(self.options["layer"]), as_leaf=True) as taken:
            with backbone.autocast():
                logits = backbone.model(backbone.prepare(imgs)).float()
            if self.options["target"] == "label":
                target = torch.as_tensor(labels, device=logits.device).long()
            else:
                target = logits.argmax(1)
            activations = taken[0]
            grads, = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), activations)
        activations, grads = activations.float(), grads.float()
        if backbone.kind == "vit":
            prefix = backbone.model.num_prefix_tokens
            activations, grads = activations[:, prefix:], grads[:, prefix:]
            cam = (activations * grads.mean(1, keepdim=True)).sum(-1)
            return to_grid(cam.relu(), self.grid(imgs.shape[-1]))
        return (activations * grads.mean((2, 3), keepdim=True)).sum(1).relu()


def build(options: GradCAMOptions, backbone=None, weights=None, device="auto", random_init=False, seed=0,
          precision="auto"):
    return GradCAM(load_backbone(backbone or OFFLINE_LITE0, weights, random_init, seed, device, classifier=True,
                                 precision=precision),
                   options)
