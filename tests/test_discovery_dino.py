"""`dino` maps against the CLS attention recomputed from the last block's weights."""
import numpy as np
import pytest
import torch

from agmae import discovery
from agmae.discovery.backbones import RandomInitWarning
from vit_reference import last_block_qk


def reference_cls_attention(model, imgs):
    """softmax(q kᵀ / sqrt(head_dim)) of the last block from its own qkv weights, CLS row over patches:
    [B, heads, N]."""
    q, k = last_block_qk(model, imgs)
    attn = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return attn[:, :, 0, 1:]


def minmax(maps):
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low)).view_as(maps)


def keep_top_mass(attn, threshold):
    """Per head, the largest patches taken in order while the mass already taken is below `threshold`."""
    keep = np.zeros_like(attn)
    for b, h in np.ndindex(*attn.shape[:2]):
        weights = attn[b, h] / attn[b, h].sum()
        taken = 0.0
        for i in np.argsort(-weights):
            if taken >= threshold:
                break
            keep[b, h, i] = 1
            taken += weights[i]
    return keep


@pytest.fixture(scope="module")
def imgs():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("heads", ["mean", "max"])
def test_dino_map_is_the_last_block_cls_attention(imgs, heads):
    with pytest.warns(RandomInitWarning):
        d = discovery.build("dino", backbone="test_vit", random_init=True, heads=heads)
    attn = reference_cls_attention(d.backbone.model, imgs)
    combined = attn.mean(1) if heads == "mean" else attn.amax(1)
    torch.testing.assert_close(d(imgs), minmax(combined.view(3, 4, 4)), atol=1e-5, rtol=0)
    assert d.options == {"heads": heads, "mass_threshold": None}


def test_dino_mass_threshold_keeps_the_top_attention_mass(imgs):
    with pytest.warns(RandomInitWarning):
        d = discovery.build("dino", backbone="test_vit", random_init=True, mass_threshold=0.6)
    keep = keep_top_mass(reference_cls_attention(d.backbone.model, imgs).numpy(), 0.6)
    expected = minmax(torch.from_numpy(keep.mean(1)).view(3, 4, 4))
    torch.testing.assert_close(d(imgs), expected, atol=1e-6, rtol=0)


def test_dino_needs_a_vit():
    with pytest.raises(ValueError, match="needs a ViT"):
        discovery.build("dino", backbone="tf_efficientnet_lite0")
