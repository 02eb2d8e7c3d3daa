"""agmae-eval visualize: reconstructions pasted with the visible patches, de-normalised per patch, last-layer CLS
attention, a figure that is a function of its seed, and bad input refused in one line."""
import hashlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from agmae import store
from agmae.cli.eval import main
from agmae.data.folder import scan
from agmae.eval import visualize
from agmae.eval.features import build_encoder
from agmae.eval.visualize import VisualizeOptions
from agmae.train.model import create_model, load_mae

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_MAE = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                decoder_num_heads=2)


def save_mae(path, seed: int):
    """An agmae-train-like checkpoint of a tiny random MAE (8-px patches on 32 px: a 4 x 4 grid)."""
    torch.manual_seed(seed)
    mae = create_model("mae_vit_demo_patch8", **TINY_MAE)
    config = dict(model="mae_vit_demo_patch8", input_size=32, patch_size=None, encoder=mae.encoder_kwargs,
                  **{k: v for k, v in TINY_MAE.items() if k != "img_size"})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": mae.state_dict(), "config": config}, path)
    return path


@pytest.fixture
def checkpoints(tmp_path):
    return [save_mae(tmp_path / name / "checkpoint-last.pth", seed) for seed, name in enumerate(("vanilla", "guided"))]


def visible_pixels(mask_row: np.ndarray, patch: int = 8) -> np.ndarray:
    """bool [H, W]: the pixels of the visible patches of one image (mask_row [L], 1 = masked)."""
    side = int(len(mask_row) ** 0.5)
    return ~np.kron(mask_row.reshape(side, side).astype(bool), np.ones((patch, patch), bool))


def test_denormalise_uses_own_statistics_when_visible_and_the_visible_mean_when_masked():
    patches = torch.tensor([[[0.0, 0.0, 2.0, 2.0], [2.0, 4.0, 2.0, 4.0], [9.0, 9.0, 9.0, 5.0]]])
    mask = torch.tensor([[0.0, 0.0, 1.0]])
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    pred = (patches - mean) / (var + 1e-6) ** 0.5  # a decoder that predicts the normalised target exactly
    pred[0, 2] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    out = visualize.denormalise(pred, patches, mask)
    assert torch.allclose(out[0, :2], patches[0, :2], atol=1e-5)
    # the visible patches' means are 1 and 3 and both variances 4/3: the masked patch gets mean 2, variance 4/3
    spread = (4 / 3 + 1e-6) ** 0.5
    assert torch.allclose(out[0, 2], torch.tensor([2 + spread, 2 - spread, 2 + spread, 2 - spread]))


def test_pasted_reconstruction_is_the_input_on_visible_patches(checkpoints, demo_root):
    torch.manual_seed(0)
    imgs = torch.randn(3, 3, 32, 32)
    mae = load_mae(checkpoints[0])
    out = visualize.reconstruct(mae, imgs, visualize.mask_noise(3, 16, seed=0), mask_ratio=0.75)
    assert out["mask"].sum(1).tolist() == [12.0, 12.0, 12.0]
    keep = torch.from_numpy(np.stack([visible_pixels(m) for m in out["mask"].numpy()]))[:, None].expand_as(imgs)
    assert torch.equal(out["pasted"][keep], imgs[keep])
    assert torch.equal(out["pasted"][~keep], out["reconstruction"][~keep])
    assert not torch.equal(out["reconstruction"][keep], imgs[keep])

    panels = visualize.panels(checkpoints, demo_root, load_mae, split="original", n=4, seed=3)
    image, masked = panels.column("image"), panels.column("masked")
    for name in ("vanilla", "guided"):
        pasted = panels.column(f"{name}\n+ visible")
        for row in range(4):
            hidden = np.all(masked[row] == visualize.MASKED_GREY, axis=-1)
            assert hidden.mean() == 0.75  # 12 of 16 patches, the same for both checkpoints
            assert np.array_equal(pasted[row][~hidden], image[row][~hidden])


def test_cls_attention_is_the_last_blocks_softmax_row_of_the_class_token(checkpoints):
    encoder, _ = build_encoder(checkpoints[0])
    imgs = torch.randn(2, 3, 32, 32)
    attn = encoder.blocks[-1].attn
    attn.fused_attn = False  # timm's explicit path, whose softmax output attn_drop receives
    taken = []
    hook = attn.attn_drop.register_forward_hook(lambda module, args, out: taken.append(out))
    ours = visualize.cls_attention(encoder, imgs)
    hook.remove()
    reference = taken[-1][:, :, 0, 1:].mean(1).reshape(2, 4, 4)
    assert ours.shape == (2, 4, 4) and torch.allclose(ours, reference, atol=1e-6)


def test_figure_is_a_function_of_its_seed(checkpoints, demo_root):
    def arrays(seed):
        panels = visualize.panels(checkpoints, demo_root, load_mae, split="original", n=3, seed=seed)
        return panels, [column.cells for column in panels.columns]

    first, first_cells = arrays(5)
    again, again_cells = arrays(5)
    other, _ = arrays(6)
    assert [c.title for c in first.columns] == ["image", "masked", "vanilla\nreconstruction", "vanilla\n+ visible",
                                                "vanilla\nattention", "guided\nreconstruction", "guided\n+ visible",
                                                "guided\nattention"]
    assert first.keys == again.keys and all(np.array_equal(a, b) for a, b in zip(first_cells, again_cells))
    assert other.keys != first.keys
    assert np.array_equal(visualize.rendered_array(visualize.render(first)),
                          visualize.rendered_array(visualize.render(again)))
    # the images and the mask come from the seed alone: pinned
    digest = hashlib.sha256("\n".join(first.keys).encode())
    digest.update(np.all(first.column("masked") == visualize.MASKED_GREY, axis=-1).tobytes())
    assert digest.hexdigest()[:16] == "78bb6e24baa28f25"


def test_maps_column_and_the_command_writes_a_png(checkpoints, demo_root, tmp_path):
    index = scan(demo_root / "train")
    maps = np.random.default_rng(0).random((len(index), 4, 4)).astype(np.float32)
    path = tmp_path / "maps-oracle.h5"
    with store.create(path, index.keys, (4, 4), method="oracle", backbone=None, weights_sha256=None, image_size=32,
                      method_options={}) as writer:
        writer.write(0, maps, np.full(len(index), store.STATUS_DONE, np.uint8), [""] * len(index))
    panels = visualize.panels(checkpoints[:1], demo_root, load_mae, n=2, seed=1, maps=[path])
    rows = [index.keys.index(key) for key in panels.keys]
    assert np.array_equal(panels.column("map\noracle"), maps[rows].astype(np.float16).astype(np.float32))

    out = tmp_path / "figure.png"
    args = ["visualize", "--data", str(demo_root), "--images", "2", "--maps", str(path), "--out", str(out)]
    for checkpoint, name in zip(checkpoints, ("vanilla", "guided")):
        args += ["--checkpoint", str(checkpoint), "--name", name]
    result = CliRunner().invoke(main, args + ["--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figure: {out}" in result.output


def test_bad_input_is_refused_in_one_line(checkpoints, demo_root, tmp_path):
    encoder_only = tmp_path / "encoder.pth"
    torch.save({"model": torch.load(checkpoints[0], weights_only=True)["model"]}, encoder_only)
    other_images = tmp_path / "maps-other.h5"
    keys = scan(demo_root / "original").keys
    with store.create(other_images, keys, (4, 4), method="oracle", backbone=None, weights_sha256=None, image_size=32,
                      method_options={}) as writer:
        writer.write(0, np.zeros((len(keys), 4, 4), np.float32), np.ones(len(keys), np.uint8), [""] * len(keys))
    cases = [(["--checkpoint", str(encoder_only)], "records no MAE"),
             (["--checkpoint", str(checkpoints[0]), "--name", "a", "--name", "b"], "2 names for 1 checkpoints"),
             (["--checkpoint", str(checkpoints[0]), "--maps", str(other_images)], "its maps are of other images"),
             (["--checkpoint", str(checkpoints[0]), "--split", "val"], "no split folder 'val'"),
             (["--checkpoint", str(checkpoints[0]), "--images", "0"], "Invalid value for '--images'"),
             (["--checkpoint", str(checkpoints[0]), "--mask-ratio", "1"], "Invalid value for '--mask-ratio'")]
    for args, message in cases:
        result = CliRunner().invoke(main, ["visualize", "--data", str(demo_root), "--out", str(tmp_path / "x.png"),
                                           *args])
        lines = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code != 0 and len(lines) == 1 and message in lines[0], (args, result.output)
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="--mask-ratio 0"):
        VisualizeOptions(mask_ratio=0)
