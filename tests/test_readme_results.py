"""The README's headline table says what the study's results.json says: every number of every row, read back
from the JSON named above the table, at the precision the README prints."""
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The headline metric the table's first number column shows, as the study's results.json names it.
METRIC_COLUMNS = {"mean-pooled k-NN, `mixed-rand` (%)": "mixed_rand_knn_mean"}
NUMBER = re.compile(r"[+\-−]?\d+(?:\.\d+)?")


def number(text: str) -> float:
    return float(text.replace("−", "-"))


def headline(readme: str):
    """(results.json path, header cells, body rows as cell lists) of the first table after '## Result'."""
    section = readme.split("\n## Result\n", 1)[1].split("\n## ", 1)[0]
    source = re.search(r"\]\((docs/results/[\w./-]+/results\.json)\)", section).group(1)
    table = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    return REPO / source, cells[0], cells[2:]


def expected_cells(row: dict, metric: str, header: list) -> list:
    """The README cells a results.json row implies, each as the numbers it holds (None: left empty)."""
    summary = row["metrics"][metric]
    paired = row.get("paired", {}).get(metric)
    cells = []
    for title in header[1:]:
        if title in METRIC_COLUMNS:
            cells.append([summary["mean"], summary["std"]])
        elif title.startswith("guided − vanilla"):
            cells.append(None if paired is None else [paired["mean"], *paired["ci95"]])
        elif title == "seeds above vanilla":
            cells.append(None if paired is None else [paired["wins"], paired["n"]])
        else:
            raise AssertionError(f"README headline column {title!r} has no source in results.json")
    return cells


def assert_cell_matches(shown: str, expected: list | None, where: str):
    found = NUMBER.findall(shown)
    if expected is None:
        assert found == [], f"{where}: {shown!r} should be empty"
        return
    assert len(found) == len(expected), f"{where}: {shown!r} against {expected}"
    for text, value in zip(found, expected):
        decimals = len(text.partition(".")[2])
        assert number(text) == pytest.approx(round(value, decimals), abs=1e-9), f"{where}: {shown!r} against {value}"


def test_every_headline_number_is_the_one_in_its_results_json():
    source, header, rows = headline((REPO / "README.md").read_text())
    results = json.loads(source.read_text())
    assert results["complete"]
    metric = METRIC_COLUMNS[header[1]]
    by_name = {row["name"]: row for row in results["rows"]}
    names = []
    for cells in rows:
        name = re.search(r"\(`([\w+.-]+)`\)", cells[0]).group(1)
        names.append(name)
        for shown, expected in zip(cells[1:], expected_cells(by_name[name], metric, header)):
            assert_cell_matches(shown, expected, f"README row {name}")
    assert names[0] == "vanilla" and len(names) == len(set(names)) >= 3
    assert all(len(row["seeds_done"]) == results["plan"]["seeds"] for row in map(by_name.get, names))


def test_a_drifted_number_is_caught():
    row = {"metrics": {"m": {"mean": 24.518, "std": 1.11}},
           "paired": {"m": {"mean": 0.866, "ci95": [0.5998, 1.1322], "wins": 5, "n": 5}}}
    header = ["run", next(iter(METRIC_COLUMNS)), "guided − vanilla [95 % interval]", "seeds above vanilla"]
    expected = expected_cells(row, "m", header)
    assert_cell_matches("**+0.87 [+0.60, +1.13]**", expected[1], "ok")
    with pytest.raises(AssertionError):
        assert_cell_matches("**+0.88 [+0.60, +1.13]**", expected[1], "drifted")
    with pytest.raises(AssertionError):
        assert_cell_matches("24.52 ± 1.12", expected[0], "drifted")
    with pytest.raises(AssertionError):
        assert_cell_matches("4/5", expected[2], "drifted")
