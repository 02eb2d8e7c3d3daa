"""The figures: the demo's report.png (each guided run's difference to vanilla with its standard error, the
absolute table beside it, the map quality and the maps themselves) and the study's differences over seeds."""
from pathlib import Path

import numpy as np

from agmae.data.folder import load_rgb, scan
from agmae.store import open_maps

from experiments.results import LABELS


def _pyplot():
    import matplotlib  # the demo extra: imported only where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def demo_report(out: Path, title: str, columns: dict, table: dict, gains: dict, errors: dict, headline: str,
                quality: dict, stores: dict, root: Path | None, runs_figure: Path | None = None) -> Path:
    """report.png. Top: each guided run's difference to vanilla on the `headline` field ({run: gain}) with ± one
    standard error of the test sampling (`errors`), the runs' absolute numbers ({run: RunResults}, the fields of
    `columns`: {field: header}) as a table beside it, and the map quality ({source: mean IoU %}). Below: demo
    training images with each store's maps ({source: store}), then `runs_figure` (agmae-eval visualize's PNG of the
    runs' reconstructions and attention under one mask) when given."""
    plt = _pyplot()
    picture = plt.imread(runs_figure) if runs_figure is not None else None
    picture_height = 14 * picture.shape[0] / picture.shape[1] if picture is not None else 0.0
    heights = [2.5] + [1] * len(stores) + ([picture_height / 1.6] if picture is not None else [])
    fig = plt.figure(figsize=(14, 4 + 1.6 * len(stores) + picture_height))
    grid = fig.add_gridspec(len(heights), 8, height_ratios=heights, hspace=0.35)

    top = grid[0, :].subgridspec(1, 14)  # columns 0, 4-5 and 11 left free for the panels' and the table's labels
    gain_panel(fig.add_subplot(top[0, 1:4]), gains, errors, headline)
    table_ax = fig.add_subplot(top[0, 6:11])
    table_ax.set_axis_off()
    cells = [[_number(getattr(row, field)) for field in columns] for row in table.values()]
    drawn = table_ax.table(cellText=cells, rowLabels=list(table), colLabels=[header.replace(" ", "\n", 1)
                                                                            for header in columns.values()],
                           loc="center")
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(8)
    drawn.scale(1.0, 1.6)
    table_ax.set_title(title, fontsize=9)

    quality_ax = fig.add_subplot(top[0, 12:])
    quality_ax.barh(list(quality), list(quality.values()))
    quality_ax.set_title("map mean IoU vs masks (%)", fontsize=9)
    quality_ax.tick_params(labelsize=8)

    index = scan(root / "train") if stores else None
    shown = np.linspace(0, len(index) - 1, 8).astype(int) if stores else []
    for row, (source, store_path) in enumerate(stores.items(), start=1):
        store = open_maps(store_path)
        for col, i in enumerate(shown):
            ax = fig.add_subplot(grid[row, col])
            image = np.asarray(load_rgb(index.path(i)))
            ax.imshow(image)
            ax.imshow(np.asarray(store.maps[i], dtype=np.float32), cmap="jet", alpha=0.45,
                      extent=(0, image.shape[1], image.shape[0], 0), interpolation="bilinear")
            ax.set_axis_off()
            if col == 0:
                ax.set_title(f"{source} maps", fontsize=8, loc="left")
    if picture is not None:
        ax = fig.add_subplot(grid[-1, :])
        ax.imshow(picture)
        ax.set_axis_off()
        ax.set_title("reconstructions and attention of the runs under one mask (agmae-eval visualize)", fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return out


def gain_panel(ax, gains: dict, errors: dict, headline: str) -> None:
    """Horizontal bars of each guided run's difference to vanilla on `headline` ({run: gain}), with error bars of
    ± one standard error (`errors`, {run: standard error})."""
    names = [name for name in gains if gains[name] is not None]
    positions = np.arange(len(names))
    ax.barh(positions, [gains[name] for name in names], xerr=[errors.get(name, 0.0) for name in names], capsize=4,
            color=["tab:green" if gains[name] > 0 else "tab:red" for name in names])
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(positions, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"guided − vanilla, points\n{LABELS[headline]} (± one standard error)", fontsize=8)
    for position, name in zip(positions, names):
        ax.annotate(f"{gains[name]:+.2f}", (gains[name], position), xytext=(0, 8), textcoords="offset points",
                    ha="center", fontsize=8)


def _number(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def differences_panel(ax, summary: dict, field: str) -> list:
    """Each guided row's difference to vanilla over seeds on `field` (the study's results.json `summary`): its mean
    and 95 % t interval, with the per-seed differences as ticks; returns the rows drawn."""
    rows = [row for row in summary["rows"] if row.get("paired", {}).get(field)]
    for position, row in enumerate(rows):
        result = row["paired"][field]
        ax.plot(result["ci95"], [position, position], color="tab:blue", linewidth=2)
        ax.plot([result["mean"]], [position], "o", color="tab:blue")
        ax.plot(list(result["per_seed"].values()), [position] * result["n"], "|", color="gray", markersize=10)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [row["name"] for row in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"guided − vanilla, points: {LABELS[field]} (mean, 95 % t interval, seeds as ticks)", fontsize=8)
    ax.set_title(f"recipe {summary['plan']['recipe']}", fontsize=9)
    return rows


def study_differences(summary: dict, field: str, out: Path) -> Path | None:
    """differences_panel as a PNG at `out`; None (and no file) while no row is paired on `field`."""
    if not any(row.get("paired", {}).get(field) for row in summary["rows"]):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(summary["rows"])))
    differences_panel(ax, summary, field)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
