"""`gradcam` against the PyPI package grad-cam (pytorch_grad_cam.GradCAM): same model, layer, targets.

pytorch-grad-cam resizes its CAM to the input size; overriding its target size with the layer's
grid leaves its CAM at layer resolution (a same-size resize is the identity), which is where
ours lives, so both are compared cell by cell after their own min-max.
"""
import copy

import pytest
import skimage.data
import timm
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM as PackageGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from agmae import discovery
from agmae.data.transforms import discovery_transform
from agmae.discovery.backbones import RandomInitWarning


class GridGradCAM(PackageGradCAM):
    def __init__(self, grid, **kwargs):
        super().__init__(**kwargs)
        self.grid = grid

    def get_target_width_height(self, input_tensor):
        return self.grid[1], self.grid[0]


def package_cam(d, imgs, layer, grid, targets=None, reshape_transform=None):
    """The package's CAM on a trainable copy of our model (it only hooks tensors that require grad)."""
    model = copy.deepcopy(d.backbone.model).requires_grad_(True)
    cam = GridGradCAM(grid, model=model, target_layers=[model.get_submodule(layer)],
                      reshape_transform=reshape_transform)
    result = cam(d.backbone.prepare(imgs), targets=targets)
    cam.activations_and_grads.release()
    return torch.from_numpy(result)


def test_vit_gradcam_matches_pytorch_grad_cam():
    with pytest.warns(RandomInitWarning):
        d = discovery.build("gradcam", backbone="test_vit", random_init=True)
    assert d.options == {"target": "predicted", "layer": "blocks.5.norm1"}
    imgs = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    def tokens_to_grid(tokens):  # [B, 1 + 16, C] -> [B, C, 4, 4], CLS dropped
        return tokens[:, 1:].reshape(len(tokens), 4, 4, -1).permute(0, 3, 1, 2)

    expected = package_cam(d, imgs, "blocks.5.norm1", (4, 4), reshape_transform=tokens_to_grid)
    torch.testing.assert_close(d(imgs), expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def lite0_gradcam():
    d = discovery.build("gradcam", backbone="tf_efficientnet_lite0")
    transform = discovery_transform(224, d.mean, d.std)
    imgs = torch.stack([transform(Image.fromarray(skimage.data.coffee())),
                        transform(Image.fromarray(skimage.data.chelsea()))])
    return d, imgs


def test_cnn_gradcam_matches_pytorch_grad_cam_for_the_predicted_class(lite0_gradcam):
    d, imgs = lite0_gradcam
    assert d.options == {"target": "predicted", "layer": "bn2"} and d.grid(224) == (7, 7)
    maps = d(imgs)
    torch.testing.assert_close(maps, package_cam(d, imgs, "bn2", (7, 7)), atol=1e-4, rtol=0)
    assert maps.flatten(1).std(1).min() > 0.1  # real, non-trivial maps


def test_cnn_gradcam_matches_pytorch_grad_cam_for_given_labels():
    d = discovery.build("gradcam", backbone="tf_efficientnet_lite0", target="label", layer="blocks.5")
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([504, 3])
    expected = package_cam(d, imgs, "blocks.5", (2, 2), targets=[ClassifierOutputTarget(c) for c in labels.tolist()])
    torch.testing.assert_close(d(imgs, labels=labels), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="needs the images' labels"):
        d(imgs)


def test_gradcam_needs_a_classifier_head(tmp_path):
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), tmp_path / "headless.pth")
    with pytest.raises(ValueError, match="no classifier head"):
        discovery.build("gradcam", backbone="test_vit", weights=tmp_path / "headless.pth")
