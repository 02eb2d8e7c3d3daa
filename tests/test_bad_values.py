"""Every command refuses nonsense at the door: a non-zero exit, a one-line error that names the option or
the file, and no traceback. Each row is a value that once ran with exit 0 or crashed with a traceback."""
import pytest
from click.testing import CliRunner

from agmae.cli.discover import main as discover
from agmae.cli.eval import main as evaluate
from agmae.cli.train import main as train

RANDOM_VIT = ["--backbone", "vit_small_patch16_224", "--random-init"]
CASES = [
    (discover, ["--method", "tokencut", *RANDOM_VIT, "--tau", "5"], "--tau"),
    (discover, ["--method", "tokencut", *RANDOM_VIT, "--eps", "-1"], "--eps"),
    (discover, ["--method", "dino", *RANDOM_VIT, "--max-failures", "-1"], "--max-failures"),
    (discover, ["--method", "dino", *RANDOM_VIT, "--image-size", "0"], "--image-size"),
    (discover, ["--method", "dino", *RANDOM_VIT, "--batch-size", "0"], "--batch-size"),
    (discover, ["--method", "dino", *RANDOM_VIT, "--device", "foo"], "--device"),
    (discover, ["--method", "dino", *RANDOM_VIT, "--device", "cuda:7"], "--device"),
    (discover, ["inspect", "{store}", "--count", "0"], "--count"),
    (train, ["--no-guidance", "--mask-ratio", "0"], "--mask-ratio"),
    (train, ["--no-guidance", "--mask-ratio", "1"], "--mask-ratio"),
    (train, ["--no-guidance", "--epochs", "0"], "--epochs"),
    (train, ["--no-guidance", "--batch-size", "0"], "--batch-size"),
    (train, ["--no-guidance", "--blr", "0"], "--blr"),
    (train, ["--no-guidance", "--tau-start", "0"], "--tau-start"),
    (train, ["--no-guidance", "--max-failures", "2"], "--max-failures"),
    (train, ["--no-guidance", "--device", "foo"], "--device"),
    (train, ["--no-guidance", "--precision", "fp8"], "--precision"),
    (train, ["--no-guidance", "--init-from", "{data}/no-such-checkpoint.pth"], "--init-from"),
    (train, ["--no-guidance", "--data", "{data}", "--init-from", "{store}", "--epochs", "1", "--warmup-epochs", "0"],
     "maps.h5: "),
    (train, ["--no-guidance", "--data", "{data}", "--num-heads", "5", "--epochs", "1"], "heads do not divide"),
    (train, ["--no-guidance", "--data", "{data}", "--train-split", "nosuch", "--epochs", "1"], "no split folder"),
    (train, ["--no-guidance", "--data", "{data}/train", "--epochs", "1"], "--train-split train"),
    (discover, ["--method", "oracle", "--data", "{data}", "--train-split", "nosuch"], "no split folder"),
    (evaluate, ["knn", "--data", "{data}", "--test-split", "nosuch"], "no split folder"),
    (evaluate, ["knn", "--temperature", "0"], "--temperature"),
    (evaluate, ["knn", "--k", "0"], "--k"),
    (evaluate, ["knn", "--batch-size", "0"], "--batch-size"),
    (evaluate, ["knn", "--device", "foo"], "--device"),
    (evaluate, ["linear", "--epochs", "0"], "--epochs"),
    (evaluate, ["linear", "--warmup-epochs", "-1"], "--warmup-epochs"),
    (evaluate, ["knn", "--demo-correlation", "2"], "--demo-correlation"),
]


@pytest.mark.parametrize("command, args, named", CASES, ids=[" ".join(a[:3] + a[-2:]) for _, a, _ in CASES])
def test_a_bad_value_gets_one_line_and_a_non_zero_exit(command, args, named, demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("AGMAE_RUN_DIR", str(tmp_path / "run"))
    store = tmp_path / "maps.h5"
    store.write_bytes(b"")
    args = [arg.format(store=store, data=demo_root) for arg in args]
    result = CliRunner().invoke(command, args)
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1 and named in error_lines[0], result.output
