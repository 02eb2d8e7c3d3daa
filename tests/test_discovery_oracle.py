"""`oracle`: ground-truth masks area-averaged onto the grid, exactly."""
import math

import numpy as np
import pytest
import torch

from agmae import discovery
from agmae.data.demo import load_mask
from agmae.data.folder import scan
from agmae.discovery.oracle import area_average


def area_average_by_supersampling(mask, grid):
    """Reference: repeat every pixel to a common multiple of both sizes, then average whole blocks."""
    out = mask
    for axis, cells in enumerate(grid):
        n = mask.shape[axis]
        common = math.lcm(n, cells)
        out = np.repeat(out, common // n, axis=axis)
        shape = list(out.shape)
        shape[axis:axis + 1] = [cells, common // cells]
        out = out.reshape(shape).mean(axis=axis + 1)
    return out


@pytest.mark.parametrize("shape,grid", [((64, 64), (14, 14)), ((30, 50), (4, 7)), ((64, 64), (8, 8))])
def test_area_average_is_exact(shape, grid):
    mask = (np.random.default_rng(0).random(shape) > 0.5).astype(np.float64)
    np.testing.assert_allclose(area_average(torch.from_numpy(mask), grid).numpy(),
                               area_average_by_supersampling(mask, grid), atol=1e-12)


def test_oracle_maps_are_the_demo_masks_on_the_grid(demo_root):
    keys = scan(demo_root / "train").keys[:4]
    d = discovery.build("oracle", masks=demo_root / "masks" / "train")
    maps = d(torch.zeros(4, 3, 224, 224), keys=keys)
    for got, key in zip(maps.numpy(), keys):
        cells = area_average_by_supersampling(load_mask(demo_root, "train", key).astype(np.float64), (14, 14))
        expected = (cells - cells.min()) / (cells.max() - cells.min())
        np.testing.assert_allclose(got, expected, atol=1e-6)
    assert d.grid(224) == (14, 14) and d.options["patch"] == 16


def test_oracle_missing_mask_gives_a_non_finite_map(demo_root, tmp_path):
    key = scan(demo_root / "train").keys[0]
    d = discovery.build("oracle", masks=demo_root / "masks" / "train", patch=8)
    maps = d(torch.zeros(2, 3, 64, 64), keys=[key, "no/such.png"])
    assert torch.isfinite(maps[0]).all() and torch.isnan(maps[1]).all()
    with pytest.raises(ValueError, match="does not exist"):
        discovery.build("oracle", masks=tmp_path / "missing")


def test_a_missing_mask_file_is_named_in_the_store(demo_root, tmp_path):
    import shutil

    from click.testing import CliRunner

    from agmae import store
    from agmae.cli.discover import main

    masks = tmp_path / "masks"
    shutil.copytree(demo_root / "masks" / "train", masks)
    key = scan(demo_root / "train").keys[5]
    (masks / key).unlink()
    out = tmp_path / "maps-oracle.h5"
    result = CliRunner().invoke(main, ["--method", "oracle", "--data", str(demo_root), "--masks", str(masks),
                                       "--out", str(out), "--image-size", "64", "--workers", "0", "--max-failures", "0.01"])
    assert result.exit_code == 0, result.output
    maps = store.open_maps(out)
    assert maps.counts()["failed"] == 1 and maps.errors[5] == f"missing mask file {masks / key}"


def test_an_out_under_a_regular_file_says_so(demo_root, tmp_path):
    from click.testing import CliRunner

    from agmae.cli.discover import main

    (tmp_path / "runs").write_text("a file")
    out = tmp_path / "runs" / "maps-oracle.h5"
    result = CliRunner().invoke(main, ["--method", "oracle", "--data", str(demo_root), "--out", str(out),
                                       "--image-size", "64", "--workers", "0"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1 and errors == [
        f"Error: {out}: its parent {tmp_path / 'runs'} is a file, not a directory; write to a path under a "
        "directory (--out)"], result.output
