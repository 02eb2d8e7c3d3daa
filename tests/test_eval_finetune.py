"""agmae-eval finetune: MAE's fine-tuning protocol from timm's parts (eval/finetune.py)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from agmae import distributed, preemption, training
from agmae.cli.eval import main
from agmae.data.folder import scan
from agmae.eval import finetune
from agmae.eval.finetune import FineTuning, FinetuneOptions
from agmae.eval.protocols import run_finetune

from helpers import TINY_VIT

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ("red", "green", "blue")
QUICK = dict(epochs=2, warmup_epochs=1, batch_size=8, accum_iter=1, blr=1e-3, randaugment="none", reprob=0.0,
             workers=0, device="cpu", precision="fp32", verify_images=False)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    """Three classes told apart by their dominant colour under noise: separable, but not by an untrained head."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 8)):
        for channel, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 110, (32, 32, 3))
                pixels[..., channel] += 140
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def encoder_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("encoder") / "checkpoint-last.pth"
    torch.save({"model": VisionTransformer(**TINY_VIT, num_classes=0).state_dict(), "config": {"encoder": TINY_VIT}},
               path)
    return path


def tuning_for(checkpoint, root, out, **overrides):
    opts = FinetuneOptions(**{**QUICK, **overrides}).resolved()
    return FineTuning(checkpoint, scan(root / "train"), opts, out, progress=False)


def layer_of(name: str, depth: int) -> int:
    """MAE's layer id (util/lr_decay.py): tokens and patch embedding 0, block i is i + 1, the rest depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def test_layer_decay_groups_train_at_the_formula_s_learning_rates(encoder_checkpoint, toy_root, tmp_path):
    tuning = tuning_for(encoder_checkpoint, toy_root, tmp_path, layer_decay=0.5, warmup_epochs=1, epochs=3)
    tuning.scheduler.step_update(tuning.steps_per_epoch)  # the end of warm-up: the peak lr
    depth, names = TINY_VIT["depth"], {id(p): n for n, p in tuning.model.named_parameters()}
    assert tuning.lr == pytest.approx(1e-3 * 8 / 256)
    seen = 0
    for group in tuning.optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            assert group["lr"] == pytest.approx(tuning.lr * 0.5 ** (depth + 1 - layer_of(name, depth))), name
            no_decay = param.ndim <= 1 or name in ("cls_token", "pos_embed")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
            seen += 1
    assert seen == len(names)
    assert {layer_of(n, depth) for n in names.values()} == set(range(depth + 2))


def test_mixed_targets_sum_to_one_and_mix_the_images_as_they_mix_the_labels(encoder_checkpoint, toy_root, tmp_path):
    tuning = tuning_for(encoder_checkpoint, toy_root, tmp_path, mixup=0.8, cutmix=0.0, smoothing=0.1)
    np.random.seed(3)
    imgs, labels = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mixed, targets = tuning.mixup(imgs.clone(), labels)
    assert torch.allclose(targets.sum(dim=1), torch.ones(8))
    smooth = torch.full((8, 3), 0.1 / 3).scatter_(1, labels[:, None], 1 - 0.1 + 0.1 / 3)
    lam = float((mixed[0] - imgs.flip(0)[0]).flatten() @ (imgs[0] - imgs.flip(0)[0]).flatten()
                / (imgs[0] - imgs.flip(0)[0]).pow(2).sum())
    assert torch.allclose(mixed, lam * imgs + (1 - lam) * imgs.flip(0), atol=1e-5)
    assert torch.allclose(targets, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-5)
    assert 0 < lam < 1


def test_a_killed_and_resumed_fine_tune_ends_bit_identical_to_an_uninterrupted_one(encoder_checkpoint, toy_root,
                                                                                  tmp_path, monkeypatch):
    options = dict(mixup=0.8, cutmix=1.0, randaugment="rand-m9-mstd0.5-inc1", reprob=0.25, workers=1, epochs=2)
    whole = tuning_for(encoder_checkpoint, toy_root, tmp_path / "whole", **options).run()

    original = FineTuning._train_one_epoch

    def killed_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(FineTuning, "_train_one_epoch", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        tuning_for(encoder_checkpoint, toy_root, tmp_path / "killed", **options).run()
    monkeypatch.setattr(FineTuning, "_train_one_epoch", original)
    resumed = tuning_for(encoder_checkpoint, toy_root, tmp_path / "killed", **options)
    resumed_model = resumed.run()
    assert resumed.losses[0] == whole_losses(tmp_path / "whole")[0]
    for (name, a), b in zip(whole.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=r"was fine-tuned with other options.*another --run-dir"):
        tuning_for(encoder_checkpoint, toy_root, tmp_path / "killed", **{**options, "blr": 2e-3}).run()


def whole_losses(out):
    return torch.load(out / "checkpoint-last.pth", weights_only=True)["losses"]


def test_a_tiny_fine_tune_beats_its_untrained_start_on_a_separable_toy(encoder_checkpoint, toy_root, tmp_path):
    val = scan(toy_root / "val")
    untrained = tuning_for(encoder_checkpoint, toy_root, tmp_path, epochs=8, blr=5e-3, mixup=0, cutmix=0)
    before = finetune.classify(untrained.model.eval(), val, 32, workers=0, progress=False)["top1"]
    after = finetune.classify(untrained.run(), val, 32, workers=0, progress=False)["top1"]
    assert before <= 50.0 and after >= before + 40.0, (before, after)


def test_the_cli_records_top1_per_split_and_refuses_bad_values_in_one_line(encoder_checkpoint, toy_root, tmp_path):
    args = ["finetune", "--checkpoint", str(encoder_checkpoint), "--data", str(toy_root), "--run-dir",
            str(tmp_path), *(f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items() if k != "verify_images"),
            "--epochs", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "results.json").read_text())["finetune"]
    assert set(entry["results"]["splits"]) == {"val"} and "top1" in entry["results"]["splits"]["val"]
    assert "top5" not in entry["results"]["splits"]["val"]  # 3 classes: top-5 says nothing
    assert entry["options"]["layer_decay"] == 0.65 and entry["options"]["lr"] == pytest.approx(1e-3 * 8 / 256)
    assert len(entry["results"]["epoch_losses"]) == 1
    odd = CliRunner().invoke(main, [*args, "--batch-size", "7", "--mixup", "0.8"])
    assert odd.exit_code == 1 and re.search(r"--batch-size 7: Mixup/CutMix pair", odd.output)
    assert odd.output.count("\n") == 1
    for bad in (["--layer-decay", "0"], ["--drop-path", "1"], ["--reprob", "2"], ["--epochs", "0"]):
        refused = CliRunner().invoke(main, [*args, *bad])
        assert refused.exit_code == 2 and bad[0] in refused.output, refused.output


def test_background_splits_are_scored_beside_the_test_split(encoder_checkpoint, demo_root, tmp_path):
    outcome = run_finetune(encoder_checkpoint, demo_root, "train", None,
                           FinetuneOptions(**{**QUICK, "epochs": 1, "batch_size": 32}), tmp_path)
    assert list(outcome.entry["results"]["splits"]) == ["original", "mixed-rand", "only-fg"]
    assert all("top5" in r for r in outcome.entry["results"]["splits"].values())


def test_randaugment_at_full_magnitude_posterizes_to_black_instead_of_failing():
    """MAE's rand-m9-mstd0.5-inc1 draws magnitude 10 about 2 % of the time, where posterize keeps 0 bits:
    black in older Pillow, an error in Pillow 13. Every posterize op of the fine-tune transform gives black."""
    from PIL import Image

    from agmae.eval.finetune import FinetuneOptions, train_transform

    transform = train_transform(32, FinetuneOptions(randaugment="rand-m9-mstd0.5-inc1", reprob=0.25))
    randaugment = next(step for step in transform.transforms if hasattr(step, "ops"))
    posterize = [op for op in randaugment.ops if op.name.startswith("Posterize")]
    assert posterize
    image = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    for op in posterize:
        assert np.asarray(op.aug_fn(image, 0)).max() == 0
        assert np.asarray(op.aug_fn(image, 4)).max() == 192  # any other bit count: timm's op unchanged


_PREEMPTED_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from agmae import preemption
from agmae.data.folder import scan
from agmae.eval.finetune import FineTuning, FinetuneOptions
opts = FinetuneOptions(**eval(sys.argv[1])).resolved()
tuning = FineTuning(sys.argv[2], scan(sys.argv[3]), opts, sys.argv[4], progress=False)
real_criterion, calls = tuning.criterion, []

def criterion_then_wait_for_the_signal(*args):
    calls.append(1)
    if len(calls) == 8:  # the 2nd batch of epoch 2 (6 per epoch, 2 per optimizer step), which closes a step
        open(sys.argv[5], "w").close()
        while not preemption.requested():
            time.sleep(0.01)
    return real_criterion(*args)

tuning.criterion = criterion_then_wait_for_the_signal
tuning.run()
"""


def test_sigusr1_saves_mid_epoch_and_the_resumed_fine_tune_ends_bit_identical(encoder_checkpoint, toy_root,
                                                                             tmp_path):
    options = dict(QUICK, mixup=0.8, cutmix=1.0, randaugment="rand-m9-mstd0.5-inc1", reprob=0.25, workers=2,
                   accum_iter=2, epochs=2)
    whole = FineTuning(encoder_checkpoint, scan(toy_root / "train"), FinetuneOptions(**options).resolved(),
                       tmp_path / "whole", progress=False)
    whole_model = whole.run()
    out, ready = tmp_path / "preempted", tmp_path / "ready"
    process = subprocess.Popen([sys.executable, "-c", _PREEMPTED_SCRIPT, repr(options), str(encoder_checkpoint),
                                str(toy_root / "train"), str(out), str(ready)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGUSR1)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == preemption.PREEMPTED, output
    assert f"SIGUSR1: saved {out / 'checkpoint-last.pth'} at epoch 2, batch 2" in output
    saved = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert (saved["epoch"], saved["position"], len(saved["losses"])) == (1, 2, 1)
    resumed = FineTuning(encoder_checkpoint, scan(toy_root / "train"), FinetuneOptions(**options).resolved(), out,
                         progress=False)
    resumed_model = resumed.run()
    assert resumed.losses == whole.losses
    for (name, a), b in zip(whole_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    # what rebuilds the classifier travels with its weights
    rebuilt = VisionTransformer(**saved["model_kwargs"])
    rebuilt.load_state_dict(torch.load(out / "checkpoint-last.pth", weights_only=True)["model"])


def test_a_diverging_fine_tune_stops_before_saving_and_a_second_writer_is_refused(encoder_checkpoint, toy_root,
                                                                                  tmp_path):
    tuning = tuning_for(encoder_checkpoint, toy_root, tmp_path, epochs=4, mixup=0, cutmix=0)
    real_criterion, calls = tuning.criterion, []

    def running_away_in_epoch_three(*args):
        calls.append(1)
        return real_criterion(*args) * 4.0 ** max(len(calls) - 12, 0)  # 6 batches per epoch

    tuning.criterion = running_away_in_epoch_three
    with pytest.raises(ValueError, match=r"loss is diverging at epoch 3, batch \d: .*; stopped without saving, "
                                         r".*checkpoint-last.pth is the last good state; lower --blr"):
        tuning.run()
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["epoch"] == 2
    with training.hold_run_dir(tmp_path, distributed.DistEnv(), "agmae-eval finetune"):
        with pytest.raises(ValueError, match=f"{tmp_path}: agmae-eval finetune \\(PID {os.getpid()} on .*\\) is "
                                             "writing this run directory"):
            tuning_for(encoder_checkpoint, toy_root, tmp_path, epochs=4).run()


def test_a_given_warm_up_longer_than_the_fine_tune_is_refused_and_a_recipe_s_keeps_its_share():
    with pytest.raises(ValueError, match="--warmup-epochs 3 is longer than the run's --epochs 2"):
        FinetuneOptions(**{**QUICK, "warmup_epochs": 3}).resolved()
    assert FinetuneOptions(**{**QUICK, "warmup_epochs": None}).resolved().warmup_epochs == 0.1  # MAE's 5 of 100


def test_agmae_eval_finetune_exits_with_the_preempted_code(encoder_checkpoint, toy_root, tmp_path, monkeypatch):
    def preempted(self):
        raise preemption.Preempted("SIGUSR1: saved RUN/finetune/checkpoint-last.pth")

    monkeypatch.setattr(FineTuning, "run", preempted)
    result = CliRunner().invoke(main, ["finetune", "--checkpoint", str(encoder_checkpoint), "--data", str(toy_root),
                                       "--run-dir", str(tmp_path), "--workers", "0", "--device", "cpu",
                                       "--batch-size", "8", "--accum-iter", "1"])
    assert result.exit_code == preemption.PREEMPTED, result.output
