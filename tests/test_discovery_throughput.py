"""benchmarks/discovery_throughput.py --quick: one table row per method, every rate that applies positive."""
import math

import pytest
from click.testing import CliRunner

from helpers import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_run_prints_a_row_of_positive_rates_per_method(tmp_path):
    throughput = load_benchmark("discovery_throughput")
    result = CliRunner().invoke(throughput.main, ["--quick", "--work", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in throughput.BACKBONES}
    assert set(rows) == set(throughput.BACKBONES)
    for method, cells in rows.items():
        assert len(cells) == 7, (method, cells)
        numbers = [float(c) for c in cells if c != "-"]
        # oracle has no backbone and reads no images: only e2e, in-memory and their ratio apply to it.
        assert len(numbers) == (3 if method == "oracle" else 7), (method, cells)
        assert all(math.isfinite(n) and n > 0 for n in numbers), (method, cells)
