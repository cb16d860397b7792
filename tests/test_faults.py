"""Faults a long run meets, tried for real (issue 9): kill -9, a full disk, a NaN/inf loss, vanishing data.

* ``kill -9`` of the stage-1 trainer at random steps, three times in one run, each time continued with
  ``--resume auto``: the final weights equal an uninterrupted run's bit for bit (CPU, fixed seed).
* A full disk (``OSError(ENOSPC)``) in the middle of writing a checkpoint: training stops with the
  error, the previous checkpoint stays ``latest`` and loadable, and resuming after it gives the same
  final weights as a run that never failed.
* A NaN or inf loss: training stops naming the step, with a checkpoint of that step.
* Image files that disappear mid-epoch are skipped and counted (``unreadable``); a data set whose folder
  disappears stops with a ``FileNotFoundError`` that says so.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adatok_vlm.training.checkpointing import CheckpointManager
from adatok_vlm.training.config import fill_dataclass
from adatok_vlm.training.engine import NonFiniteLossError
from adatok_vlm.training.train_tokenizer import TokenizerTrainingConfig, train

SMALL_MODEL = {"preset": "adatok-tiny", "hidden_size": 32, "decoder_hidden_size": 32, "num_attention_heads": 2,
               "decoder_num_attention_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
               "num_latent_tokens": 8}
MAX_STEPS = 60


def raw_config(out_dir, **train_overrides) -> dict:
    return {
        "model": dict(SMALL_MODEL),
        "data": {"dataset": "natural_crops", "num_crops": 64, "preload": True},
        "train": {"output_dir": str(out_dir), "max_steps": MAX_STEPS, "batch_size": 8, "lr": 1e-3,
                  "warmup_steps": 0, "lr_schedule": "constant", "log_every": 1, "sample_every": 0, "save_every": 1,
                  "seed": 3, "num_threads": 1, "export": False, **train_overrides},
    }


def config(out_dir, **train_overrides) -> TokenizerTrainingConfig:
    return fill_dataclass(TokenizerTrainingConfig, raw_config(out_dir, **train_overrides))


def command_line(raw: dict) -> list[str]:
    flags = []
    for section, values in raw.items():
        for key, value in values.items():
            flags += [f"--{section}.{key}", json.dumps(value)]
    return [sys.executable, "-m", "adatok_vlm.training.train_tokenizer", *flags]


def final_weights(out_dir: Path, step: int = MAX_STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private ADATOK_CACHE (the preloaded crops), shared by the runs of one test and their subprocesses."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ADATOK_CACHE", str(root))
    return root


def last_logged_step(log: Path) -> int:
    if not log.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


# ============================================================================================
# kill -9, three times, then the weights of an uninterrupted run
# ============================================================================================
@pytest.mark.timeout(300)
def test_kill_9_at_random_steps_then_resume_gives_the_uninterrupted_weights(tmp_path, cache, capsys):
    straight = tmp_path / "straight"
    train(config(straight))
    expected = final_weights(straight)

    out = tmp_path / "killed"
    raw = raw_config(out, resume="auto")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = random.Random(0)
    kills = []
    for _ in range(3):
        start = last_logged_step(out / "log.jsonl")
        target = start + rng.randint(3, 12)
        proc = subprocess.Popen(command_line(raw), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while last_logged_step(out / "log.jsonl") < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the kill at step {target}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reached = last_logged_step(out / "log.jsonl")
        resumable = CheckpointManager(out, {}, {}).latest()
        assert resumable is not None, "a complete checkpoint survives the kill"
        kills.append({"target": target, "killed_after_step": reached, "latest_checkpoint": resumable.name})
        # Nothing after the last complete checkpoint is lost beyond the steps since it.
        assert int(resumable.name.split("-")[1]) >= reached - 1
    done = subprocess.run(command_line(raw), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    assert_same_weights(final_weights(out), expected)
    assert not list((out / "checkpoints").glob(".tmp-*")), "no partial checkpoint is left behind"
    with capsys.disabled():
        print(f"\nkill -9 test: {len(kills)} kills at steps "
              f"{[k['killed_after_step'] for k in kills]} (resumed from "
              f"{[k['latest_checkpoint'] for k in kills]}), final weights equal the uninterrupted run's")


# ============================================================================================
# a full disk in the middle of a checkpoint
# ============================================================================================
@pytest.mark.parametrize("fail_on", ["model.safetensors", "optimizer.optim.safetensors", "rng.safetensors"])
def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, cache, monkeypatch, fail_on):
    import adatok_vlm.training.checkpointing as checkpointing

    steps = 6
    straight = tmp_path / "straight"
    train(config(straight, max_steps=steps, save_every=2))

    out = tmp_path / "full"
    real_save_file = checkpointing.save_file

    def disk_full_at_step_4(tensors, path):
        if f"step-{4:08d}" in path and path.endswith(fail_on):
            real_save_file(tensors, path)                       # a partial file on disk, then the failure
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save_file(tensors, path)

    monkeypatch.setattr(checkpointing, "save_file", disk_full_at_step_4)
    with pytest.raises(OSError) as info:
        train(config(out, max_steps=steps, save_every=2))
    assert info.value.errno == errno.ENOSPC
    manager = CheckpointManager(out, {"model": torch.nn.Module()}, {})
    assert manager.latest().name == "step-00000002", "the previous checkpoint is still the latest"
    assert not list((out / "checkpoints").glob(".tmp-*")), "the partial checkpoint is removed"
    assert not (out / "checkpoints" / "step-00000004").exists()
    state = json.loads((manager.latest() / "trainer_state.json").read_text())
    assert state["step"] == 2
    load_file(str(manager.latest() / "model.safetensors"))      # loadable

    monkeypatch.setattr(checkpointing, "save_file", real_save_file)   # disk space freed
    train(config(out, max_steps=steps, save_every=2, resume="auto"))
    assert_same_weights(final_weights(out, steps), final_weights(straight, steps))


# ============================================================================================
# non-finite losses
# ============================================================================================
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_loss_stops_with_the_step_and_a_loadable_checkpoint(tmp_path, cache, monkeypatch, poison):
    from adatok_vlm.tokenizer import modeling_adatok

    real_forward = modeling_adatok.AdaTokModel.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            out.loss = out.loss * poison
        return out

    monkeypatch.setattr(modeling_adatok.AdaTokModel, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 4") as info:
        train(config(tmp_path, max_steps=8, save_every=0))
    assert info.value.step == 4
    checkpoint = Path(info.value.checkpoint)
    assert checkpoint.name == "step-00000004"
    monkeypatch.setattr(modeling_adatok.AdaTokModel, "forward", real_forward)
    from adatok_vlm.tokenizer import AdaTokModel
    from adatok_vlm.training.train_tokenizer import build_model_config

    model = AdaTokModel(build_model_config(SMALL_MODEL))
    state = CheckpointManager(tmp_path, {"model": model}, {}).load(checkpoint, restore_rng=False)
    assert state["step"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the saved weights are the last finite ones"


# ============================================================================================
# data that disappears mid-epoch
# ============================================================================================
def _folder(root: Path, count: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        label = "ab"[i % 2]
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / label / f"{i:02d}.png")
    return root


def test_files_that_disappear_mid_epoch_are_skipped_and_counted(tmp_path):
    from adatok_vlm import AdaTokImageProcessor
    from adatok_vlm.training.data import SkipCounter, build_dataloader, load_image_dataset

    root = _folder(tmp_path / "images")
    (root / "a" / "junk.png").write_bytes(b"")                                   # zero bytes
    (root / "b" / "notes.png").write_text("not a picture")                       # not an image
    good = (root / "a" / "00.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(good[: len(good) // 2])                 # truncated
    ds = load_image_dataset(root, cache_dir=tmp_path / "hf")
    loader = build_dataloader(ds, AdaTokImageProcessor(size=8), batch_size=3, shuffle=False, seed=0)
    counter, seen = SkipCounter(), 0
    for i, batch in enumerate(loader):
        counter.update(batch)
        seen += batch["pixel_values"].shape[0]
        if i == 0:       # after the first batch, four not-yet-read images vanish
            for name in ("a/06.png", "a/08.png", "b/09.png", "b/11.png"):
                (root / name).unlink()
    counts = counter.as_dict()
    assert counts == {"empty_file": 1, "not_an_image": 1, "truncated": 1, "unreadable": 4}, counts
    assert seen + counter.total == len(ds) == 15
    assert "unreadable=4" in counter.summary() and "skipped images: 7" in counter.summary()


def test_a_data_set_that_disappears_mid_epoch_stops_with_a_clear_error(tmp_path):
    import shutil

    from adatok_vlm import AdaTokImageProcessor
    from adatok_vlm.training.data import build_dataloader, load_image_dataset

    root = _folder(tmp_path / "images")
    ds = load_image_dataset(root, cache_dir=tmp_path / "hf")
    loader = build_dataloader(ds, AdaTokImageProcessor(size=8), batch_size=4, shuffle=False, seed=0)
    batches = iter(loader)
    assert next(batches)["pixel_values"].shape[0] == 4
    shutil.rmtree(root)                                                           # unmounted, deleted...
    with pytest.raises(FileNotFoundError, match="disappeared"):
        next(batches)


def test_training_skips_a_batch_whose_every_image_is_unreadable(tmp_path):
    """Streaming data (``preload false``), batch size 1, half the files broken: the broken batches are
    empty after collation; training skips them, counts them and still takes every step it was asked for."""
    root = _folder(tmp_path / "images", count=4)
    for i in range(4):
        (root / "ab"[i % 2] / f"bad{i}.png").write_bytes(b"")
    raw = raw_config(tmp_path / "run", max_steps=6, batch_size=1, save_every=0)
    raw["data"] = {"dataset": str(root), "preload": False, "num_workers": 0}
    summary = train(fill_dataclass(TokenizerTrainingConfig, raw))
    assert summary["steps"] == 6
    state = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())
    assert state["skipped_images"] >= 1 and state["step"] == 6


# ============================================================================================
# the output folder is claimed before anything is built
# ============================================================================================
def test_the_output_folder_is_claimed_before_the_stage_is_built(tmp_path, cache, monkeypatch):
    """A run into a folder another run holds, or into a finished run's folder without ``--resume``, stops
    before its stage computes anything (stage 2 measures a whole reward table in its constructor)."""
    from adatok_vlm.training import train_tokenizer
    from adatok_vlm.training.checkpointing import (LOCK_FILE, OutputDirLock, OutputDirLockedError,
                                                   OutputDirNotEmptyError)

    built = []
    real_init = train_tokenizer.TokenizerStage.__init__

    def recording_init(self, *args, **kwargs):
        built.append((tmp_path / "run" / LOCK_FILE).is_file())   # is the run's lock already taken?
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(train_tokenizer.TokenizerStage, "__init__", recording_init)
    holder = OutputDirLock(tmp_path / "run")
    holder.acquire()
    try:
        with pytest.raises(OutputDirLockedError):
            train(config(tmp_path / "run", max_steps=2, save_every=0))
    finally:
        holder.release()
    assert built == [], "the stage was built before the folder was claimed"

    train(config(tmp_path / "run", max_steps=2, save_every=0))
    assert built == [True], "the stage was built before the lock was taken"
    with pytest.raises(OutputDirNotEmptyError):
        train(config(tmp_path / "run", max_steps=2, save_every=0))
    assert len(built) == 1, "a refused fresh run built nothing"
