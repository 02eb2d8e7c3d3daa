"""The training loop end to end on a tiny MAE: resume exactness, data parallelism, maps handling,
errors, the CLI, and the SLURM template."""
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import agmae.train.engine as engine
from agmae.data.folder import scan
from agmae.store import keys_fingerprint
from agmae import store
from agmae import preemption
from agmae.checkpoint import export_encoder, load_checkpoint, load_encoder
from agmae.hardware import cpu_has_native_bf16
from agmae.cli.train import config_from_options, main as train_cli
from agmae.train.dataset import GuidedMAEDataset
from agmae.hardware import resolve_precision
from agmae.train.config import RECIPES
from agmae.train.engine import NonFiniteLossError, TrainConfig, Trainer, train
from agmae.train.model import load_mae
from timm.models.vision_transformer import VisionTransformer

from helpers import add_unreadable_images, random_training_split

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, GRID = 16, (5, 6)
TINY_MODEL = dict(input_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
FAILED_INDEX = 3


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return random_training_split(tmp_path_factory.mktemp("dataset"), N_IMAGES)


def _write_store(path, keys, maps, status):
    with store.create(path, keys, GRID, method="oracle", backbone=None, weights_sha256=None, image_size=48,
                      method_options={}) as writer:
        writer.write(0, maps, status, ["unreadable" if s == store.STATUS_FAILED else "" for s in status])
    return path


@pytest.fixture(scope="module")
def maps_file(image_root, tmp_path_factory):
    """Random maps for every image but one, whose discovery failed."""
    status = np.full(N_IMAGES, store.STATUS_DONE, np.uint8)
    status[FAILED_INDEX] = store.STATUS_FAILED
    maps = np.random.default_rng(1).random((N_IMAGES, *GRID), dtype=np.float32)
    return _write_store(tmp_path_factory.mktemp("maps") / "maps-oracle.h5", scan(image_root).keys, maps, status)


def _config_for(image_root, out, maps=None, **overrides):
    settings = {**TINY_MODEL, "model": "mae_vit_demo_patch8", "epochs": 3, "warmup_epochs": 1, "batch_size": 4, "blr": 1e-3, "save_every": 1,
                "workers": 0, "device": "cpu", **overrides}
    return TrainConfig(data=str(image_root.parent), out=str(out), maps=None if maps is None else str(maps), **settings)


def _weights(run_dir):
    return load_checkpoint(Path(run_dir) / "checkpoint-last.pth")["model"]


def _metrics(run_dir, timing=True):
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return records if timing else [{k: v for k, v in r.items() if k != "imgs_per_s"} for r in records]


def test_resumed_run_ends_identical_to_an_uninterrupted_one(image_root, maps_file, tmp_path, monkeypatch):
    uninterrupted = _config_for(image_root, tmp_path / "a", maps_file, workers=2)
    train(uninterrupted)

    killed = replace(uninterrupted, out=str(tmp_path / "b"), workers=0)
    real_loss, calls = engine.guided_mae_loss, []

    def loss_then_kill(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * 4 + 2:  # second micro-step of epoch 3 (4 steps per epoch)
            raise KeyboardInterrupt("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(engine, "guided_mae_loss", loss_then_kill)
    with pytest.raises(KeyboardInterrupt):
        train(killed)
    assert load_checkpoint(tmp_path / "b" / "checkpoint-last.pth")["epoch"] == 2
    monkeypatch.setattr(engine, "guided_mae_loss", real_loss)
    train(killed)

    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(tmp_path / "a", timing=False) == _metrics(tmp_path / "b", timing=False)
    assert [m["epoch"] for m in _metrics(tmp_path / "b")] == [1, 2, 3]
    checkpoint = load_checkpoint(tmp_path / "b" / "checkpoint-last.pth")
    assert {"model", "optimizer", "scaler", "epoch", "step", "rng", "sampler", "config", "version"} <= checkpoint.keys()
    assert (checkpoint["epoch"], checkpoint["step"]) == (3, 12)
    assert checkpoint["config"]["encoder"]["embed_dim"] == 32
    assert checkpoint["config"]["store_identity"] == store.open_maps(maps_file).identity()
    # every image but the failed one is seen once per epoch
    assert [m["missing_maps"] for m in _metrics(tmp_path / "a")] == [1, 1, 1]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["lr"] == pytest.approx(1e-3 * 4 / 256)


def test_a_compiled_run_resumes_exactly_and_matches_eager_up_to_rounding(image_root, maps_file, tmp_path,
                                                                          monkeypatch):
    compiled = _config_for(image_root, tmp_path / "compiled", maps_file, epochs=2, compile=True)
    train(compiled)
    killed = replace(compiled, out=str(tmp_path / "killed"))
    real_loss, calls = engine.guided_mae_loss, []

    def loss_then_kill(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4 + 2:  # second micro-step of epoch 2 (4 steps per epoch)
            raise KeyboardInterrupt("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(engine, "guided_mae_loss", loss_then_kill)
    with pytest.raises(KeyboardInterrupt):
        train(killed)
    monkeypatch.setattr(engine, "guided_mae_loss", real_loss)
    train(killed)
    a, b = _weights(tmp_path / "compiled"), _weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(replace(compiled, out=str(tmp_path / "eager"), compile=False))
    losses = [[m["loss"] for m in _metrics(tmp_path / run)] for run in ("compiled", "eager")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


_RANK_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from agmae import distributed
from agmae.train.engine import TrainConfig, Trainer
cfg = TrainConfig(**eval(sys.argv[1]))
env, device = distributed.init("cpu")
trainer = Trainer(cfg, env, device)
trainer.run()
torch.save(trainer.model.state_dict(), sys.argv[2])
distributed.shutdown()
"""


def _two_gloo_ranks(script: str, cfg, tmp_path) -> list:
    """Start `script` as ranks 0 and 1 of a gloo group on a free local port, one thread each; rank r gets the
    config's fields and writes tmp_path/rank<r>.pt."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-c", script, repr(cfg.__dict__), str(tmp_path / f"rank{rank}.pt")]
        ranks.append(subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return ranks


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(compiled, image_root, maps_file, tmp_path):
    # a large lr so that two Adam steps move the weights far beyond float noise
    single = _config_for(image_root, tmp_path / "single", maps_file, epochs=1, warmup_epochs=0, batch_size=8, blr=0.5,
                         compile=compiled)
    train(single)
    shared = replace(single, out=str(tmp_path / "ddp"), batch_size=4)
    ranks = _two_gloo_ranks(_RANK_SCRIPT, shared, tmp_path)
    for process in ranks:
        output, _ = process.communicate(timeout=240)
        assert process.returncode == 0, output
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    reference = _weights(tmp_path / "single")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # Relative to how far training moved them: Adam's first step turns the mathematically zero gradient
    # of the key biases (softmax ignores them) into +-lr noise, so an element-wise bound would test noise.
    initial = _initial_weights(single)
    moved = torch.cat([(reference[k] - initial[k]).flatten() for k in reference]).norm()
    deviation = torch.cat([(rank0[k] - reference[k]).flatten() for k in reference]).norm()
    # (a loss normalised per rank instead of over the global batch deviates by ~1e-1 here)
    assert moved > 0.1 and deviation < 1e-3 * moved
    assert load_checkpoint(tmp_path / "ddp" / "checkpoint-last.pth")["config"]["effective_batch"] == 8


def _initial_weights(cfg):
    torch.manual_seed(cfg.seed)
    return engine.create_model(cfg.model, **cfg.model_overrides()).state_dict()


def test_vanilla_run_equals_guided_run_with_uniform_maps(image_root, tmp_path):
    zeros = _write_store(tmp_path / "zeros.h5", scan(image_root).keys, np.zeros((N_IMAGES, *GRID), np.float32),
                         np.full(N_IMAGES, store.STATUS_DONE, np.uint8))
    train(_config_for(image_root, tmp_path / "vanilla", epochs=1))
    train(_config_for(image_root, tmp_path / "uniform", zeros, epochs=1))
    vanilla, uniform = _weights(tmp_path / "vanilla"), _weights(tmp_path / "uniform")
    assert all(torch.equal(vanilla[k], uniform[k]) for k in vanilla)
    assert _metrics(tmp_path / "vanilla")[0]["tau"] is None


def test_failed_maps_give_uniform_weights_or_an_error_with_require_maps(image_root, maps_file, tmp_path):
    index = scan(image_root)
    dataset = GuidedMAEDataset(index, 32, 16, seed=0, maps_path=Path(maps_file))
    failed, fine = dataset[(0, FAILED_INDEX)], dataset[(0, 0)]
    assert not failed["has_map"] and torch.count_nonzero(failed["map"]) == 0
    assert fine["has_map"] and torch.allclose(
        fine["map"], torch.from_numpy(store.open_maps(maps_file).maps[0].astype(np.float32)))
    with pytest.raises(ValueError, match="1 of 16 maps failed .* rerun agmae-discover with --overwrite"):
        Trainer(_config_for(image_root, tmp_path, maps_file, require_maps=True), engine.distributed.DistEnv(),
                torch.device("cpu"))


def test_an_unfinished_store_is_refused_unless_missing_maps_are_allowed(image_root, tmp_path):
    keys, unfinished = scan(image_root).keys, tmp_path / "maps.h5"
    status = np.full(N_IMAGES - 5, store.STATUS_DONE, np.uint8)  # a discovery job killed before its last 5 maps
    status[0] = store.STATUS_FAILED
    with store.create(unfinished, keys, GRID, method="oracle", backbone=None, weights_sha256=None, image_size=48,
                      method_options={}) as writer:
        writer.write(0, np.zeros((N_IMAGES - 5, *GRID), np.float32), status, ["unreadable"] + [""] * 10)
    with pytest.raises(ValueError, match="5 of 16 maps are still pending .* it resumes, or pass --allow-missing"):
        train(_config_for(image_root, tmp_path / "refused", unfinished, epochs=1))
    assert not (tmp_path / "refused" / "checkpoint-last.pth").exists()
    record = train(_config_for(image_root, tmp_path / "allowed", unfinished, epochs=1, allow_missing_maps=True))
    assert record["missing_maps"] == 6  # 5 pending and 1 failed train unguided, each seen once


def test_samples_depend_only_on_seed_epoch_and_index(image_root):
    dataset = GuidedMAEDataset(scan(image_root), 32, 16, seed=0)
    first, again, next_epoch = dataset[(0, 5)], dataset[(0, 5)], dataset[(1, 5)]
    assert all(torch.equal(torch.as_tensor(first[k]), torch.as_tensor(again[k])) for k in first)
    assert not torch.equal(first["noise"], next_epoch["noise"])
    assert "map" not in first


def test_resuming_with_another_store_of_the_same_images_is_refused_naming_both_files(image_root, maps_file,
                                                                                    tmp_path):
    run = tmp_path / "run"
    train(_config_for(image_root, run, maps_file, epochs=2))
    opened = store.open_maps(maps_file)
    other = tmp_path / "maps-tokencut.h5"
    with store.create(other, opened.keys, GRID, method="tokencut", backbone="vit_small_patch16_224",
                      weights_sha256="ab" * 32, image_size=48, method_options={"tau": 0.2}) as writer:
        writer.write(0, np.asarray(opened.maps, np.float32), np.asarray(opened.status), opened.errors)
    assert store.open_maps(other).attrs["keys_sha256"] == opened.attrs["keys_sha256"]  # same images
    with pytest.raises(ValueError) as err:
        train(_config_for(image_root, run, other, epochs=2))
    message = str(err.value)
    assert str(maps_file) in message and str(other) in message and "method tokencut" in message
    with pytest.raises(ValueError, match="no maps, vanilla MAE"):
        train(_config_for(image_root, run, None, epochs=2))
    assert train(_config_for(image_root, run, maps_file, epochs=2)) is None  # the same store: nothing left to do


def test_store_of_another_dataset_is_refused_naming_both_fingerprints(image_root, tmp_path):
    other_keys = [f"cat/{i:02d}.jpg" for i in range(N_IMAGES)]
    other = _write_store(tmp_path / "other.h5", other_keys, np.zeros((N_IMAGES, *GRID), np.float32),
                         np.full(N_IMAGES, store.STATUS_DONE, np.uint8))
    with pytest.raises(ValueError) as err:
        train(_config_for(image_root, tmp_path / "run", other))
    assert keys_fingerprint(other_keys) in str(err.value)
    assert scan(image_root).keys_sha256 in str(err.value)
    assert not (tmp_path / "run" / "checkpoint-last.pth").exists()


def test_non_finite_loss_stops_and_leaves_the_last_checkpoint_untouched(image_root, tmp_path, monkeypatch):
    cfg = _config_for(image_root, tmp_path, epochs=2)
    real_loss, calls = engine.guided_mae_loss, []

    def nan_in_epoch_two(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 6 else loss

    monkeypatch.setattr(engine, "guided_mae_loss", nan_in_epoch_two)
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 2"):
        train(cfg)
    checkpoint = load_checkpoint(tmp_path / "checkpoint-last.pth")
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == 4


def test_weight_decay_spares_norms_biases_and_tokens(image_root, tmp_path):
    trainer = Trainer(_config_for(image_root, tmp_path, weight_decay=0.05), engine.distributed.DistEnv(),
                      torch.device("cpu"))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decayed = {names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    spared = {names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"cls_token", "mask_token", "norm.weight", "blocks.0.attn.qkv.bias", "patch_embed.proj.bias"} <= spared
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "decoder_pred.weight"} <= decayed
    assert "pos_embed" not in decayed | spared  # fixed, not trained
    assert trainer.optimizer.defaults["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("patch, given, fused", [(8, None, False), (4, None, False), (2, None, True),
                                                 (2, False, False), (8, True, True)])
def test_fused_attention_is_on_from_128_patches_on_a_cpu_unless_told(patch, given, fused, image_root, tmp_path):
    trainer = Trainer(_config_for(image_root, tmp_path, patch_size=patch, fused_attn=given),
                      engine.distributed.DistEnv(), torch.device("cpu"))  # 32 px: 16, 64, 256 patches
    assert {block.attn.fused_attn for block in [*trainer.model.blocks, *trainer.model.decoder_blocks]} == {fused}


def test_a_run_started_from_another_runs_weights_trains_them_on_with_a_fresh_optimizer(image_root, maps_file,
                                                                                        tmp_path):
    """--init-from: the first round's weights exactly, under a fresh optimizer and schedule; the run records their
    fingerprint, so the file may move, and a resume from other weights or from none is refused."""
    first = tmp_path / "first"
    train(_config_for(image_root, first, epochs=2))
    start = tmp_path / "start.pth"
    shutil.copy(first / "checkpoint-last.pth", start)
    second = tmp_path / "second"
    trainer = Trainer(_config_for(image_root, second, maps_file, epochs=2, init_from=str(start)),
                      engine.distributed.DistEnv(), torch.device("cpu"))
    started = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    assert all(torch.equal(started[name], value) for name, value in _weights(first).items())
    assert (trainer.start_epoch, trainer.step, trainer.optimizer.state) == (0, 0, {})
    assert trainer.run()["epoch"] == 2
    assert not torch.equal(_weights(second)["blocks.0.attn.qkv.weight"], started["blocks.0.attn.qkv.weight"])

    moved = start.rename(tmp_path / "moved.pth")  # the same weights elsewhere: the finished run has nothing to do
    assert train(_config_for(image_root, second, maps_file, epochs=2, init_from=str(moved))) is None
    train(_config_for(image_root, tmp_path / "other", epochs=1))
    for other, named in ((tmp_path / "other" / "checkpoint-last.pth", ".*other/checkpoint-last.pth"),
                         (None, "its own initialisation")):
        with pytest.raises(ValueError, match=f"started from the weights of .*start.pth, this run from {named} "
                                             r"\(other weights\); resume with the same --init-from"):
            train(_config_for(image_root, second, maps_file, epochs=2, init_from=other and str(other)))


def test_init_from_refuses_other_models_and_exported_encoders_in_one_line(image_root, tmp_path):
    train(_config_for(image_root, tmp_path / "first", epochs=1))
    checkpoint = tmp_path / "first" / "checkpoint-last.pth"
    with pytest.raises(ValueError, match=r"checkpoint-last.pth: not the weights of this run's MAE \(size mismatch "
                                         r"for .*\); pass the model options it was trained with"):
        train(_config_for(image_root, tmp_path / "wide", epochs=1, embed_dim=64, init_from=str(checkpoint)))
    exported = export_encoder(checkpoint, tmp_path / "encoder.pth")
    with pytest.raises(ValueError, match="encoder.pth: holds no MAE weights .* not an exported encoder"):
        train(_config_for(image_root, tmp_path / "from-encoder", epochs=1, init_from=str(exported)))


def test_resume_with_another_architecture_is_refused(image_root, tmp_path):
    train(_config_for(image_root, tmp_path, epochs=1))
    with pytest.raises(ValueError, match="was trained with --embed-dim 32, this run has 64"):
        Trainer(_config_for(image_root, tmp_path, epochs=2, embed_dim=64),
                engine.distributed.DistEnv(), torch.device("cpu"))


def test_cli_trains_with_gradient_accumulation_and_exports(image_root, maps_file, tmp_path):
    run = tmp_path / "run"
    args = ["--data", str(image_root.parent), "--maps", str(maps_file), "--out", str(run), "--epochs", "1",
            "--batch-size", "2", "--accum-iter", "2", "--workers", "0", "--device", "cpu", "--clip-grad", "1.0",
            "--weight-norm", "sample", "--tau-schedule", "constant", "--tau-start", "0.5"]
    for name, value in TINY_MODEL.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert (config["effective_batch"], config["weight_norm"], config["clip_grad"]) == (4, "sample", 1.0)
    assert _metrics(run)[0]["step"] == 4 and _metrics(run)[0]["tau"] == 0.5
    result = CliRunner().invoke(train_cli, ["export", "--checkpoint", str(run / "checkpoint-last.pth"),
                                            "--out", str(tmp_path / "vit.pth")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "vit.pth.json").is_file()


def test_cli_defaults_to_the_demo_recipe_and_names_missing_maps(demo_root, monkeypatch, tmp_path):
    monkeypatch.setattr("agmae.data.demo.ensure_demo", lambda: demo_root)
    monkeypatch.setenv("AGMAE_RUN_DIR", str(tmp_path / "empty-run"))
    vanilla = config_from_options(True, **_unset_options()).resolved()
    assert (vanilla.model, vanilla.epochs, vanilla.warmup_epochs, vanilla.batch_size, vanilla.blr,
            vanilla.precision) == ("mae_vit_demo_patch8", 16, 2.0, 256, 1e-3, "native")
    assert vanilla.image_folder() == demo_root / "train" and vanilla.maps is None
    assert vanilla.out == str(tmp_path / "empty-run")
    with pytest.raises(FileNotFoundError, match="agmae-discover"):
        config_from_options(False, **_unset_options())
    result = CliRunner().invoke(train_cli, ["--no-guidance", "--maps", "x.h5"])
    assert result.exit_code != 0 and "exclude each other" in result.output


def test_user_data_takes_the_paper_recipe_and_explicit_values_win(image_root):
    paper = TrainConfig(data=str(image_root.parent), epochs=3).resolved()
    assert (paper.model, paper.epochs, paper.blr, paper.batch_size, paper.precision) == (
        RECIPES["paper"]["model"], 3, 1.5e-4, 64, "auto")


def test_each_train_option_has_one_definition_the_cli_and_python_share():
    cli = {p.name: p for p in train_cli.params}
    for name in ("epochs", "mask_ratio", "tau_start", "weight_norm", "device", "precision", "seed"):
        assert cli[name].default == TrainConfig.__dataclass_fields__[name].default
    with pytest.raises(ValueError, match="--mask-ratio 0"):
        TrainConfig(mask_ratio=0)
    with pytest.raises(ValueError, match="--weight-norm 'bogus'"):
        TrainConfig(weight_norm="bogus")


def _unset_options():
    return {p.name: p.default for p in train_cli.params if p.name != "no_guidance"}


def _stub_slurm(tmp_path, program):
    """PATH with scontrol (two hosts) and srun / `program` stand-ins that log their arguments and the
    rendezvous variables they were given; returns (env, log)."""
    log, bin_dir = tmp_path / "launched.log", tmp_path / "bin"
    bin_dir.mkdir()
    record = f'echo "$(basename $0) $* | $MASTER_ADDR:$MASTER_PORT OMP=$OMP_NUM_THREADS" >> {log}'
    for name, body in {"scontrol": "printf 'node7\\nnode8\\n'", "srun": record, program: record}.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[7-8]",
           "SLURM_JOB_ID": "12345", "SLURM_CPUS_PER_TASK": "6"}
    env.pop("MASTER_PORT", None)
    env.pop("OMP_NUM_THREADS", None)
    return env, log


def test_train_sbatch_launches_every_task_with_the_job_rendezvous(tmp_path):
    env, log = _stub_slurm(tmp_path, "agmae-train")
    result = subprocess.run(["bash", str(REPO / "pipeline" / "train.sbatch"), "--maps", "M.h5", "--out", "RUN"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # the first host of the allocation, a port derived from the job id, one thread per CPU of the task
    assert log.read_text().splitlines() == [
        "srun --kill-on-bad-exit=1 agmae-train --workers 6 --maps M.h5 --out RUN | node7:32345 OMP=6"]


@pytest.mark.parametrize("subcommand, launched", [
    ("knn", "srun --kill-on-bad-exit=1 agmae-eval knn --run-dir R --workers 6"),
    ("attention", "agmae-eval attention --run-dir R"),  # no encoder: once, without srun and --workers
])
def test_eval_sbatch_launches_each_subcommand_with_options_it_takes(tmp_path, subcommand, launched):
    env, log = _stub_slurm(tmp_path, "agmae-eval")
    result = subprocess.run(["bash", str(REPO / "pipeline" / "eval.sbatch"), subcommand, "--run-dir", "R"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert [line.split(" | ")[0] for line in log.read_text().splitlines()] == [launched]
    assert log.read_text().split(" | ")[1].startswith("node7:32345")


def test_precision_choices_resolve_per_device(monkeypatch):
    cpu = torch.device("cpu")
    native = "bf16" if cpu_has_native_bf16() else "fp32"
    assert resolve_precision("auto", cpu, training=True) == "fp32" == resolve_precision("fp32", cpu)
    assert resolve_precision("native", cpu, training=True) == native
    with pytest.raises(ValueError, match="training on a CUDA device"):
        resolve_precision("fp16", cpu, training=True)
    if cpu_has_native_bf16():
        assert resolve_precision("bf16", cpu) == "bf16"
    else:
        with pytest.raises(ValueError, match="no native bf16"):
            resolve_precision("bf16", cpu)
    # a GPU without bf16 (V100, T4) trains in fp16 with loss scaling, and extracts features in fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    gpu = torch.device("cuda")
    assert resolve_precision("auto", gpu, training=True) == "fp16" == resolve_precision("native", gpu, training=True)
    assert resolve_precision("auto", gpu) == "fp32"


def test_keep_every_keeps_each_epochs_weights_beside_the_last(image_root, tmp_path):
    run_dir = tmp_path / "run"
    train(_config_for(image_root, run_dir, epochs=3, keep_every=2, save_every=5))
    assert sorted(p.name for p in run_dir.glob("checkpoint-*.pth")) == ["checkpoint-2.pth", "checkpoint-last.pth"]
    epoch2, last = load_checkpoint(run_dir / "checkpoint-2.pth"), load_checkpoint(run_dir / "checkpoint-last.pth")
    assert (epoch2["epoch"], last["epoch"]) == (2, 3)
    assert not all(torch.equal(epoch2["model"][k], last["model"][k]) for k in last["model"])


def test_a_kill_between_saving_and_keeping_an_epoch_is_mended_on_resume(image_root, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_keep = Trainer._keep

    def killed(self, kept):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_keep", killed)
    with pytest.raises(KeyboardInterrupt):
        train(_config_for(image_root, run_dir, epochs=4, keep_every=2, save_every=5))
    assert load_checkpoint(run_dir / "checkpoint-last.pth")["epoch"] == 2 and not (run_dir / "checkpoint-2.pth").exists()
    at_kill = load_checkpoint(run_dir / "checkpoint-last.pth")["model"]

    monkeypatch.setattr(Trainer, "_keep", real_keep)
    train(_config_for(image_root, run_dir, epochs=4, keep_every=2, save_every=5))
    assert sorted(p.name for p in run_dir.glob("checkpoint-*.pth")) == [
        "checkpoint-2.pth", "checkpoint-4.pth", "checkpoint-last.pth"]
    epoch2 = load_checkpoint(run_dir / "checkpoint-2.pth")
    assert epoch2["epoch"] == 2 and all(torch.equal(epoch2["model"][k], at_kill[k]) for k in at_kill)


def test_kept_checkpoints_fall_back_to_a_copy_where_hard_links_fail(image_root, tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError("hard links are not supported here")

    monkeypatch.setattr(engine.os, "link", no_links)
    run_dir = tmp_path / "run"
    train(_config_for(image_root, run_dir, epochs=2, keep_every=1, save_every=5))
    assert [load_checkpoint(run_dir / f"checkpoint-{e}.pth")["epoch"] for e in (1, 2)] == [1, 2]
    assert not list(run_dir.glob(".*tmp*"))


def test_unreadable_images_are_skipped_named_and_counted_up_to_max_failures(image_root, tmp_path, monkeypatch):
    monkeypatch.setenv("AGMAE_HOME", str(tmp_path / "home"))
    data = tmp_path / "data" / "train"
    shutil.copytree(image_root, data)
    bad = add_unreadable_images(data, next(data.glob("cat/*.png")))
    index = scan(data)
    status = np.array([store.STATUS_FAILED if key in bad else store.STATUS_DONE for key in index.keys], np.uint8)
    maps = _write_store(tmp_path / "maps.h5", index.keys, np.random.default_rng(0).random((len(index), *GRID),
                                                                                          dtype=np.float32), status)
    # discovery recorded these files as failed; the store stays usable, no rediscovery needed
    record = train(_config_for(data, tmp_path / "run", maps, epochs=1, max_failures=0.5))
    assert record["unreadable_skipped"] == len(bad) and set(record["unreadable_examples"]) <= set(bad)
    assert _metrics(tmp_path / "run")[0]["unreadable_skipped"] == len(bad)
    with pytest.raises(ValueError, match=r"4 of 20 images cannot be read .*bad/.*--max-failures"):
        train(_config_for(data, tmp_path / "strict", maps, epochs=1))
    assert not (tmp_path / "strict" / "checkpoint-last.pth").exists()


def test_an_image_that_breaks_after_the_check_is_skipped_not_fatal(image_root, tmp_path, monkeypatch):
    monkeypatch.setenv("AGMAE_HOME", str(tmp_path / "home"))
    data = tmp_path / "data" / "train"
    shutil.copytree(image_root, data)
    trainer = Trainer(_config_for(data, tmp_path / "run", epochs=1, workers=0), *engine.distributed.init("cpu"))
    broken = data / scan(data).keys[0]
    broken.write_bytes(b"")  # e.g. a network file system losing a file mid-run
    record = trainer.run()
    assert record["unreadable_skipped"] == 1 and record["unreadable_examples"] == [scan(data).keys[0]]


@pytest.mark.parametrize("change, flag, ours", [
    (dict(tau_start=2.0), "--tau-start", "2.0"), (dict(mask_ratio=0.6), "--mask-ratio", "0.6"),
    (dict(seed=1), "--seed", "1"), (dict(blr=2e-3), "--blr", "0.002"), (dict(epochs=2), "--epochs", "2"),
])
def test_a_rerun_with_other_settings_is_refused_and_the_record_stays_true(image_root, maps_file, tmp_path,
                                                                          change, flag, ours):
    run = tmp_path / "run"
    train(_config_for(image_root, run, maps_file, epochs=1))
    recorded = (run / "config.json").read_text()
    with pytest.raises(ValueError) as err:
        train(_config_for(image_root, run, maps_file, **{"epochs": 1, **change}))
    assert f"was trained with {flag} " in str(err.value) and f"this run has {ours}" in str(err.value)
    assert "another --out" in str(err.value)
    assert (run / "config.json").read_text() == recorded
    # settings that do not change what is computed (auto and fp32 are both float32 on a CPU), and identical
    # settings: nothing to train
    assert train(_config_for(image_root, run, maps_file, epochs=1, workers=1, save_every=3, precision="fp32")) is None
    assert json.loads((run / "config.json").read_text())["tau_start"] == 1.0


@pytest.mark.parametrize("fault, message", [
    (errno.ENOSPC, "No space left on device; free space"),
    (errno.EROFS, "Read-only file system; the file system is read-only; write to another --out"),
])
def test_a_full_or_read_only_disk_while_saving_is_one_line_and_leaves_no_checkpoint_that_looks_complete(
        fault, message, image_root, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def failing(obj, path):
        raise OSError(fault, os.strerror(fault), str(path))

    monkeypatch.setattr(engine, "atomic_save", failing)
    args = ["--no-guidance", "--data", str(image_root.parent), "--out", str(run), "--epochs", "2", "--warmup-epochs", "1",
            "--batch-size", "4", "--blr", "1e-3", "--workers", "0", "--model", "mae_vit_demo_patch8",
            *(arg for name, value in TINY_MODEL.items() for arg in (f"--{name.replace('_', '-')}", str(value)))]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 1 and f"checkpoint-last.pth: {message}" in result.output
    assert "Traceback" not in result.output and not (run / "checkpoint-last.pth").exists()


_PREEMPTED_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
import agmae.train.engine as engine
from agmae import preemption
cfg = engine.TrainConfig(**eval(sys.argv[1]))
real_loss, calls = engine.guided_mae_loss, []

def loss_then_wait_for_the_signal(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(sys.argv[2]):
        open(sys.argv[3], "w").close()
        while not preemption.requested():
            time.sleep(0.01)
    return real_loss(*args, **kwargs)

engine.guided_mae_loss = loss_then_wait_for_the_signal
engine.train(cfg)
"""


@pytest.fixture
def one_thread():
    """Torch on one thread, as in the signalled subprocess: a matmul's rounding depends on the thread count, so a run
    compared bit for bit with the subprocess's must use the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _signal_when_ready(command, ready, number, timeout=180, env=None):
    """Run `command`, send it signal `number` once it creates file `ready`; its (exit code, output)."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**(env or os.environ), "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if ready.exists():
        os.kill(process.pid, number)
    try:
        output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, output


def test_sigterm_saves_mid_epoch_and_the_resumed_run_ends_bit_identical(image_root, maps_file, tmp_path, one_thread):
    cfg = _config_for(image_root, tmp_path / "whole", maps_file, accum_iter=2, batch_size=2, workers=2,
                      save_every=5)
    train(cfg)
    preempted = replace(cfg, out=str(tmp_path / "preempted"))
    # the signal arrives in the 11th micro-batch, the 3rd of epoch 2 (8 per epoch, 2 per optimizer step): the run
    # finishes that step (the 4th micro-batch) and saves
    code, output = _signal_when_ready([sys.executable, "-c", _PREEMPTED_SCRIPT, repr(preempted.__dict__), "11",
                                       str(tmp_path / "ready")], tmp_path / "ready", signal.SIGTERM)
    assert code == preemption.PREEMPTED == 75, output
    assert f"SIGTERM: saved {tmp_path / 'preempted' / 'checkpoint-last.pth'} at epoch 2, micro-batch 4" in output
    saved = load_checkpoint(tmp_path / "preempted" / "checkpoint-last.pth")
    assert (saved["epoch"], saved["sampler"]["samples"], saved["step"]) == (1, 8, 6)
    train(preempted)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "preempted")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(tmp_path / "whole", timing=False) == _metrics(tmp_path / "preempted", timing=False)


def test_a_second_training_into_the_same_out_is_refused_and_a_dead_holder_blocks_nothing(image_root, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom agmae import distributed, training\n"
         "with training.hold_run_dir(sys.argv[1], distributed.DistEnv(), 'agmae-train'):\n"
         "    print('holding', flush=True)\n    time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        args = ["--no-guidance", "--data", str(image_root.parent), "--out", str(run), "--epochs", "1",
                "--warmup-epochs", "0", "--batch-size", "4", "--workers", "0", "--device", "cpu",
                "--model", "mae_vit_demo_patch8",
                *(arg for name, value in TINY_MODEL.items() for arg in (f"--{name.replace('_', '-')}", str(value)))]
        refused = CliRunner().invoke(train_cli, args)
        assert refused.exit_code == 1 and refused.output.count("\n") == 1, refused.output
        assert (f"{run}: agmae-train (PID {holder.pid} on {socket.gethostname()}) is writing this run directory"
                in refused.output) and "another --out" in refused.output
        assert not (run / "checkpoint-last.pth").exists()
    finally:
        holder.kill()  # a crash: the kernel releases its lock
        holder.wait()
    assert CliRunner().invoke(train_cli, args).exit_code == 0
    assert load_checkpoint(run / "checkpoint-last.pth")["epoch"] == 1


def test_a_diverging_loss_stops_the_run_before_it_can_save_and_names_the_fix(image_root, tmp_path, monkeypatch):
    cfg = _config_for(image_root, tmp_path, epochs=6, save_every=1)
    real_loss, calls = engine.guided_mae_loss, []

    def running_away_in_epoch_five(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * 3.0 ** max(len(calls) - 16, 0)  # finite, tripling per step from the 17th

    monkeypatch.setattr(engine, "guided_mae_loss", running_away_in_epoch_five)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg)
    assert re.match(r"loss is diverging at epoch 5, step 1[89]: its running mean \S+ is over 10x its lowest, "
                    r"\S+, and over its start, \S+ \(this step's loss \S+\); stopped without saving, .*checkpoint-last.pth is the last good "
                    r"state; lower --blr or set --clip-grad$", str(err.value)), str(err.value)
    saved = load_checkpoint(tmp_path / "checkpoint-last.pth")
    assert saved["epoch"] == 4 and max(m["loss"] for m in _metrics(tmp_path)) < 2 * _metrics(tmp_path)[0]["loss"]


_LOST_BATCHES_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from agmae import distributed
import agmae.train.engine as engine
cfg = engine.TrainConfig(**eval(sys.argv[1]))
env, device = distributed.init("cpu")
trainer = engine.Trainer(cfg, env, device)
if env.rank == 1:  # every image of this rank's micro-batches became unreadable after the check
    trainer.loader.dataset.__class__.__getitem__ = lambda self, item: {"unreadable": f"lost-{item[1]}"}
record = trainer.run()
torch.save({"weights": trainer.model.state_dict(), "record": record}, sys.argv[2])
distributed.shutdown()
"""


def test_a_rank_whose_micro_batches_are_all_unreadable_joins_every_collective(image_root, maps_file, tmp_path):
    cfg = _config_for(image_root, tmp_path / "ddp", maps_file, epochs=1, warmup_epochs=0, accum_iter=2,
                      batch_size=2, verify_images=False)
    ranks = _two_gloo_ranks(_LOST_BATCHES_SCRIPT, cfg, tmp_path)
    try:
        outputs = [process.communicate(timeout=120)[0] for process in ranks]  # a hang fails here
    finally:
        for process in ranks:
            process.kill()
    assert [process.returncode for process in ranks] == [0, 0], outputs
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    initial = _initial_weights(cfg)
    assert not torch.equal(rank0["weights"]["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
    record = rank0["record"]
    # 16 images, 2 ranks x batch 2 x 2 micro-batches: 2 steps, rank 1's 8 images lost, rank 0's trained
    assert (record["step"], record["unreadable_skipped"]) == (2, 8) and np.isfinite(record["loss"]) and record["loss"] > 0


@pytest.mark.parametrize("change, message", [
    (dict(mask_ratio=0.999), r"--mask-ratio 0.999 keeps int\(16 x 0.001\) = 0 of the model's 16 patches visible"),
    (dict(warmup_epochs=4), r"--warmup-epochs 4 is longer than the run's --epochs 3"),
])
def test_option_combinations_that_only_fail_together_are_refused_before_training(change, message, image_root,
                                                                                   tmp_path):
    with pytest.raises(ValueError, match=message):
        train(_config_for(image_root, tmp_path / "run", **change))
    assert not (tmp_path / "run" / "checkpoint-last.pth").exists()


def test_a_recipe_warm_up_longer_than_the_run_keeps_its_share_and_says_so(image_root, tmp_path, capsys):
    train(_config_for(image_root, tmp_path, epochs=2, warmup_epochs=None))  # MAE's recipe: 40 of 800 epochs
    assert json.loads((tmp_path / "config.json").read_text())["warmup_epochs"] == 0.1
    assert "--warmup-epochs 0.1: the recipe's 40 would outlast --epochs 2" in capsys.readouterr().out


def test_export_carries_the_kwargs_inside_and_refuses_an_out_under_a_file_in_one_line(image_root, tmp_path):
    train(_config_for(image_root, tmp_path / "run", epochs=1))
    checkpoint = tmp_path / "run" / "checkpoint-last.pth"
    config = load_checkpoint(checkpoint)["config"]
    assert load_mae(checkpoint).encoder_kwargs == config["encoder"]  # the training checkpoint rebuilds its MAE
    exported = export_encoder(checkpoint, tmp_path / "vit.pth")
    (tmp_path / "vit.pth.json").unlink()  # the file alone is enough
    kwargs, state = load_encoder(exported)
    assert kwargs == config["encoder"]
    VisionTransformer(**kwargs, num_classes=0).load_state_dict(torch.load(exported, weights_only=True))
    (tmp_path / "plain").write_text("a file")
    result = CliRunner().invoke(train_cli, ["export", "--checkpoint", str(checkpoint),
                                            "--out", str(tmp_path / "plain" / "vit.pth")])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert f"{tmp_path / 'plain'} is a file, not a directory" in result.output


def test_train_sbatch_requeues_the_job_when_the_tasks_were_preempted(tmp_path):
    env, log = _stub_slurm(tmp_path, "agmae-train")
    bin_dir = tmp_path / "bin"
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "srun $*" >> {log}\nexit 75\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\n[ "$1" = requeue ] && echo "scontrol $*" >> {log}\n'
                                      "printf 'node7\\nnode8\\n'\n")
    result = subprocess.run(["bash", str(REPO / "pipeline" / "train.sbatch"), "--out", "RUN"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 75
    assert log.read_text().splitlines()[-1] == "scontrol requeue 12345"
    assert "#SBATCH --signal=USR1@120" in (REPO / "pipeline" / "train.sbatch").read_text()


def test_discover_sbatch_passes_the_warning_signal_to_its_shard_and_requeues_it(tmp_path):
    env, log = _stub_slurm(tmp_path, "agmae-discover")
    bin_dir, ready = tmp_path / "bin", tmp_path / "ready"
    (bin_dir / "agmae-discover").write_text(f"#!/bin/bash\ntrap 'echo saved >> {log}; exit 75' USR1\n"
                                            f"touch {ready}\nwhile true; do sleep 0.05; done\n")
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "scontrol $*" >> {log}\n')
    env.update(SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_JOB_ID="777")
    code, output = _signal_when_ready(["bash", str(REPO / "pipeline" / "discover.sbatch"), "--method", "dino"],
                                      ready, signal.SIGUSR1, timeout=30, env=env)
    assert code == 75, output
    assert log.read_text().splitlines() == ["saved", "scontrol requeue 777_2"]


def test_the_command_line_exits_with_the_preempted_code(image_root, tmp_path, monkeypatch):
    def preempted(cfg):
        raise preemption.Preempted("SIGTERM: saved RUN/checkpoint-last.pth")

    monkeypatch.setattr(engine, "train", preempted)
    result = CliRunner().invoke(train_cli, ["--no-guidance", "--data", str(image_root.parent), "--out", str(tmp_path)])
    assert result.exit_code == preemption.PREEMPTED
