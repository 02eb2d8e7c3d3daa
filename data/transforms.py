"""Image transforms, and the joint crop/flip that cuts the same region out of an image and its attention map.

The map covers the whole image (discovery sees the uncropped image), so a training crop
of the image must take the same box out of the map, in coordinates relative to the whole
image, at the map's own resolution. Slicing the map with the image's pixel offsets is the
classic mistake this module exists to avoid.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from agmae.data.folder import DECODE_ERRORS, EXIF_ORIENTATION, UnreadableImageError, as_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = T.InterpolationMode.BICUBIC
# MAE / DINO evaluation resize: shorter side S / 0.875 (256 for 224), then centre crop S.
EVAL_CROP_FRACTION = 0.875


class NormalisedTensor:
    """An 8-bit RGB PIL image as a normalised `[3, H, W]` float tensor: the same float operations as
    torchvision's `ToTensor()` then `Normalize(mean, std)`, hence bit-identical, without their per-image
    overhead, which weighs on small images such as the demo's."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        return pixels.float().div(255).sub_(self.mean).div_(self.std)

    def __repr__(self):
        return f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class JointRandomResizedCrop:
    """RandomResizedCrop (bicubic) + horizontal flip (p=0.5) that also reports what it did.

    `__call__(img: PIL.Image) -> (img: [3, S, S] normalised, box: [4], flip: bool)`; box is
    (x0, y0, x1, y1) of the crop relative to the whole image, in [0, 1]. Hand box and flip to
    `crop_maps` to cut the same region out of the image's attention map.

    `crop_file(path)` is the training loader's path: the same draws (box and flip) as
    torchvision's `RandomResizedCrop` + `RandomHorizontalFlip` from torch's global generator, a
    JPEG decoded at a reduced scale where the crop allows it (`draft_scale`) and resampled by torch's
    uint8 kernel (`resize_uint8`), and the crop returned as uint8, to be normalised on the device by
    `normalise_images`.
    """

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = int(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.to_tensor = NormalisedTensor(mean, std)

    def draw(self, width: int, height: int) -> tuple[int, int, int, int, bool]:
        """(top, left, crop_h, crop_w, flip) for a width x height image: torchvision's draws, in its order."""
        shape_only = torch.empty(0, height, width)  # get_params reads only the size
        top, left, crop_h, crop_w = T.RandomResizedCrop.get_params(shape_only, self.scale, self.ratio)
        return top, left, crop_h, crop_w, bool(torch.rand(1) < 0.5)

    def _box(self, width, height, top, left, crop_h, crop_w) -> torch.Tensor:
        return torch.tensor(
            [left / width, top / height, (left + crop_w) / width, (top + crop_h) / height], dtype=torch.float32
        )

    def _crop(self, img, top, left, crop_h, crop_w, flip):
        img = TF.resized_crop(img, top, left, crop_h, crop_w, [self.size, self.size], BICUBIC)
        return TF.hflip(img) if flip else img

    def __call__(self, img):
        width, height = img.size
        top, left, crop_h, crop_w, flip = self.draw(width, height)
        img = self._crop(img, top, left, crop_h, crop_w, flip)
        return self.to_tensor(img), self._box(width, height, top, left, crop_h, crop_w), flip

    def draft_scale(self, crop_h: int, crop_w: int) -> int:
        """The largest JPEG decoding reduction (1, 2, 4 or 8) at which the crop still has at least the output's
        pixels on each side, so its resampling stays a downscale."""
        return next((s for s in (8, 4, 2) if min(crop_h, crop_w) >= s * self.size), 1)

    def crop_file(self, path, draft: bool = True) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(uint8 [3, S, S] crop, box, flip) of the image file at `path`; raises UnreadableImageError.

        An RGB or grey JPEG without an EXIF rotation (ImageNet's images) takes the fast path: decoded at 1/2,
        1/4 or 1/8 scale by libjpeg's DCT scaling where the crop allows it (`draft_scale` > 1, with `draft`),
        the box resampled from that by PIL; otherwise decoded in full and the box resampled by `resize_uint8`.
        Those pixels differ from torchvision's by a fraction of a grey level on average
        (tests/test_transforms.py bounds it). Every other image (PNG, the demo's) is decoded in full
        (as `load_rgb` decodes it) and cropped as `__call__` does, to the same pixels as torchvision's.
        """
        try:
            with Image.open(path) as img:
                if img.format == "JPEG" and img.mode in ("RGB", "L") and \
                        img.getexif().get(EXIF_ORIENTATION, 1) == 1:
                    return self._crop_jpeg(img, draft)
                img.load()  # decoded in full, from the file already open (load_rgb's pixels)
                img = as_rgb(img)
        except DECODE_ERRORS as err:
            raise UnreadableImageError(f"cannot read image {path}: {err}") from err
        width, height = img.size
        top, left, crop_h, crop_w, flip = self.draw(width, height)
        return (uint8_tensor(self._crop(img, top, left, crop_h, crop_w, flip)),
                self._box(width, height, top, left, crop_h, crop_w), flip)

    def _crop_jpeg(self, img, draft: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """crop_file's fast path, for an open RGB or grey JPEG without an EXIF rotation, not yet decoded."""
        width, height = img.size
        top, left, crop_h, crop_w, flip = self.draw(width, height)
        scale = self.draft_scale(crop_h, crop_w) if draft else 1
        if scale == 1:
            img.load()
            out = resize_uint8(rgb(img.crop((left, top, left + crop_w, top + crop_h))), self.size)
        else:
            reduced = width / img.draft("RGB", (width // scale, height // scale))[1][2]
            img.load()
            box = (left / reduced, top / reduced, (left + crop_w) / reduced, (top + crop_h) / reduced)
            out = uint8_tensor(rgb(img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)))
        return (out.flip(-1) if flip else out), self._box(width, height, top, left, crop_h, crop_w), flip

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})"


def rgb(img):
    """An RGB or grey ("L") image as RGB, without a copy when it is RGB already."""
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_uint8(img, size: int) -> torch.Tensor:
    """An 8-bit RGB PIL image resized to size x size as a uint8 `[3, S, S]` tensor by torch's antialiased bicubic on
    uint8, a vectorised port of Pillow-SIMD's resampling (the same filter as PIL's, a = -0.5): within 2 grey levels
    of PIL's pixels, a few hundredths of one on average, at several times its speed. Its vectorised (AVX2) and
    generic kernels may round a pixel differently, so a crop can differ by a grey level between CPUs."""
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None]  # channels-last view
    return F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)[0].contiguous()


def uint8_tensor(img) -> torch.Tensor:
    """An 8-bit RGB PIL image as a contiguous uint8 `[3, H, W]` tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


def normalise_images(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 `[B, 3, H, W]` (on any device) -> float32 normalised: NormalisedTensor's operations in its order,
    so the same values bit for bit; run on the device, it keeps float work and 4x the bytes out of the loader."""
    mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return images.float().div(255).sub_(mean).div_(std)


def crop_maps(maps, boxes, flips, out_hw):
    """Cut each map's box (relative coordinates) and flip, resampled bilinearly onto an output grid.

    maps: [B, h, w] (any float dtype), boxes: [B, 4] (x0, y0, x1, y1) in [0, 1] of the whole
    map, flips: [B] bool, out_hw: (gh, gw). Returns [B, gh, gw] float32. Output cell centres
    sample the map at the same relative positions as the cropped image's pixel centres.
    """
    maps = torch.as_tensor(maps).float()
    boxes = torch.as_tensor(boxes, dtype=torch.float32, device=maps.device)
    flips = torch.as_tensor(flips, dtype=torch.bool, device=maps.device)
    batch = maps.shape[0]
    x0, y0, x1, y1 = boxes.unbind(1)
    # With align_corners=False, -1 and +1 are the outer edges of the first and last cells,
    # so relative coordinate r maps to 2r - 1 for the map and for the output grid alike.
    theta = torch.zeros(batch, 2, 3, dtype=torch.float32, device=maps.device)
    theta[:, 0, 0] = torch.where(flips, -(x1 - x0), x1 - x0)
    theta[:, 0, 2] = x0 + x1 - 1
    theta[:, 1, 1] = y1 - y0
    theta[:, 1, 2] = y0 + y1 - 1
    grid = F.affine_grid(theta, [batch, 1, int(out_hw[0]), int(out_hw[1])], align_corners=False)
    out = F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, 0]


def eval_transform(size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize the shorter side to int(size / 0.875) (bicubic), centre-crop size, normalise -> [3, S, S]."""
    resize = T.Resize(int(size / EVAL_CROP_FRACTION), interpolation=BICUBIC)
    return T.Compose([resize, T.CenterCrop(size), NormalisedTensor(mean, std)])


def discovery_transform(size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize the whole image to size x size (aspect not kept, nothing cropped), bicubic, normalise -> [3, S, S]."""
    return T.Compose([T.Resize((size, size), interpolation=BICUBIC), NormalisedTensor(mean, std)])
