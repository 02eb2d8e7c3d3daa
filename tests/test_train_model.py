"""The MAE model: position embeddings, masking, initialisation, timm-compatible encoder and export."""
import json
import math

import pytest
import timm
import torch
from click.testing import CliRunner

from agmae.checkpoint import atomic_save, encoder_weights, load_encoder, weights_sha256
from agmae.cli.train import main as train_cli
from agmae.train.model import MODELS, create_model, sincos_pos_embed_2d

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def _tiny(**overrides):
    torch.manual_seed(0)
    return create_model("mae_vit_tiny_patch8", **{**TINY, **overrides})


def test_sincos_position_embedding_matches_the_mae_formula():
    emb = sincos_pos_embed_2d(8, (2, 3))
    assert emb.shape == (1 + 6, 8)
    assert torch.count_nonzero(emb[0]) == 0
    # token at row 1, column 2 (index 1 + 1*3 + 2); D/4 = 2 frequencies: omega = 1, 1/100
    x, y = 2.0, 1.0
    expected = [math.sin(x), math.sin(x / 100), math.cos(x), math.cos(x / 100),
                math.sin(y), math.sin(y / 100), math.cos(y), math.cos(y / 100)]
    assert emb[1 + 5].tolist() == pytest.approx(expected, abs=1e-6)


def test_presets_cover_sizes_patches_and_the_demo_model():
    for size in ("tiny", "small", "base", "large", "huge"):
        for patch in (16, 14, 8):
            assert MODELS[f"mae_vit_{size}_patch{patch}"]["patch_size"] == patch
    assert MODELS["mae_vit_base_patch16"] == dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    demo = create_model("mae_vit_demo_patch8")
    assert demo.encoder_kwargs == dict(img_size=64, patch_size=8, in_chans=3, embed_dim=128, depth=4,
                                       num_heads=4, mlp_ratio=4.0)
    assert (len(demo.decoder_blocks), demo.decoder_embed.out_features) == (1, 64)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("mae_vit_giant_patch16")


def test_initialisation_follows_mae():
    model = _tiny()
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(32, (4, 4)))
    for linear in (model.blocks[0].attn.qkv, model.decoder_pred):
        bound = math.sqrt(6 / (linear.in_features + linear.out_features))
        assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
        assert torch.count_nonzero(linear.bias) == 0
    proj = model.patch_embed.proj.weight.flatten(1)
    assert proj.abs().max() <= math.sqrt(6 / sum(proj.shape))
    big = create_model("mae_vit_tiny_patch8", **{**TINY, "embed_dim": 256, "num_heads": 4})
    assert big.cls_token.std().item() == pytest.approx(0.02, rel=0.3)


def test_random_masking_keeps_the_lowest_noise_patches_per_sample():
    model = _tiny()
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16, 1)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    visible, mask, ids_restore = model.random_masking(x, 0.75, noise)
    assert visible.shape == (2, 4, 1)
    assert mask.sum(dim=1).tolist() == [12.0, 12.0]
    for row in range(2):
        kept = torch.argsort(noise[row])[:4]
        assert visible[row, :, 0].tolist() == x[row, kept, 0].tolist()
        assert mask[row, kept].sum() == 0
        assert torch.equal(torch.argsort(torch.argsort(noise[row])), ids_restore[row])


def test_forward_shapes_and_patchify_round_trip():
    model = _tiny()
    imgs = torch.randn(3, 3, 32, 32)
    pred, mask = model(imgs, mask_ratio=0.75)
    assert pred.shape == (3, 16, 8 * 8 * 3) and mask.shape == (3, 16)
    patches = model.patchify(imgs)
    assert torch.equal(patches[0, 1], imgs[0, :, 0:8, 8:16].permute(1, 2, 0).flatten())
    assert torch.equal(model.unpatchify(patches), imgs)


def test_encoder_names_match_timm_vision_transformer():
    model = _tiny()
    vit = timm.models.vision_transformer.VisionTransformer(**model.encoder_kwargs, num_classes=0)
    assert set(encoder_weights(model.state_dict())) == set(vit.state_dict())
    assert all(k.startswith(("decoder_", "mask_token")) for k in set(model.state_dict()) - set(vit.state_dict()))


def test_all_names_are_those_of_the_official_models_mae():
    """facebookresearch/mae's MaskedAutoencoderViT names (written out from its models_mae.py), so that its
    pre-training checkpoints load with agmae-train --init-from."""
    block = [f"{part}.{kind}" for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for kind in ("weight", "bias")]
    official = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed",
                "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias",
                *(f"blocks.{i}.{name}" for i in range(TINY["depth"]) for name in block),
                *(f"decoder_blocks.{i}.{name}" for i in range(TINY["decoder_depth"]) for name in block)}
    assert set(_tiny().state_dict()) == official


def test_export_loads_strictly_into_timm_with_equal_features(tmp_path):
    model = _tiny()
    checkpoint = atomic_save({"model": model.state_dict(), "config": {"encoder": model.encoder_kwargs}},
                             tmp_path / "checkpoint-last.pth")
    out = tmp_path / "encoder.pth"
    result = CliRunner().invoke(train_cli, ["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 0, result.output
    kwargs = json.loads((tmp_path / "encoder.pth.json").read_text())
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **kwargs)
    vit.load_state_dict(torch.load(out, weights_only=True), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    model.eval(), vit.eval()
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(imgs), model.forward_features(imgs), atol=1e-6)
    assert load_encoder(out)[0] == kwargs == load_encoder(checkpoint)[0]


def test_load_encoder_guesses_kwargs_of_a_bare_state_dict(tmp_path):
    model = _tiny(embed_dim=128, num_heads=2)  # 64-wide heads, as in timm's standard ViTs
    bare = atomic_save(encoder_weights(model.state_dict()), tmp_path / "bare.pth")
    with pytest.warns(UserWarning, match="64-wide"):
        kwargs, state = load_encoder(bare)
    assert kwargs == model.encoder_kwargs
    assert set(state) == set(encoder_weights(model.state_dict()))
    with pytest.raises(ValueError, match="no ViT encoder"):
        load_encoder(atomic_save({"model": {"decoder_pred.weight": torch.zeros(1)}}, tmp_path / "d.pth"))


def test_the_weights_fingerprint_is_of_names_and_values_not_of_memory_layout():
    state = {"w": torch.arange(6.0).reshape(3, 2).t(), "count": torch.tensor(3), "empty": torch.empty(0)}
    same = {"w": state["w"].contiguous(), "count": torch.tensor(3), "empty": torch.empty(0)}
    assert weights_sha256(state) == weights_sha256(same)
    assert weights_sha256(state) != weights_sha256({**state, "count": torch.tensor(4)})
    assert weights_sha256(state) != weights_sha256({**state, "w": state["w"].double()})
    assert weights_sha256(state) != weights_sha256({"v" if k == "w" else k: v for k, v in state.items()})
