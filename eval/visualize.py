"""What a trained MAE reconstructs and where its encoder looks: one row per image, as a PNG (agmae-eval visualize).

Columns of a row: COLUMNS_HELP below (it is also the --help of agmae-eval visualize).

The decoder predicts normalised pixels (each patch's values minus the patch's mean, over its standard deviation:
the MAE's target), which look like noise as they are (facebookresearch/mae#12). They are shown de-normalised per
patch: a visible patch with its own mean and variance, a masked patch with the mean of the visible patches' means
and variances, the statistics the MAE could know. Taking a masked patch's own statistics, as some published
figures do, would paint the hidden patch's brightness and contrast into the picture.

The images and the mask are drawn from `seed`, so a figure is a function of its checkpoints, data and seed.
`panels` computes the arrays, `draw` draws them into a matplotlib Figure or SubFigure (a panel of a larger
figure), `render` into a Figure of their own (Agg, no display needed), `figure` does it all and writes the PNG. The MAE of a checkpoint comes from a `load_mae(path)` the caller passes (agmae.train.model.load_mae: the
model is training's, and evaluation may not import training); the attention comes from the encoder as evaluation
loads it (agmae.eval.features.build_encoder).
"""
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch

from agmae.checkpoint import atomic_write
from agmae.data.folder import load_rgb, scan, split_folder
from agmae.data.transforms import IMAGENET_MEAN, IMAGENET_STD, discovery_transform
from agmae.errors import UserError
from agmae.eval.features import build_encoder
from agmae.options import POSITIVE_INT, device_option, option, seed_option, validate
from agmae.paths import last_checkpoint
from agmae.store import STATUS_DONE, open_maps

# The MAE's target normalisation (agmae.train.loss): (t - mean) / sqrt(var + NORM_PIX_EPS), var unbiased.
NORM_PIX_EPS = 1e-6
MASKED_GREY = 0.5
CELL_INCHES = 1.1
TITLE_WIDTH = 14  # characters per line of a column title, so that long run names wrap instead of overlapping
PICTURE, MAP, ATTENTION = "picture", "map", "attention"

COLUMNS_HELP = """One row per image of the split, drawn from --seed. Columns, left to right:

\b
- image: the image seen whole at the MAE's input size (resized, not cropped);
- map: for each --maps store, the image's map (0 black to 1 bright, on the store's grid);
- masked: the MAE's input, the masked patches grey;
- then for each --checkpoint, all under the same mask:
  - reconstruction: every patch as the decoder predicts it, de-normalised per patch (a visible patch with its own
    mean and variance, a masked patch with the mean of the visible patches' means and variances, what the MAE
    could know);
  - + visible: the reconstruction with the visible patches pasted back;
  - attention: the encoder's last-layer CLS attention over the patches of the whole image, mean over the heads,
    scaled to each image's range.
"""


@dataclass
class VisualizeOptions:
    checkpoints: tuple = option((), "agmae-train checkpoint whose MAE is shown (repeat the option to compare runs "
                                    "side by side). [default: RUN_DIR/checkpoint-last.pth]",
                                type=click.Path(exists=True, dir_okay=False), flags=("--checkpoint",), multiple=True,
                                show_default=False)
    names: tuple = option((), "Column label of each --checkpoint, in their order. [default: its folder's name]",
                          flags=("--name",), multiple=True, show_default=False)
    maps: tuple = option((), "Attention store of the shown split whose maps get a column (repeat the option).",
                         type=click.Path(exists=True, dir_okay=False), flags=("--maps",), multiple=True,
                         show_default=False)
    split: str | None = option(None, "Split whose images are shown. [default: --train-split, the one the MAE "
                                     "trained on and the maps were made of]", show_default=False)
    images: int = option(6, "Images shown, one row each.", type=POSITIVE_INT)
    mask_ratio: float = option(0.75, "Share of the patches masked.", type=click.FloatRange(0, 1, min_open=True,
                                                                                              max_open=True))
    seed: int = seed_option("Seed of the images shown and of the mask.")
    out: str | None = option(None, "PNG written. [default: RUN_DIR/visualize.png]", type=click.Path(dir_okay=False),
                             show_default=False)
    device: str = device_option()

    def __post_init__(self):
        validate(self)


@dataclass
class Column:
    """One column of the figure: its title, its kind (PICTURE, MAP or ATTENTION) and its cells, [rows, H, W, 3] in
    [0, 1] for pictures, [rows, h, w] for maps (in [0, 1], NaN where not done) and attention."""

    title: str
    kind: str
    cells: np.ndarray


@dataclass
class Panels:
    """A figure's arrays, before any plotting: the keys of the images shown (one row each) and the columns."""

    keys: list
    columns: list = field(default_factory=list)

    def column(self, title: str) -> np.ndarray:
        return next(column.cells for column in self.columns if column.title == title)


def choose_rows(count: int, n: int, seed: int) -> np.ndarray:
    """n distinct dataset indices out of count, drawn from seed, in dataset order."""
    return np.sort(np.random.default_rng(seed).choice(count, size=min(n, count), replace=False))


def mask_noise(rows: int, num_patches: int, seed: int) -> torch.Tensor:
    """The masking noise [rows, L] of `seed`: the MAE keeps the patches of smallest noise visible."""
    return torch.rand(rows, num_patches, generator=torch.Generator().manual_seed(seed))


def patch_statistics(patches: torch.Tensor) -> tuple:
    """Mean and unbiased variance over each patch's values: patches [B, L, P] -> ([B, L, 1], [B, L, 1])."""
    return patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)


def denormalise(pred: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised-pixel predictions back to pixels. pred, patches (the input's): [B, L, P]; mask [B, L], 1 = masked.

    A visible patch takes its own mean and variance, a masked patch the mean over the image's visible patches of
    their means and variances."""
    mean, var = patch_statistics(patches)
    visible = (1 - mask)[..., None]
    count = visible.sum(1, keepdim=True).clamp(min=1)
    hidden_mean = (mean * visible).sum(1, keepdim=True) / count
    hidden_var = (var * visible).sum(1, keepdim=True) / count
    masked = mask[..., None].bool()
    mean, var = torch.where(masked, hidden_mean, mean), torch.where(masked, hidden_var, var)
    return pred * (var + NORM_PIX_EPS) ** 0.5 + mean


@torch.no_grad()
def reconstruct(mae, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float, norm_pix: bool = True) -> dict:
    """imgs [B, 3, H, W] (normalised input) -> dict(mask [B, L] 1 = masked, reconstruction and pasted [B, 3, H, W]
    in the input's space); pasted holds the input itself on the visible patches."""
    pred, mask = mae(imgs, mask_ratio=mask_ratio, noise=noise)
    patches = mae.patchify(imgs)
    pred = denormalise(pred.float(), patches, mask) if norm_pix else pred.float()
    pasted = torch.where(mask[..., None].bool(), pred, patches)
    return dict(mask=mask, reconstruction=mae.unpatchify(pred), pasted=mae.unpatchify(pasted))


@torch.no_grad()
def cls_attention(encoder, imgs: torch.Tensor) -> torch.Tensor:
    """Last-layer attention of the CLS query over the patches of a timm VisionTransformer, mean over the heads:
    imgs [B, 3, H, W] -> [B, gh, gw]. The softmax runs over every token, as in the block."""
    attn = encoder.blocks[-1].attn
    taken = []
    hook = attn.qkv.register_forward_hook(lambda module, args, out: taken.append(out))
    try:
        encoder.forward_features(imgs)
    finally:
        hook.remove()
    qkv = taken[0]
    batch, tokens, _ = qkv.shape
    q, k, _ = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0]  # [B, heads, T]
    patches = weights[:, :, encoder.num_prefix_tokens:].mean(1)
    return patches.reshape(batch, *encoder.patch_embed.grid_size)


def to_pixels(imgs: torch.Tensor) -> np.ndarray:
    """Normalised images [B, 3, H, W] -> RGB [B, H, W, 3] in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (imgs.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def masked_view(pixels: np.ndarray, mask: torch.Tensor, patch: int) -> np.ndarray:
    """pixels [B, H, W, 3] with the masked patches (mask [B, L], row-major over the grid) grey."""
    batch, height, width, _ = pixels.shape
    cells = mask.reshape(batch, height // patch, width // patch).cpu().numpy().astype(bool)
    covered = cells.repeat(patch, axis=1).repeat(patch, axis=2)
    return np.where(covered[..., None], MASKED_GREY, pixels)


def _store_maps(path, index) -> np.ndarray:
    """The maps [N, h, w] of a store made on exactly the images of `index`, NaN where a map is not done."""
    store = open_maps(path)
    if store.attrs["keys_sha256"] != index.keys_sha256:
        raise UserError(f"{path}: its maps are of other images than {index.root}; pass the store discovered on "
                        f"this split, or show the split it was made on (--split)")
    maps = np.asarray(store.maps, dtype=np.float32).copy()
    maps[np.asarray(store.status) != STATUS_DONE] = np.nan
    return maps


def _checkpoint_name(path: Path) -> str:
    return path.parent.name or path.stem


def panels(checkpoints, root, load_mae, split: str = "train", n: int = 6, seed: int = 0, maps=(),
           mask_ratio: float = 0.75, names=None, device="cpu") -> Panels:
    """The arrays of the figure (module docstring) for `n` images of ROOT/<split>.

    checkpoints: agmae-train checkpoints of MAEs of one input and patch size; load_mae(path) -> their MAE
    (agmae.train.model.load_mae); maps: attention stores made on this split; names: one column label per
    checkpoint (default: each one's folder name)."""
    checkpoints = [Path(path) for path in checkpoints]
    names = list(names) if names else [_checkpoint_name(path) for path in checkpoints]
    if not checkpoints:
        raise UserError("no checkpoint to visualise; pass --checkpoint FILE (repeat it to compare runs)")
    if len(names) != len(checkpoints):
        raise UserError(f"{len(names)} names for {len(checkpoints)} checkpoints; pass one --name per --checkpoint")
    if not 0 < mask_ratio < 1:
        raise UserError(f"mask ratio {mask_ratio}: must lie strictly between 0 and 1")
    if n < 1:
        raise UserError(f"{n} images: show at least 1")
    index = scan(split_folder(root, split, "--split"))
    store_maps = [(Path(path), _store_maps(path, index)) for path in maps]  # checked before any model loads
    maes = [load_mae(path) for path in checkpoints]
    sizes = {(mae.encoder_kwargs["img_size"], mae.patch_size) for mae in maes}
    if len(sizes) > 1:
        raise UserError(f"the checkpoints differ in input or patch size ({sorted(sizes)}); one mask fits only MAEs "
                        f"of one patch grid")
    size, patch = sizes.pop()
    rows = choose_rows(len(index), n, seed)
    keys = [index.keys[i] for i in rows]
    transform = discovery_transform(size)
    imgs = torch.stack([transform(load_rgb(index.path(i))) for i in rows]).to(device)
    noise = mask_noise(len(rows), (size // patch) ** 2, seed).to(device)

    pixels = to_pixels(imgs)
    result = Panels(keys, [Column("image", PICTURE, pixels)])
    for path, all_maps in store_maps:
        result.columns.append(Column(f"map\n{path.stem.removeprefix('maps-')}", MAP, all_maps[rows]))
    masked_input = None
    for name, path, mae in zip(names, checkpoints, maes):
        out = reconstruct(mae.to(device), imgs, noise, mask_ratio)
        if masked_input is None:
            masked_input = masked_view(pixels, out["mask"], patch)
            result.columns.append(Column("masked", PICTURE, masked_input))
        encoder, _ = build_encoder(path)
        result.columns += [Column(f"{name}\nreconstruction", PICTURE, to_pixels(out["reconstruction"])),
                           Column(f"{name}\n+ visible", PICTURE, to_pixels(out["pasted"])),
                           Column(f"{name}\nattention", ATTENTION,
                                  cls_attention(encoder.to(device), imgs).cpu().numpy())]
    return result


def figure_size(result: Panels) -> tuple:
    """(width, height) in inches of the panels drawn at CELL_INCHES a cell, with room for the titles."""
    return len(result.columns) * CELL_INCHES, len(result.keys) * CELL_INCHES + 0.8


def draw(result: Panels, fig) -> None:
    """Draw the panels into a matplotlib Figure or SubFigure (e.g. one panel of a larger report): one row per
    image, one column per panel, titles on the first row."""
    axes = fig.subplots(len(result.keys), len(result.columns), squeeze=False,
                        gridspec_kw=dict(wspace=0.05, hspace=0.05))
    for c, column in enumerate(result.columns):
        axes[0, c].set_title("\n".join(textwrap.wrap(column.title, TITLE_WIDTH)), fontsize=7)
        for r, cell in enumerate(column.cells):
            ax = axes[r, c]
            ax.set_axis_off()
            if column.kind == PICTURE:
                ax.imshow(cell, interpolation="nearest")
            elif column.kind == MAP:
                ax.imshow(np.nan_to_num(cell), cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(cell, cmap="inferno", interpolation="nearest")


def render(result: Panels):
    """A matplotlib Figure of the panels alone, on an Agg canvas (no display needed)."""
    try:  # the demo extra: imported only where a figure is drawn
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise UserError("the figure is drawn with matplotlib, which is not installed: pip install 'agmae[demo]' "
                        "(or matplotlib)") from err

    width, height = figure_size(result)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    draw(result, fig)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / height)
    return fig


def rendered_array(fig) -> np.ndarray:
    """The figure's pixels as drawn by Agg: uint8 [H, W, 4]."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


def figure(checkpoints, root, load_mae, out=None, **options):
    """`render(panels(checkpoints, root, load_mae, **options))`, written to the PNG `out` (atomically) when given;
    returns the matplotlib Figure."""
    fig = render(panels(checkpoints, root, load_mae, **options))
    if out is not None:
        atomic_write(out, lambda f: fig.savefig(f, format="png"))
    return fig


def write(opts: VisualizeOptions, root, load_mae, run_dir, default_split: str = "train", device="cpu") -> Path:
    """The PNG of `opts` (agmae-eval visualize): checkpoints default to RUN_DIR/checkpoint-last.pth, the split to
    `default_split`, the file to RUN_DIR/visualize.png. Returns the file written."""
    checkpoints = opts.checkpoints or [last_checkpoint(run_dir)]
    for path in checkpoints:
        if not Path(path).is_file():
            raise UserError(f"checkpoint {path} does not exist; train one with agmae-train or pass --checkpoint FILE")
    out = Path(opts.out or Path(run_dir) / "visualize.png")
    figure(checkpoints, root, load_mae, out=out, split=opts.split or default_split, n=opts.images, seed=opts.seed,
           maps=opts.maps, mask_ratio=opts.mask_ratio, names=opts.names, device=device)
    return out
