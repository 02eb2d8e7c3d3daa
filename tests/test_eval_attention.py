"""eval.attention: IoU at the mean threshold and pointing, checked on maps worked out by hand."""
import numpy as np
import pytest
import torch

from agmae.eval.attention import centre_prior, map_scores


def _top_left_mask(rows=2, cols=2):
    mask = np.zeros((4, 4), dtype=bool)
    mask[:rows, :cols] = True
    return mask


def test_map_scores_match_hand_computed_values():
    # 2x2 -> 4x4 bilinear (align_corners=False) of [[1,0],[0,0]] is
    # [[1,.75,.25,0],[.75,.5625,.1875,0],[.25,.1875,.0625,0],[0,0,0,0]], mean 0.25,
    # so "> mean" keeps exactly the top-left 2x2 block.
    peak_top_left = np.array([[1.0, 0.0], [0.0, 0.0]])
    peak_bottom_right = np.array([[0.0, 0.0], [0.0, 1.0]])
    maps = np.stack([peak_top_left, peak_top_left, peak_bottom_right, np.zeros((2, 2))])
    bottom_right = np.zeros((4, 4), dtype=bool)
    bottom_right[3, 3] = True
    masks = np.stack([_top_left_mask(), _top_left_mask(rows=2, cols=4), _top_left_mask(), bottom_right])
    scores = map_scores(maps, masks)
    np.testing.assert_allclose(scores["iou"], [1.0, 0.5, 0.0, 0.0])
    # the constant map's argmax is the first pixel (0, 0), which is background in mask 4
    np.testing.assert_array_equal(scores["pointing"], [True, True, False, False])


def test_map_scores_accepts_torch_and_float_masks_and_chunks():
    rng = np.random.default_rng(0)
    maps = rng.random((300, 3, 3)).astype(np.float16)  # more than one internal chunk
    masks = rng.random((300, 12, 12)) > 0.6
    from_numpy = map_scores(maps, masks)
    from_torch = map_scores(torch.from_numpy(maps.astype(np.float32)), torch.from_numpy(masks.astype(np.float32)))
    np.testing.assert_allclose(from_numpy["iou"], from_torch["iou"])
    np.testing.assert_array_equal(from_numpy["pointing"], from_torch["pointing"])
    assert 0 < from_numpy["iou"].mean() < 1


def test_map_scores_rejects_mismatched_counts():
    with pytest.raises(ValueError, match="2 maps but 1 masks"):
        map_scores(np.zeros((2, 2, 2)), np.zeros((1, 4, 4)))


def test_centre_prior_is_a_centred_bump():
    prior = centre_prior(8, 8, sigma=0.25)
    assert prior.shape == (8, 8) and prior.dtype == np.float32
    np.testing.assert_allclose(prior, prior[::-1], rtol=1e-6)
    np.testing.assert_allclose(prior, prior.T, rtol=1e-6)
    # cell (3, 3) has its centre at 3.5/8 = 1/16 before the middle on each axis
    np.testing.assert_allclose(prior[3, 3], np.exp(-(2 * (1 / 16) ** 2) / (2 * 0.25**2)), rtol=1e-6)
    centred = np.zeros((16, 16), dtype=bool)
    centred[5:11, 5:11] = True
    scores = map_scores(prior[None], centred[None])
    assert scores["pointing"][0] and scores["iou"][0] > 0.3
