"""Checkpoints are atomic (a crash mid-save never breaks `latest`) and restore state exactly."""

import json
import multiprocessing
import os
import random
import signal
import time

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from adatok_vlm.training.checkpointing import CheckpointManager


def _objects(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def test_save_load_restores_modules_optimizer_rng_and_state(tmp_path):
    model, opt = _objects()
    manager = CheckpointManager(tmp_path, {"model": model}, {"optimizer": opt})
    torch.manual_seed(5); random.seed(5); np.random.seed(5)
    path = manager.save(7, {"epoch": 1, "batch": 3})
    expected = (torch.rand(3), random.random(), np.random.rand())
    model2, opt2 = _objects(seed=1)
    torch.manual_seed(99); random.seed(99); np.random.seed(99)
    state = CheckpointManager(tmp_path, {"model": model2}, {"optimizer": opt2}).load()
    assert state == {"epoch": 1, "batch": 3, "step": 7}
    assert path.name == "step-00000007"
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for name in s1["state"][k]:
            assert torch.equal(torch.as_tensor(s1["state"][k][name]), torch.as_tensor(s2["state"][k][name]))
    assert s1["param_groups"] == s2["param_groups"]
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and got[2] == expected[2]
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.bin")), "no pickles written"


def test_failure_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _objects()
    manager = CheckpointManager(tmp_path, {"model": model}, {"optimizer": opt})
    manager.save(1, {})
    import adatok_vlm.training.checkpointing as ckpt

    real = ckpt.save_file
    calls = {"n": 0}

    def failing(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(OSError) as info:
        manager.save(2, {})
    assert isinstance(info.value, ckpt.CheckpointWriteError) and info.value.errno == 28
    assert info.value.filename.endswith(".safetensors") and Path(info.value.filename).name in str(info.value)
    assert manager.latest().name == "step-00000001"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*")), "the partial folder is removed"
    assert manager.load()["step"] == 1


def test_pruning_keeps_the_newest(tmp_path):
    model, opt = _objects()
    manager = CheckpointManager(tmp_path, {"model": model}, {"optimizer": opt}, keep=2)
    for step in (1, 2, 3, 4):
        manager.save(step, {})
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-00000003", "step-00000004"]


def _writer(folder: str, conn) -> None:
    """Saves checkpoints of a ~4 MB model forever, each step's weights all equal to the step, and sends the
    step after each save."""
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(16)])   # ~4 MB per save
    opt = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(folder, {"model": model}, {"optimizer": opt}, keep=3)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        manager.save(step, {"marker": step})
        conn.send(step)


@pytest.mark.timeout(600)
def test_kill_9_during_saves_leaves_a_loadable_latest(tmp_path):
    # The writer is a forked process: a real process, SIGKILLed mid-save, that starts from this process's
    # imports instead of re-importing torch and adatok_vlm (~10 s of CPU per trial on the shared cores).
    fork = multiprocessing.get_context("fork")
    rng = random.Random(0)
    for trial in range(3):
        out = tmp_path / f"run{trial}"
        receive, send = fork.Pipe(duplex=False)
        proc = fork.Process(target=_writer, args=(str(out), send), daemon=True)
        proc.start()
        send.close()
        assert receive.poll(120) and receive.recv() == 1          # at least one complete save
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        receive.close()
        model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(16)])
        opt = torch.optim.AdamW(model.parameters())
        resumed = CheckpointManager(out, {"model": model}, {"optimizer": opt}, keep=3)
        state = resumed.load()
        step = state["marker"]
        assert all(torch.all(p == step) for p in model.parameters()), "weights match the step they claim"
        assert resumed.verify(resumed.latest())["files"]["model.safetensors"]["size"] > 4_000_000, "it has a manifest"
        resumed.save(step + 1, {"marker": step + 1})
        assert not list((out / "checkpoints").glob(".tmp-*")), "the killed writer's partial folder is cleared"
