"""eval.features: CLS / mean-patch features of a frozen ViT, the feature cache, and 2-rank extraction."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from agmae.data.folder import load_rgb, scan
from agmae.data.transforms import eval_transform
from agmae.eval import features as features_module
from agmae.eval.features import FeatureSource
from agmae.checkpoint import file_sha256
from agmae.hardware import cpu_has_native_bf16

from helpers import TINY_VIT


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """An agmae-train style checkpoint: encoder keys named like timm's ViT, plus decoder keys to ignore."""
    torch.manual_seed(0)
    encoder = VisionTransformer(**TINY_VIT, num_classes=0)
    state = {**encoder.state_dict(), "decoder_embed.weight": torch.zeros(4, 32), "mask_token": torch.zeros(1, 1, 4)}
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": state, "config": {"encoder": TINY_VIT}, "epoch": 3}, path)
    return path, encoder.eval()


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c, name in enumerate(["cat", "dog", "fox"]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, size=(36 + c, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def reference_features(encoder, root, pool):
    index = scan(root)
    transform = eval_transform(32)
    imgs = torch.stack([transform(load_rgb(index.path(i))) for i in range(len(index))])
    with torch.no_grad():
        tokens = encoder.forward_features(imgs)
    return (tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)).numpy()


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_features_are_final_norm_tokens_of_the_eval_view(tiny_checkpoint, image_folder, pool):
    path, encoder = tiny_checkpoint
    result = FeatureSource(path, pool=pool, batch_size=4, workers=0, use_cache=False).features(image_folder)
    assert result.feats.shape == (15, 32) and result.feats.dtype == np.float16
    np.testing.assert_allclose(result.feats, reference_features(encoder, image_folder, pool), atol=2e-3, rtol=1e-3)
    assert result.cache_path is None


def test_cache_is_reused_without_loading_the_model(tiny_checkpoint, image_folder, monkeypatch):
    path, _ = tiny_checkpoint
    first = FeatureSource(path, batch_size=8, workers=0).features(image_folder)
    meta = json.loads(first.cache_path.with_suffix(".json").read_text())
    assert meta["checkpoint_sha256"] == file_sha256(path)
    assert meta["keys_sha256"] == scan(image_folder).keys_sha256 and meta["pool"] == "cls"
    assert first.cache_path.parent == features_module.agmae_home() / "features"

    def no_model(*args):
        raise AssertionError("the encoder was built although the features were cached")

    monkeypatch.setattr(features_module, "build_encoder", no_model)
    second = FeatureSource(path, batch_size=8, workers=0).features(image_folder)
    assert second.cache_path == first.cache_path
    np.testing.assert_array_equal(np.asarray(second.feats), first.feats)
    with pytest.raises(AssertionError, match="encoder was built"):  # another option is another key
        FeatureSource(path, pool="mean", workers=0).features(image_folder)


def test_changed_checkpoint_misses_the_cache(tiny_checkpoint, image_folder):
    path, encoder = tiny_checkpoint
    before = FeatureSource(path, workers=0).features(image_folder)
    with torch.no_grad():
        encoder.norm.bias.add_(1.0)
    torch.save({"model": encoder.state_dict(), "config": {"encoder": TINY_VIT}}, path)
    after = FeatureSource(path, workers=0).features(image_folder)
    assert after.cache_path != before.cache_path
    np.testing.assert_allclose(after.feats, reference_features(encoder, image_folder, "cls"), atol=2e-3, rtol=1e-3)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(features_module.UserError, match="agmae-train"):
        FeatureSource(tmp_path / "nothing.pth")


def _extract_on_rank(rank, world_size, port, checkpoint, root, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    from agmae import distributed

    distributed.init("cpu")
    try:
        torch.set_num_threads(1)
        result = FeatureSource(checkpoint, batch_size=4, workers=0, progress=False).features(root)
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.asarray(result.feats))
    finally:
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_single_process(tiny_checkpoint, image_folder, tmp_path):
    path, _ = tiny_checkpoint
    single = FeatureSource(path, batch_size=8, workers=0, use_cache=False).features(image_folder).feats
    # 15 images on 2 ranks: the DistributedSampler pads one duplicate, which must not shift any row
    mp.spawn(_extract_on_rank, args=(2, _free_port(), str(path), str(image_folder), str(tmp_path)), nprocs=2)
    for rank in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"rank{rank}.npy"), single, atol=2e-3, rtol=1e-3)
    cached = FeatureSource(path, workers=0).features(image_folder)  # rank 0 wrote the cache
    np.testing.assert_array_equal(np.asarray(cached.feats), np.load(tmp_path / "rank0.npy"))


def test_bf16_extraction_follows_fp32_and_is_cached_apart(tiny_checkpoint, image_folder):
    path, encoder = tiny_checkpoint
    exact = FeatureSource(path, workers=0, precision="fp32").features(image_folder)
    if not cpu_has_native_bf16():
        with pytest.raises(ValueError, match="no native bf16"):
            FeatureSource(path, workers=0, precision="bf16")
        return
    fast = FeatureSource(path, workers=0, precision="bf16").features(image_folder)
    assert fast.cache_path != exact.cache_path
    cosine = F.cosine_similarity(torch.from_numpy(np.asarray(fast.feats, np.float32)),
                                 torch.from_numpy(np.asarray(exact.feats, np.float32)), dim=1)
    assert cosine.min() > 0.99


def test_an_unwritable_feature_cache_names_the_cache_and_agmae_home(tiny_checkpoint, image_folder, tmp_path,
                                                                   monkeypatch):
    checkpoint, _ = tiny_checkpoint
    home = tmp_path / "home"
    home.mkdir()
    (home / "features").write_text("a file where the cache folder should be")
    monkeypatch.setenv("AGMAE_HOME", str(home))
    extracted = []
    monkeypatch.setattr(features_module, "extract_features", lambda *args, **kwargs: extracted.append(1))
    with pytest.raises(features_module.UserError, match="the feature cache cannot be written") as err:
        FeatureSource(checkpoint, workers=0, progress=False).features(image_folder)
    message = str(err.value)
    assert str(home / "features") in message and f"AGMAE_HOME (now {home})" in message and "--no-cache" in message
    assert "--run-dir" not in message and not extracted, "refused before any extraction"


def test_a_cache_write_refused_by_the_file_system_names_the_cache(tiny_checkpoint, image_folder, tmp_path,
                                                                  monkeypatch):
    checkpoint, _ = tiny_checkpoint
    monkeypatch.setenv("AGMAE_HOME", str(tmp_path / "home"))

    def read_only(path, write):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(features_module, "atomic_write", read_only)
    with pytest.raises(features_module.UserError, match=r"features: the feature cache cannot be written "
                                                        r"\(Read-only file system\); set AGMAE_HOME"):
        FeatureSource(checkpoint, workers=0, progress=False).features(image_folder)
    cached = FeatureSource(checkpoint, workers=0, progress=False, use_cache=False).features(image_folder)
    assert cached.feats.shape == (15, 32) and cached.cache_path is None, "--no-cache still evaluates"
