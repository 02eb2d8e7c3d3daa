"""agmae.training and agmae.checkpoint's plumbing: the divergence bound, the run directory's lock, and what a file that
will not load as a checkpoint is said to be."""
import pickle

import pytest
import torch

from agmae import distributed, training
from agmae.checkpoint import load_checkpoint


def test_the_guard_stops_a_running_mean_ten_times_its_lowest_and_not_one_hard_batch(tmp_path):
    guard = training.LossGuard(tmp_path / "checkpoint-last.pth", "lower --blr")
    for _ in range(training.GUARD_WARMUP_STEPS):
        guard.check(1.0, "epoch 1, step 0")
    guard.check(50.0, "epoch 1, step 10")  # one hard batch: the running mean becomes 0.9 + 5 = 5.9, under 10
    assert guard.running == pytest.approx(5.9) and guard.lowest == 1.0
    resumed = training.LossGuard(tmp_path / "checkpoint-last.pth", "lower --blr")
    resumed.load_state_dict(guard.state_dict())
    with pytest.raises(training.DivergedError, match=r"loss is diverging at epoch 1, step 11: its running mean "
                                                     r"10\.31 is over 10x its lowest, 1, and over its start, 1 "
                                                     r"\(this step's loss 50\)"):
        resumed.check(50.0, "epoch 1, step 11")  # 5.31 + 5 = 10.31: over 10x the lowest


def test_the_guard_lets_a_loss_near_zero_wobble_below_where_it_started(tmp_path):
    guard = training.LossGuard(tmp_path / "checkpoint-last.pth", "lower --lr")
    for step in range(100):  # a fine-tune without label smoothing on an easy set: 2.3 down to 0.001
        guard.check(max(2.3 * 0.8 ** step, 0.001), f"step {step}")
    lowest = guard.lowest
    for step in range(100, 120):  # a stretch of harder batches: 30x the lowest running mean, far below the start
        guard.check(0.05, f"step {step}")
    assert guard.running > 10 * lowest and guard.running < guard.start
    with pytest.raises(training.DivergedError, match="over its start"):
        for step in range(120, 160):  # a real blow-up passes where the loss started
            guard.check(5.0, f"step {step}")


def test_the_guard_stops_at_the_first_non_finite_loss_even_in_warm_up(tmp_path):
    guard = training.LossGuard(tmp_path / "last.pth", "lower --blr or set --clip-grad")
    with pytest.raises(training.DivergedError, match=r"^loss is inf at epoch 1, step 0; stopped without saving, "
                                                     r".*last.pth is the last good state; lower --blr or set "
                                                     r"--clip-grad$"):
        guard.check(float("inf"), "epoch 1, step 0")


def test_a_run_directory_that_is_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(ValueError, match=r"run: is a file, not a run directory; pass another --out"):
        with training.hold_run_dir(tmp_path / "run", distributed.DistEnv(), "agmae-train"):
            pass


@pytest.mark.parametrize("content, said", [
    (b"", r"is empty \(0 bytes\), a save or a copy that never finished"),
    (None, r"is a damaged torch file \(\d+ bytes, PytorchStreamReader failed reading zip archive: failed finding "
           r"central directory\): truncated or corrupted"),
    (pickle.dumps({"a": 1}), r"is a pickle that loading with weights_only=True refuses \(Unsupported operand \d+\)"),
    (b"hello world", r"is not a torch file \(it starts with b'hello wo'\); pass an agmae-train checkpoint"),
])
def test_a_file_that_will_not_load_is_called_what_it_is(content, said, tmp_path):
    path = tmp_path / "checkpoint.pth"
    if content is None:  # a torch file cut in half, as by an unfinished copy
        torch.save({"weights": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path}: {said}"):
        load_checkpoint(path)


@pytest.mark.parametrize("device, local_ranks, expected", [
    ("cpu", None, 8),    # 16 CPUs, one process: the compute threads keep their cores, workers capped
    ("cuda", None, 15),  # one GPU process: every CPU but its own decodes
    ("cuda:0", "8", 1),  # torchrun's 8 ranks share the 16 CPUs: 2 each, one of them the rank's own
    ("cpu", "16", 1),    # never fewer than one worker
])
def test_the_loader_workers_default_follows_the_device_and_the_ranks_sharing_the_node(
        device, local_ranks, expected, monkeypatch):
    from agmae.train.config import TrainConfig

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    if local_ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device.startswith("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert TrainConfig(device=device).workers == expected
    assert TrainConfig(device=device, workers=3).workers == 3  # a given count is kept
