import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skimage_data
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from agmae.data.folder import EXIF_ORIENTATION, UnreadableImageError, load_rgb

from agmae.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JointRandomResizedCrop,
    NormalisedTensor,
    crop_maps,
    discovery_transform,
    eval_transform,
    normalise_images,
)

MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]

# (image width, height), map grid (h, w), output grid (gh, gw), crop size S
CASES = [
    ((96, 96), (14, 14), (8, 8), 64),
    ((140, 84), (7, 7), (16, 16), 64),
    ((80, 120), (12, 8), (7, 7), 56),
    ((100, 100), (7, 7), (14, 14), 56),
    ((126, 70), (7, 14), (6, 10), 48),
]


def case_id(case):
    (width, height), (h, w), (gh, gw), size = case
    return f"{width}x{height}-map{h}x{w}-grid{gh}x{gw}-S{size}"


def smooth_brightness(width, height):
    """[H, W] in [0, 1]: a few features larger than a map cell, so a map is a fair summary of it."""
    y, x = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    blob = np.exp(-((x - 0.3) ** 2 + (y - 0.65) ** 2) / 0.08)
    return np.clip(0.15 + 0.45 * x * y + 0.25 * np.sin(4 * x + 2 * y) ** 2 + 0.35 * blob, 0, 1)


def grey_image(brightness):
    return Image.fromarray(np.repeat(np.rint(brightness * 255).astype(np.uint8)[:, :, None], 3, axis=2))


def area_map(brightness, hw):
    """The image's own down-sampled brightness: [h, w] area averages."""
    return F.adaptive_avg_pool2d(torch.as_tensor(brightness, dtype=torch.float32)[None, None], hw)[0, 0]


def crop_brightness(img_tensor, grid):
    """Brightness of a transformed (normalised) crop, down-sampled to the grid: [gh, gw]."""
    return F.adaptive_avg_pool2d((img_tensor * STD + MEAN).mean(0)[None, None], grid)[0, 0]


def correlation(a, b):
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def naive_pixel_slice(maps, img_size, box, flip, grid):
    """The known mistake: the image's pixel offsets used as map indices."""
    width, height = img_size
    left, top = int(round(float(box[0]) * width)), int(round(float(box[1]) * height))
    right, bottom = int(round(float(box[2]) * width)), int(round(float(box[3]) * height))
    top, left = min(top, maps.shape[1] - 1), min(left, maps.shape[2] - 1)
    cut = maps[:, top:bottom, left:right]
    cut = F.interpolate(cut[None], size=grid, mode="bilinear", align_corners=False)[0]
    return cut.flip(-1) if flip else cut


def draws(case, n, seed):
    (width, height), map_hw, grid, size = case
    brightness = smooth_brightness(width, height)
    img, amap = grey_image(brightness), area_map(brightness, map_hw)
    joint = JointRandomResizedCrop(size)
    torch.manual_seed(seed)
    for _ in range(n):
        out, box, flip = joint(img)
        yield amap, out, box, flip


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cropped_map_lines_up_with_the_cropped_image(case):
    grid = case[2]
    correlations, naive_correlations, flips = [], [], []
    for amap, out, box, flip in draws(case, 40, seed=0):
        cropped = crop_maps(amap[None], box[None], torch.tensor([flip]), grid)[0]
        target = crop_brightness(out, grid)
        correlations.append(correlation(cropped, target))
        naive_correlations.append(correlation(naive_pixel_slice(amap[None], case[0], box, flip, grid)[0], target))
        flips.append(flip)
    assert min(correlations) > 0.95, sorted(correlations)[:5]
    assert 5 <= sum(flips) <= 35
    # The test is sensitive: slicing the map with pixel offsets fails it for most draws.
    assert np.mean(np.nan_to_num(naive_correlations) > 0.95) < 0.5


def step_position(profile):
    """Where a monotone step profile [n] crosses 0.5, in units of elements (0 = left edge)."""
    profile = np.asarray(profile, dtype=np.float64)
    k = int(np.flatnonzero(np.diff(np.sign(profile - 0.5)) != 0)[0])
    return k + 0.5 + (profile[k] - 0.5) / (profile[k] - profile[k + 1])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sharp_step_lands_where_the_image_step_lands(case):
    (width, height), (h, w), grid, size = case
    step_cell = 3 * w // 7  # a cell boundary of the map, at the same relative place in the image
    step_x = step_cell / w
    brightness = np.zeros((height, width))
    brightness[:, : round(step_x * width)] = 1.0
    img = grey_image(brightness)
    amap = torch.zeros(h, w)
    amap[:, :step_cell] = 1.0
    joint = JointRandomResizedCrop(size)
    torch.manual_seed(1)
    crossings = 0
    for _ in range(60):
        out, box, flip = joint(img)
        cropped = crop_maps(amap[None], box[None], torch.tensor([flip]), grid)[0]
        unflipped = crop_maps(amap[None], box[None], torch.tensor([not flip]), grid)[0]
        image_profile = (out * STD + MEAN).mean(0).mean(0)  # [S], per column
        map_profile = cropped.mean(0)  # [gw]
        x0, x1 = float(box[0]), float(box[2])
        margin = (x1 - x0) / grid[1]
        if x0 + margin < step_x < x1 - margin:
            crossings += 1
            at_image = step_position(image_profile) * grid[1] / size
            assert abs(step_position(map_profile) - at_image) <= 1.0
            assert (image_profile[0] > 0.5) == (map_profile[0] > 0.5)  # bright on the same side
            assert (unflipped.mean(0)[0] > 0.5) != (map_profile[0] > 0.5)  # ignoring the flip would fail
        elif step_x <= x0 - 0.5 / w or step_x >= x1 + 0.5 / w:  # beyond the bilinear reach of the step
            assert torch.allclose(cropped, torch.full_like(cropped, 1.0 if step_x >= x1 else 0.0))
    assert crossings >= 15


@pytest.mark.parametrize("map_hw, grid", [((14, 14), (8, 8)), ((7, 5), (16, 12)), ((6, 9), (6, 9))])
def test_box_maps_exactly_onto_relative_coordinates(map_hw, grid):
    """A map holding each cell centre's relative x (or y) is linear, so bilinear sampling reproduces the
    relative coordinate of every output cell centre exactly (clamped to the outermost centres)."""
    h, w = map_hw
    ramp_x = ((torch.arange(w) + 0.5) / w).expand(h, w)
    ramp_y = ((torch.arange(h) + 0.5) / h)[:, None].expand(h, w)
    torch.manual_seed(2)
    n = 32
    x0, y0 = torch.rand(n) * 0.6, torch.rand(n) * 0.6
    boxes = torch.stack([x0, y0, x0 + 0.1 + torch.rand(n) * 0.3, y0 + 0.1 + torch.rand(n) * 0.3], 1)
    flips = torch.rand(n) < 0.5
    out_x = crop_maps(ramp_x.expand(n, h, w), boxes, flips, grid)
    out_y = crop_maps(ramp_y.expand(n, h, w), boxes, flips, grid)
    centres_x = (torch.arange(grid[1]) + 0.5) / grid[1]
    centres_y = (torch.arange(grid[0]) + 0.5) / grid[0]
    for b in range(n):
        x0, y0, x1, y1 = boxes[b]
        rel_x = x0 + (x1 - x0) * (centres_x.flip(0) if flips[b] else centres_x)
        rel_y = y0 + (y1 - y0) * centres_y
        expect_x = rel_x.clamp(0.5 / w, 1 - 0.5 / w).expand(grid)
        expect_y = rel_y.clamp(0.5 / h, 1 - 0.5 / h)[:, None].expand(grid)
        torch.testing.assert_close(out_x[b], expect_x, atol=1e-5, rtol=0)
        torch.testing.assert_close(out_y[b], expect_y, atol=1e-5, rtol=0)
        # Sensitivity: rounding the box to whole map cells (a subtler slicing mistake) misses.
        rounded = torch.tensor([round(float(x0) * w), round(float(x1) * w)]) / w
        if abs(rounded[0] - x0) > 0.02 or abs(rounded[1] - x1) > 0.02:
            coarse = rounded[0] + (rounded[1] - rounded[0]) * (centres_x.flip(0) if flips[b] else centres_x)
            assert (coarse.clamp(0.5 / w, 1 - 0.5 / w) - expect_x[0]).abs().max() > 1e-3


def test_crop_maps_is_batched_and_accepts_float16():
    torch.manual_seed(3)
    maps = torch.rand(5, 7, 9).half()
    boxes = torch.tensor(
        [[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.5, 0.9], [0.3, 0.0, 1.0, 0.4], [0, 0, 0.5, 0.5], [0.2, 0.2, 0.8, 0.8]]
    )
    flips = torch.tensor([False, True, False, True, True])
    batched = crop_maps(maps, boxes, flips, (4, 6))
    assert batched.shape == (5, 4, 6) and batched.dtype == torch.float32
    for b in range(5):
        alone = crop_maps(maps[b : b + 1], boxes[b : b + 1], flips[b : b + 1], (4, 6))[0]
        torch.testing.assert_close(batched[b], alone)
    # The whole box, unflipped, at the map's own resolution is the identity.
    torch.testing.assert_close(crop_maps(maps[:1], boxes[:1], flips[:1], (7, 9))[0], maps[0].float())
    whole_flipped = crop_maps(maps[:1], boxes[:1], torch.tensor([True]), (7, 9))[0]
    torch.testing.assert_close(whole_flipped, maps[0].float().flip(-1))


def test_joint_crop_reports_the_box_and_flip_it_applied():
    rng = np.random.default_rng(4)
    img = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    joint = JointRandomResizedCrop(40)
    torch.manual_seed(5)
    areas = []
    for _ in range(25):
        out, box, flip = joint(img)
        assert out.shape == (3, 40, 40) and box.shape == (4,) and isinstance(flip, bool)
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
        left, top = round(float(box[0]) * 130), round(float(box[1]) * 90)
        crop_w, crop_h = round(float(box[2]) * 130) - left, round(float(box[3]) * 90) - top
        areas.append(crop_w * crop_h / (130 * 90))
        redo = TF.resized_crop(img, top, left, crop_h, crop_w, [40, 40], TF.InterpolationMode.BICUBIC)
        redo = TF.hflip(redo) if flip else redo
        torch.testing.assert_close(out, (TF.to_tensor(redo) - MEAN) / STD)
    assert 0.2 - 1e-6 <= min(areas) and max(areas) <= 1.0


def test_eval_transform_resizes_then_centre_crops():
    img = Image.new("RGB", (400, 300), (0, 0, 255))
    img.paste((255, 0, 0), (180, 130, 220, 170))  # a red square at the centre
    out = eval_transform(224)(img)
    assert out.shape == (3, 224, 224)
    # shorter side 300 -> 256, so 400 -> 341; the centre crop keeps the middle 224 of 341 x 256
    assert out[0, 112, 112] > out[2, 112, 112]
    centre_red = (out[0] * STD[0] + MEAN[0] > 0.5) & (out[2] * STD[2] + MEAN[2] < 0.5)
    red_cols = torch.nonzero(centre_red.any(0)).flatten()
    half = 40 * 256 / 300 / 2
    assert abs(int(red_cols.min()) - (112 - half)) <= 1 and abs(int(red_cols.max()) + 1 - (112 + half)) <= 1
    torch.testing.assert_close(out[:, 0, 0], (torch.tensor([0.0, 0.0, 1.0]) - MEAN[:, 0, 0]) / STD[:, 0, 0])


def test_discovery_transform_keeps_the_whole_image_without_aspect():
    img = Image.new("RGB", (120, 30), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 60, 30))  # left half white
    out = discovery_transform(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(img)
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out[:, :, :14], torch.ones(3, 32, 14))
    torch.testing.assert_close(out[:, :, 18:], -torch.ones(3, 32, 14))
    default = discovery_transform(32)(img)
    torch.testing.assert_close(default[:, 0, 0], (1 - MEAN[:, 0, 0]) / STD[:, 0, 0])


@pytest.mark.parametrize("hw", [(64, 64), (37, 91)])
def test_normalised_tensor_is_bit_identical_to_torchvision_to_tensor_then_normalize(hw):
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    pixels[0, 0], pixels[-1, -1] = 0, 255
    img = Image.fromarray(pixels, "RGB")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = T.Compose([T.ToTensor(), T.Normalize(mean, std)])(img)
    assert NormalisedTensor(mean, std)(img).shape == (3, *hw)
    assert torch.equal(NormalisedTensor(mean, std)(img), expected)


def official_mae_transform(size):
    """The official MAE's pre-training transform (main_pretrain.py)."""
    return T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def photo_file(tmp_path, name, size, **save):
    """scikit-image's cat photograph at `size` (width, height), saved as `name`."""
    path = tmp_path / name
    Image.fromarray(skimage_data.chelsea()).resize(size, Image.Resampling.BICUBIC).save(path, **save)
    return path


def official_crops(joint, official, path, seeds):
    """(agmae's uint8 crops, their boxes and flips, the official transform's outputs) of `path` for each seed."""
    crops, draws, expected = [], [], []
    for seed in seeds:
        torch.manual_seed(seed)
        crop, box, flip = joint.crop_file(path)
        assert crop.dtype == torch.uint8 and crop.shape == (3, joint.size, joint.size)
        crops.append(crop)
        draws.append((box, flip))
        torch.manual_seed(seed)
        expected.append(official(Image.open(path).convert("RGB")))
    return torch.stack(crops), draws, torch.stack(expected)


def test_png_crops_normalised_on_the_device_are_the_official_mae_input_bit_for_bit(tmp_path):
    """Every image but an RGB/grey JPEG (a PNG here, as the demo's): the uint8 crop, normalised by
    normalise_images, equals torchvision's RandomResizedCrop + flip + ToTensor + Normalize under one seed."""
    path = photo_file(tmp_path, "cat.png", (140, 84))
    crops, _, expected = official_crops(JointRandomResizedCrop(48), official_mae_transform(48), path, range(12))
    assert torch.equal(normalise_images(crops), expected)


def test_jpeg_crops_take_the_official_draws_within_a_few_hundredths_of_a_grey_level(tmp_path):
    """A JPEG whose crops allow no reduced decode (all under twice the output side): torch's uint8 bicubic
    instead of PIL's, same boxes and flips; mean absolute difference 0.04 grey levels (0-255), at most 4 on a
    pixel, the largest on crops smaller than the output (upscaled)."""
    width, height, size = 120, 90, 64
    path, joint = photo_file(tmp_path, "cat.jpg", (width, height), quality=90), JointRandomResizedCrop(size)
    official = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(), T.PILToTensor()])
    crops, draws, expected = official_crops(joint, official, path, range(40))
    crop_params = T.RandomResizedCrop(size, scale=(0.2, 1.0))
    for seed, (box, flip) in zip(range(40), draws):
        torch.manual_seed(seed)
        top, left, h, w = crop_params.get_params(Image.open(path), crop_params.scale, crop_params.ratio)
        assert torch.equal(box, torch.tensor([left / width, top / height, (left + w) / width, (top + h) / height]))
        assert flip == bool(torch.rand(1) < 0.5)
        assert joint.draft_scale(h, w) == 1
    difference = (crops.int() - expected.int()).abs()
    assert 0 < difference.float().mean() < 0.1 and difference.max() <= 4


def test_reduced_jpeg_decode_keeps_the_official_draws_and_differs_from_a_full_decode_by_a_grey_level_or_two(
        tmp_path):
    """Crops of at least twice the output side are decoded at 1/2, 1/4 or 1/8 scale: same box and flip as the
    official draws for the seed. Mean absolute difference from the full decode's crop, in 0-255 units, at 64 px
    from a 400x300 photograph: about 0.7 at 1/2 scale and 1.7 at 1/4 (0.43 at 1/2 for 224-px crops of a
    1000x750 one)."""
    width, height, size = 400, 300, 64
    path, joint = photo_file(tmp_path, "cat.jpg", (width, height), quality=90), JointRandomResizedCrop(size)
    crop_params = T.RandomResizedCrop(size, scale=(0.2, 1.0))
    differences = {2: [], 4: []}  # at 64 px every crop of a 400x300 image allows a reduced decode
    for seed in range(40):
        torch.manual_seed(seed)
        top, left, h, w = crop_params.get_params(Image.open(path), crop_params.scale, crop_params.ratio)
        flipped = bool(torch.rand(1) < 0.5)
        torch.manual_seed(seed)
        reduced, box, flip = joint.crop_file(path)
        torch.manual_seed(seed)
        full, full_box, full_flip = joint.crop_file(path, draft=False)
        assert torch.equal(box, torch.tensor([left / width, top / height, (left + w) / width, (top + h) / height]))
        assert flip == flipped == full_flip and torch.equal(box, full_box)
        differences[joint.draft_scale(h, w)].append((reduced.float() - full.float()).abs().mean().item())
    assert len(differences[2]) >= 5 and len(differences[4]) >= 5
    assert 0.3 < np.mean(differences[2]) < 1.0 and max(differences[2]) < 1.5
    assert 1.0 < np.mean(differences[4]) < 2.5 and max(differences[4]) < 3.0


def test_unreadable_and_rotated_files_take_the_full_decode_path(tmp_path):
    joint = JointRandomResizedCrop(32)
    truncated = photo_file(tmp_path, "cat.jpg", (200, 150), quality=90)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(UnreadableImageError, match="cat.jpg"):
        joint.crop_file(truncated)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # rotated 90 degrees: the image is 150 wide, 200 high as seen
    rotated = photo_file(tmp_path, "rotated.jpg", (200, 150), quality=90, exif=exif)
    torch.manual_seed(0)
    crop, box, flip = joint.crop_file(rotated)
    torch.manual_seed(0)
    expected, expected_box, expected_flip = joint(load_rgb(rotated))
    assert torch.equal(normalise_images(crop[None])[0], expected) and torch.equal(box, expected_box)
