"""TokenCut: the batched torch eigensolver against scipy's generalised eigh, the foreground rules,
degenerate graphs, the mask output and the ViT key features."""
import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from agmae import discovery
from agmae.data.folder import load_rgb, scan
from agmae.data.transforms import discovery_transform
from agmae.discovery.backbones import RandomInitWarning, load_backbone
from agmae.discovery.tokencut import ncut, resolve_solver, seed_component
from agmae.errors import UserError
from vit_reference import last_block_qk


def scipy_fiedler(feats, tau, eps, binary):
    """The original TokenCut recipe for one image: generalised eigh of (D - W, D), second eigenvector."""
    tokens = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sim = tokens @ tokens.T
    weights = np.where(sim > tau, 1.0 if binary else sim, eps)
    degree = np.diag(weights.sum(1))
    _, vectors = scipy.linalg.eigh(degree - weights, degree, subset_by_index=[1, 2])
    return vectors[:, 0]


def seed_rule(vector):
    """TokenCut's bipartition: above the mean; flip so that argmax |v| is in the foreground."""
    foreground = vector > vector.mean()
    if not foreground[np.argmax(np.abs(vector))]:
        vector, foreground = -vector, ~foreground
    return vector, foreground


def assert_matches_scipy(feats, tau, eps=1e-5, binary=True, solver="auto"):
    eigvec, foreground = ncut(torch.as_tensor(feats), tau=tau, eps=eps, binary=binary, solver=solver)
    for ours, our_fg, image in zip(eigvec.numpy(), foreground.numpy(), feats.astype(np.float64)):
        reference, reference_fg = seed_rule(scipy_fiedler(image, tau, eps, binary))
        cosine = ours @ reference / np.linalg.norm(ours) / np.linalg.norm(reference)
        assert cosine >= 0.999  # seed-aligned, so the sign agrees too
        np.testing.assert_array_equal(our_fg, reference_fg)


def clustered_tokens(rng, batch=6, n=64, dim=32, clusters=3, noise=0.6):
    centres = rng.standard_normal((batch, clusters, dim))
    assignment = rng.integers(0, clusters, (batch, n))
    tokens = np.take_along_axis(centres, assignment[..., None], axis=1)
    return (tokens + noise * rng.standard_normal((batch, n, dim))).astype(np.float32)


@pytest.mark.parametrize("solver", ["exact", "iterative"])
@pytest.mark.parametrize("binary", [True, False])
def test_ncut_matches_scipy_on_random_features(binary, solver):
    assert_matches_scipy(clustered_tokens(np.random.default_rng(0)), tau=0.2, binary=binary, solver=solver)


def test_auto_solver_is_iterative_on_cuda_and_exact_elsewhere():
    assert [resolve_solver("auto", device) for device in ("cuda", "cuda:1", "cpu")] == ["iterative", "iterative",
                                                                                      "exact"]
    assert resolve_solver("exact", "cuda") == "exact" and resolve_solver("iterative", "cpu") == "iterative"
    with pytest.raises(UserError, match="solver='lapack': use one of"):
        resolve_solver("lapack", "cpu")
    feats = torch.as_tensor(clustered_tokens(np.random.default_rng(1)))
    auto, exact = ncut(feats), ncut(feats, solver="exact")
    assert torch.equal(auto[0], exact[0]) and torch.equal(auto[1], exact[1])


@pytest.fixture(scope="module")
def lite0_features(demo_root):
    """Mean-centred features of the offline EfficientNet-Lite0's default TokenCut stage (blocks.5) for a few
    demo images at 224: [B, 49, C]."""
    backbone = load_backbone("tf_efficientnet_lite0")
    index = scan(demo_root / "original")
    transform = discovery_transform(224, backbone.mean, backbone.std)
    imgs = torch.stack([transform(load_rgb(index.path(i))) for i in range(6)])
    with torch.no_grad():
        feats = backbone.features(imgs, "blocks.5").flatten(2).transpose(1, 2)
    return (feats - feats.mean(1, keepdim=True)).numpy()


def test_ncut_matches_scipy_on_efficientnet_features(lite0_features):
    assert_matches_scipy(lite0_features, tau=0.0)


def test_degenerate_graphs_give_finite_maps():
    rng = np.random.default_rng(1)
    identical = np.ones((2, 16, 8))
    one_cluster = 1 + 1e-6 * rng.standard_normal((2, 16, 8))
    two_components = np.zeros((2, 16, 8))
    two_components[:, :8, 0] = 1
    two_components[:, 8:, 1] = 1
    all_zero = np.zeros((2, 16, 8))
    for feats, eps in [(identical, 1e-5), (one_cluster, 1e-5), (two_components, 0.0), (all_zero, 1e-5)]:
        for fg_rule in ("seed", "border"):
            eigvec, foreground = ncut(torch.as_tensor(feats, dtype=torch.float32), eps=eps, fg_rule=fg_rule)
            assert torch.isfinite(eigvec).all() and foreground.dtype == torch.bool
    # Two components, disconnected (eps 0) or nearly (eps 1e-5): the cut is exactly between them and the
    # Fiedler vector is constant on each (|v| ties across them, so which is foreground is arbitrary).
    halves = torch.arange(16) < 8
    for eps in (0.0, 1e-5):
        eigvec, foreground = ncut(torch.as_tensor(two_components, dtype=torch.float32), eps=eps, fg_rule="seed")
        for b in range(2):
            assert torch.equal(foreground[b], halves) or torch.equal(foreground[b], ~halves)
            assert eigvec[b, foreground[b]].std() < 1e-4 and eigvec[b, ~foreground[b]].std() < 1e-4
            assert eigvec[b, foreground[b]].mean() > eigvec[b, ~foreground[b]].mean() + 0.1


def ring_and_interior_tokens(rng, side=8, dim=16):
    """A side×side grid whose outer ring is one cluster and whose interior is another: [1, side², dim]."""
    ring = np.zeros((side, side), dtype=bool)
    ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
    centres = np.eye(dim)[:2]  # orthogonal: no edge above τ between the two clusters
    tokens = centres[ring.flatten().astype(int)] + 0.05 * rng.standard_normal((side * side, dim))
    return torch.as_tensor(tokens[None], dtype=torch.float32), ring.flatten()


def test_border_rule_picks_the_side_off_the_border():
    # The ring (28 cells) is smaller than the interior (36), so |v| peaks on the ring and the
    # seed rule calls the ring the object; the border rule must call the interior the object.
    feats, ring = ring_and_interior_tokens(np.random.default_rng(2))
    _, seed_fg = ncut(feats, fg_rule="seed")
    eigvec, border_fg = ncut(feats, fg_rule="border", grid=(8, 8))
    np.testing.assert_array_equal(seed_fg[0].numpy(), ring)
    np.testing.assert_array_equal(border_fg[0].numpy(), ~ring)
    assert eigvec[0, ~ring].min() > eigvec[0, ring].max()  # the sign follows the chosen foreground


def test_border_rule_never_prefers_the_border_side():
    feats = torch.as_tensor(clustered_tokens(np.random.default_rng(3), batch=16, n=49))
    _, fg_seed = ncut(feats, fg_rule="seed")
    _, fg = ncut(feats, fg_rule="border", grid=(7, 7))
    ring = torch.ones(7, 7, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    fg_ring, bg_ring = (fg & ring.flatten()).sum(1), (~fg & ring.flatten()).sum(1)
    assert (fg_ring <= bg_ring).all()
    tie = (fg_seed & ring.flatten()).sum(1) == (~fg_seed & ring.flatten()).sum(1)
    assert torch.equal(fg[tie], fg_seed[tie])


def test_seed_component_is_four_connected():
    foreground = torch.tensor([[1, 1, 0, 0, 0],
                               [0, 1, 0, 1, 1],
                               [0, 0, 1, 0, 1],
                               [1, 0, 0, 0, 1]], dtype=torch.bool)[None]
    expected = torch.tensor([[1, 1, 0, 0, 0],
                             [0, 1, 0, 0, 0],
                             [0, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(seed_component(foreground, torch.tensor([0]))[0], expected)
    right = seed_component(foreground, torch.tensor([9]))[0]
    assert right.sum() == 4 and right[1, 3] and right[3, 4] and not right[2, 2]
    assert not seed_component(foreground, torch.tensor([2]))[0].any()  # seed off the foreground


def last_block_keys(model, imgs):
    """Keys of the last block recomputed from its weights, heads concatenated: [B, patches, dim]."""
    _, k = last_block_qk(model, imgs)
    return k.transpose(1, 2).flatten(2)[:, model.num_prefix_tokens:]


@pytest.mark.parametrize("output", ["soft", "mask"])
def test_vit_tokencut_cuts_the_last_block_keys(output):
    with pytest.warns(RandomInitWarning):
        d = discovery.build("tokencut", backbone="test_vit", random_init=True, output=output)
    imgs = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = d(imgs)
    eigvec, foreground = ncut(last_block_keys(d.backbone.model, imgs), tau=0.2)
    if output == "soft":
        low, high = eigvec.min(1, keepdim=True).values, eigvec.max(1, keepdim=True).values
        torch.testing.assert_close(maps.flatten(1), (eigvec - low) / (high - low), atol=1e-5, rtol=0)
    else:
        seed = eigvec.abs().argmax(1)
        expected = seed_component(foreground.view(3, 4, 4), seed).float()
        assert torch.equal(maps, expected) and maps.amax((1, 2)).eq(1).all()


def test_vit_tokencut_on_a_named_layer_cuts_its_patch_tokens_mean_centred():
    with pytest.warns(RandomInitWarning):
        d = discovery.build("tokencut", backbone="test_vit", random_init=True, layer="norm", center=True,
                            fg_rule="border")
    imgs = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        final = d.backbone.model.forward_features(imgs)[:, d.backbone.model.num_prefix_tokens:]
    eigvec, _ = ncut(final - final.mean(1, keepdim=True), tau=0.2, fg_rule="border", grid=(4, 4))
    low, high = eigvec.min(1, keepdim=True).values, eigvec.max(1, keepdim=True).values
    torch.testing.assert_close(d(imgs).flatten(1), (eigvec - low) / (high - low), atol=1e-5, rtol=0)
    assert d.options["features"] == "norm"


def test_cnn_tokencut_defaults_and_grid(demo_root):
    d = discovery.build("tokencut", backbone="tf_efficientnet_lite0")
    assert d.options["features"] == "blocks.5" and d.options["tau"] == 0.0 and d.options["center"] is True
    assert d.options["fg_rule"] == "border" and d.default_image_size == 448
    assert d.grid(224) == (7, 7) and d.grid(448) == (14, 14)
    image = Image.open(scan(demo_root / "train").path(0)).convert("RGB")
    maps = d(discovery_transform(224, d.mean, d.std)(image)[None])
    assert maps.shape == (1, 7, 7) and maps.min() == 0 and maps.max() == 1
