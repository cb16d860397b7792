"""Checkpoints that verify themselves and output folders that are owned (issue 20, items 1 and 2).

Every case uses the real ``CheckpointManager`` with small real modules and optimizers and damages real
files on disk: each kind of damage makes ``latest()`` / ``load()`` walk back to the previous good
checkpoint with a warning naming the skipped one (which stays on disk), and an explicit ``load`` of the
damaged one raises ``CheckpointCorruptError`` naming the file and the failed check. A full disk is an
``OSError`` subclass naming the file with the previous checkpoint intact; the output-folder lock, the
refusal to start a fresh run over another one, and pruning that spares other runs' folders are tried
with two managers (and two processes) on one folder.
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import adatok_vlm.training.checkpointing as checkpointing
from adatok_vlm.training.checkpointing import (LOCK_FILE, MANIFEST, CheckpointCorruptError, CheckpointManager,
                                               CheckpointSkippedWarning, CheckpointWriteError, OutputDirLockedError,
                                               OutputDirNotEmptyError, verify_checkpoint)

CONFIG = {"hidden_size": 16, "num_layers": 2, "vision": {"patch_size": 4}, "transformers_version": "x"}


def objects(hidden: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def train_step(model, opt):
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    opt.zero_grad()


def manager(out, model, opt, **kw) -> CheckpointManager:
    return CheckpointManager(out, {"model": model}, {"optimizer": opt}, keep=5, **kw)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def two_checkpoints(tmp_path):
    """step-1 and step-2 of one run, and the weights each holds."""
    model, opt = objects()
    ckpt = manager(tmp_path, model, opt, model_config=CONFIG)
    saved = {}
    for step in (1, 2):
        train_step(model, opt)
        ckpt.save(step, {"marker": step})
        saved[step] = weights(model)
    return tmp_path, saved


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


# each damage: (file, how, the check that must fail)
def _truncate(file: Path):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _zero(file: Path):
    file.write_bytes(b"")


def _random_same_size(file: Path):
    file.write_bytes(os.urandom(file.stat().st_size))


def _delete(file: Path):
    file.unlink()


DAMAGES = {
    "model zero-byte": ("model.safetensors", _zero, "size"),
    "model truncated": ("model.safetensors", _truncate, "size"),
    "model random bytes": ("model.safetensors", _random_same_size, "checksum"),
    "optimizer truncated": ("optimizer.optim.safetensors", _truncate, "size"),
    "optimizer json truncated": ("optimizer.optim.json", _truncate, "size"),
    "rng truncated": ("rng.safetensors", _truncate, "size"),
    "rng json truncated": ("rng.json", _truncate, "size"),
    "trainer_state truncated": ("trainer_state.json", _truncate, "size"),
    "model missing": ("model.safetensors", _delete, "missing"),
    "trainer_state missing": ("trainer_state.json", _delete, "missing"),
    "manifest truncated": (MANIFEST, _truncate, "unreadable JSON"),
}


# ============================================================================================
# the manifest
# ============================================================================================
def test_the_manifest_records_size_and_crc32_of_every_file_and_the_model_config(two_checkpoints):
    out, _ = two_checkpoints
    folder = checkpoint(out, 2)
    manifest = json.loads((folder / MANIFEST).read_text())
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    assert {"model.safetensors", "optimizer.optim.safetensors", "rng.json", "trainer_state.json"} <= set(on_disk)
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name
    assert manifest["model_config"] == CONFIG
    assert verify_checkpoint(folder) == manifest


class ShardedEngine:
    """A stand-in for a DeepSpeed engine (not available on CPU here): every 'rank' writes its own shard
    file into ``<step>/<tag>/``, as ``engine.save_checkpoint`` does, and reads it back on load."""

    def __init__(self, ranks: int = 2):
        self.ranks = ranks
        self.loaded_from = None

    def save_checkpoint(self, folder, tag, save_latest):
        (Path(folder) / tag).mkdir(parents=True, exist_ok=True)
        for rank in range(self.ranks):
            save_file({"shard": torch.full((64,), float(rank))},
                      str(Path(folder) / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.safetensors"))

    def load_checkpoint(self, folder, tag, **kwargs):
        for rank in range(self.ranks):
            load_file(str(Path(folder) / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.safetensors"))
        self.loaded_from = folder
        return folder, {}


def test_engine_shards_written_by_other_ranks_are_in_the_manifest_and_verified(tmp_path):
    engine = ShardedEngine()
    ckpt = CheckpointManager(tmp_path, {}, {}, keep=5, engines={"model": engine})
    for step in (1, 2):
        ckpt.save(step, {})
    manifest = json.loads((checkpoint(tmp_path, 2) / MANIFEST).read_text())
    shard = "model/zero_pp_rank_1_mp_rank_00_optim_states.safetensors"
    assert shard in manifest["files"] and "rng-rank00000.safetensors" in manifest["files"]
    _random_same_size(checkpoint(tmp_path, 2) / shard)
    with pytest.warns(CheckpointSkippedWarning, match=r"step-00000002.*zero_pp_rank_1.*checksum"):
        assert ckpt.latest() == checkpoint(tmp_path, 1)
    with pytest.warns(CheckpointSkippedWarning, match="zero_pp_rank_1"):
        assert ckpt.load()["step"] == 1 and engine.loaded_from == str(checkpoint(tmp_path, 1))
    with pytest.raises(CheckpointCorruptError, match="zero_pp_rank_1") as info:
        ckpt.load(checkpoint(tmp_path, 2))
    assert info.value.check == "checksum" and info.value.filename.endswith(shard)


# ============================================================================================
# each kind of damage: walk back with a warning; an explicit load names the file and the check
# ============================================================================================
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_skipped_and_an_explicit_load_names_the_file(two_checkpoints, damage):
    out, saved = two_checkpoints
    name, how, check = DAMAGES[damage]
    bad = checkpoint(out, 2)
    how(bad / name)
    before = sorted((p.name, p.stat().st_size) for p in bad.iterdir())

    model, opt = objects(seed=7)
    ckpt = manager(out, model, opt, model_config=CONFIG)
    with pytest.warns(CheckpointSkippedWarning, match=rf"step-00000002.*{name}.*using .*step-00000001"):
        assert ckpt.latest() == checkpoint(out, 1)
    with pytest.warns(CheckpointSkippedWarning, match="step-00000002"):
        state = ckpt.load()                       # what --resume auto does
    assert state == {"marker": 1, "step": 1}
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[1][key]), key
    assert sorted((p.name, p.stat().st_size) for p in bad.iterdir()) == before, "the damaged one is left as it was"

    with pytest.raises(CheckpointCorruptError) as info:
        manager(out, *objects(seed=8)).load(bad)
    assert info.value.check == check
    assert info.value.filename == str(bad / name) and name in str(info.value)
    assert isinstance(info.value, OSError)
    if check == "missing":
        assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("pointer", [random.Random(0).randbytes(64), b"\xff\xfe\x00garbage", b"../../etc",
                                     b"step-00000009\n", b""],
                         ids=["random-bytes", "utf16-bom", "dotdot", "old-name", "empty"])
def test_a_garbage_latest_pointer_falls_back_to_the_newest_good_checkpoint(two_checkpoints, pointer):
    out, saved = two_checkpoints
    (out / "checkpoints" / "latest").write_bytes(pointer)
    model, opt = objects(seed=7)
    ckpt = manager(out, model, opt)
    with pytest.warns(CheckpointSkippedWarning, match=r"bad latest pointer.*using .*step-00000002"):
        assert ckpt.latest() == checkpoint(out, 2)
    _truncate(checkpoint(out, 2) / "model.safetensors")          # and with the newest damaged too
    with pytest.warns(CheckpointSkippedWarning) as record:
        assert ckpt.load()["step"] == 1
    messages = " | ".join(str(w.message) for w in record)
    assert "bad latest pointer" in messages and "step-00000002" in messages
    assert torch.equal(model[0].weight, saved[1]["0.weight"])
    assert (out / "checkpoints" / "latest").read_bytes() == pointer, "the pointer is left for inspection"


def test_a_checkpoint_without_a_manifest_still_gets_structural_checks(two_checkpoints):
    """Folders written before manifests load as before, and damage in them still names the file."""
    out, _ = two_checkpoints
    for step in (1, 2):
        (checkpoint(out, step) / MANIFEST).unlink()
    ckpt = manager(out, *objects(seed=3))
    assert ckpt.latest() == checkpoint(out, 2)
    _truncate(checkpoint(out, 2) / "rng.safetensors")
    with pytest.warns(CheckpointSkippedWarning, match="rng.safetensors"):
        assert ckpt.load()["step"] == 1
    with pytest.raises(CheckpointCorruptError, match="rng.safetensors") as info:
        ckpt.load(checkpoint(out, 2))
    assert info.value.check == "unreadable"
    (checkpoint(out, 1) / "trainer_state.json").write_text('{"step": "four"}')
    with pytest.raises(CheckpointCorruptError, match="integer 'step'") as info:
        ckpt.load(checkpoint(out, 1))
    assert info.value.check == "bad value"


def test_when_no_checkpoint_verifies_load_and_resume_auto_refuse_and_delete_nothing(two_checkpoints):
    out, _ = two_checkpoints
    for step in (1, 2):
        _zero(checkpoint(out, step) / "model.safetensors")
    ckpt = manager(out, *objects())
    with pytest.warns(CheckpointSkippedWarning, match="no other checkpoint verifies"):
        assert ckpt.latest() is None
    with pytest.warns(CheckpointSkippedWarning), pytest.raises(CheckpointCorruptError, match="no checkpoint in"):
        ckpt.load()
    with pytest.raises(CheckpointCorruptError, match="none|no checkpoint"):
        ckpt.claim(resume="auto")        # rather than silently starting over and pruning them
    assert not ckpt.lock.held
    assert all((checkpoint(out, s) / "model.safetensors").exists() for s in (1, 2))


def test_resaving_a_damaged_step_keeps_the_damaged_folder_aside(two_checkpoints):
    out, _ = two_checkpoints
    _truncate(checkpoint(out, 2) / "model.safetensors")
    model, opt = objects()
    ckpt = manager(out, model, opt)
    with pytest.warns(CheckpointSkippedWarning):
        assert ckpt.load()["step"] == 1
    with pytest.warns(CheckpointSkippedWarning, match="kept as"):
        ckpt.save(2, {"marker": "again"})
    assert ckpt.load()["marker"] == "again"
    kept = list((out / "checkpoints").glob("corrupt-step-00000002-*"))
    assert len(kept) == 1 and (kept[0] / "model.safetensors").is_file()


# ============================================================================================
# a changed architecture
# ============================================================================================
def test_a_changed_architecture_names_the_differing_fields_before_loading(two_checkpoints):
    out, saved = two_checkpoints
    model, opt = objects(hidden=8)
    changed = dict(CONFIG, hidden_size=8, vision={"patch_size": 2}, transformers_version="y")
    with pytest.raises(ValueError) as info:
        manager(out, model, opt, model_config=changed).load()
    message = str(info.value)
    assert "hidden_size: saved 16 vs now 8" in message and "vision.patch_size: saved 4 vs now 2" in message
    assert "transformers_version" not in message and "num_layers" not in message
    assert "step-00000002" in message
    # same config, same model: loads; no config given: the weights' own mismatch is a ValueError naming the file
    model2, opt2 = objects()
    assert manager(out, model2, opt2, model_config=dict(CONFIG)).load()["step"] == 2
    with pytest.raises(ValueError, match=r"model\.safetensors does not fit 'model'"):
        manager(out, *objects(hidden=8)).load()
    with pytest.raises(TypeError, match="model_config"):
        manager(out, *objects(), model_config=[("hidden_size", 16)])


# ============================================================================================
# a full disk
# ============================================================================================
@pytest.mark.parametrize("raise_as", ["OSError", "SafetensorError"])
def test_a_full_disk_is_an_oserror_naming_the_file_and_the_previous_checkpoint_loads(tmp_path, monkeypatch,
                                                                                      raise_as):
    model, opt = objects()
    ckpt = manager(tmp_path, model, opt)
    train_step(model, opt)
    ckpt.save(1, {})
    good = weights(model)
    real = checkpointing.save_file

    def full_disk(tensors, path):
        real(tensors, path)                                       # a partial file on disk, then the failure
        if path.endswith("optimizer.optim.safetensors"):
            if raise_as == "OSError":
                raise OSError(errno.ENOSPC, "No space left on device", path)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpointing, "save_file", full_disk)
    train_step(model, opt)
    with pytest.raises(CheckpointWriteError) as info:
        ckpt.save(2, {})
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert info.value.filename.endswith("optimizer.optim.safetensors") and "optimizer.optim.safetensors" in str(info.value)
    assert "previous one is intact" in str(info.value)
    monkeypatch.setattr(checkpointing, "save_file", real)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    model2, opt2 = objects(seed=5)
    assert manager(tmp_path, model2, opt2).load()["step"] == 1
    assert all(torch.equal(v, good[k]) for k, v in model2.state_dict().items())


@pytest.mark.parametrize("too_big", ["model.safetensors", "trainer_state.json"])
def test_a_real_file_size_limit_during_save_is_a_checkpoint_write_error(tmp_path, too_big):
    """No mock: RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), in safetensors' Rust writer or in
    Python's JSON writer, as a full disk would."""
    model, opt = objects()
    ckpt = manager(tmp_path, model, opt)
    ckpt.save(1, {})
    limit = 64 * 1024
    state = {}
    if too_big == "model.safetensors":
        model.register_buffer("big", torch.zeros(limit))        # 256 KiB of weights
    else:
        state = {"blob": "x" * (2 * limit)}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(CheckpointWriteError) as info:
            ckpt.save(2, state)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert info.value.errno == errno.EFBIG and info.value.filename.endswith(too_big)
    assert ckpt.latest() == checkpoint(tmp_path, 1)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert manager(tmp_path, *objects()).load()["step"] == 1


# ============================================================================================
# the output-folder lock
# ============================================================================================
def test_a_second_run_in_the_same_folder_is_refused_naming_the_holder(tmp_path):
    first = manager(tmp_path, *objects()).claim()
    assert first.claim() is first                                  # idempotent
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    second = manager(tmp_path, *objects())
    with pytest.raises(OutputDirLockedError, match=rf"pid {os.getpid()} on host {socket.gethostname()}") as info:
        second.claim(resume="auto")
    assert info.value.holder["pid"] == os.getpid() and info.value.filename == str(tmp_path / LOCK_FILE)
    assert manager(tmp_path, *objects(), is_main_process=False).claim(resume="auto")   # other ranks take no lock
    first.release()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    second.claim(resume="auto").release()


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with manager(tmp_path, *objects()).claim():
            raise RuntimeError("boom")
    with manager(tmp_path, *objects()).claim() as ckpt:
        assert ckpt.lock.held


HOLDER = textwrap.dedent("""
    import sys, time
    from adatok_vlm.training.checkpointing import CheckpointManager
    CheckpointManager(sys.argv[1], {}, {}).claim()
    print("held", flush=True)
    time.sleep(600)
""")


@pytest.mark.timeout(120)
def test_a_lock_held_by_another_process_is_refused_then_taken_over_once_it_is_killed(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirLockedError, match=rf"pid {proc.pid} on host"):
            manager(out, *objects()).claim()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = manager(out, *objects())
    with pytest.warns(UserWarning, match=rf"stale lock .*pid {proc.pid}.*no longer runs"):
        ckpt.claim()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    ckpt.release()


def test_a_stale_lock_of_a_dead_pid_is_taken_over_and_another_hosts_is_named(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00Z"}))
    ckpt = manager(tmp_path, *objects())
    with pytest.warns(UserWarning, match=rf"taking over the stale lock .*pid {dead.pid}"):
        ckpt.claim()
    ckpt.release()
    lock.write_bytes(os.urandom(40))                              # garbage: no live holder has it locked
    with pytest.warns(UserWarning, match="stale lock .*unreadable"):
        ckpt.claim()
    ckpt.release()
    lock.write_text(json.dumps({"pid": 4242, "host": "other-node-7", "started": "2026-01-01T00:00:00Z"}))
    with pytest.raises(OutputDirLockedError, match=r"pid 4242 on host other-node-7.*If it does not, delete"):
        ckpt.claim()
    assert lock.is_file(), "another machine's lock is never removed"


def test_a_failed_claim_on_the_main_process_stops_the_other_ranks_too(tmp_path):
    """Two ranks (threads) with a real any-rank agreement: rank 0 cannot take the lock, rank 1 must raise,
    not wait in a collective that rank 0 never reaches."""
    holder = manager(tmp_path, *objects()).claim()
    barrier = threading.Barrier(2, timeout=30)
    flags = [False, False]

    def agree(rank):
        def any_rank(flag):
            flags[rank] = flag
            barrier.wait()
            result = any(flags)
            barrier.wait()
            return result
        return any_rank

    errors = {}

    def rank(r):
        ckpt = CheckpointManager(tmp_path, {}, {}, is_main_process=r == 0, rank=r, world_size=2, any_rank=agree(r))
        try:
            ckpt.claim(resume="auto")
        except Exception as error:   # noqa: BLE001  (recorded and checked below)
            errors[r] = error

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(errors.get(0), OutputDirLockedError)
    assert "main process could not claim" in str(errors.get(1))
    holder.release()


# ============================================================================================
# a fresh run into a folder holding another run
# ============================================================================================
def test_a_fresh_run_into_another_runs_folder_refuses_unless_resume_or_overwrite(two_checkpoints):
    out, _ = two_checkpoints
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    (out / "log.jsonl").write_text('{"step": 1}\n')
    ckpt = manager(out, *objects())
    with pytest.raises(OutputDirNotEmptyError, match=r"already holds a run .*step-00000002.*resume.*overwrite") as info:
        ckpt.claim()
    assert isinstance(info.value, FileExistsError) and not ckpt.lock.held
    assert checkpoint(out, 2).is_dir() and (out / "model" / "config.json").is_file()
    ckpt.claim(resume="auto").release()                          # continuing it is fine
    with pytest.raises(ValueError, match="choose one"):
        ckpt.claim(resume="auto", overwrite=True)
    with pytest.warns(UserWarning, match="removed the previous run's checkpoints, model, log.jsonl"):
        ckpt.claim(overwrite=True)
    assert not (out / "checkpoints").exists() and not (out / "model").exists() and not (out / "log.jsonl").exists()
    assert not list(out.glob(".overwritten-*")) and ckpt.lock.held
    ckpt.save(1, {"marker": "new"})
    assert ckpt.load()["marker"] == "new"
    ckpt.release()


def test_a_finished_run_whose_only_trace_is_model_is_refused_too(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(OutputDirNotEmptyError, match="model/"):
        manager(tmp_path, *objects()).claim()
    manager(tmp_path / "elsewhere", *objects()).claim().release()   # an empty or new folder is fine


# ============================================================================================
# pruning touches only this run's files
# ============================================================================================
def test_two_managers_in_one_folder_do_not_delete_each_others_temporary_folders(tmp_path, monkeypatch):
    """Manager B is in the middle of writing its checkpoint when manager A saves and prunes (the original
    failure: B's next file went into a folder A had deleted)."""
    model_a, opt_a = objects()
    model_b, opt_b = objects(seed=1)
    a = CheckpointManager(tmp_path, {"model": model_a}, {"optimizer": opt_a}, keep=1)
    b = CheckpointManager(tmp_path, {"model": model_b}, {"optimizer": opt_b}, keep=1)
    real = checkpointing.save_file
    interleaved = []

    def interleave(tensors, path):
        real(tensors, path)
        if "step-00000010" in path and not interleaved:          # B's first file is written: A saves now
            interleaved.append(path)
            for step in (1, 2, 3):
                a.save(step, {"who": "a"})
            assert Path(path).is_file(), "A's pruning deleted B's temporary folder"

    monkeypatch.setattr(checkpointing, "save_file", interleave)
    b.save(10, {"who": "b"})
    assert interleaved
    assert b.load(checkpoint(tmp_path, 10))["who"] == "b"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_pruning_removes_temporary_folders_of_dead_processes_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    root = tmp_path / "checkpoints"
    names = {
        "dead": f".tmp-step-00000005-{dead.pid}-0123abcd@{host}",
        "legacy dead": f".tmp-step-00000005-{dead.pid}",
        "alive": f".tmp-step-00000005-{os.getppid()}-0123abcd@{host}",
        "this process, another manager": f".tmp-step-00000005-{os.getpid()}-89abcdef@{host}",
        "another host": f".tmp-step-00000005-{dead.pid}-0123abcd@other-node-7",
        "collective": ".tmp-step-00000005-shared",
    }
    for name in names.values():
        (root / name).mkdir(parents=True)
    ckpt = manager(tmp_path, *objects())
    ckpt.save(1, {})
    left = {key for key, name in names.items() if (root / name).exists()}
    assert left == {"alive", "this process, another manager", "another host", "collective"}
    with ckpt.claim(resume="auto"):                              # the folder's owner clears the rest
        ckpt.save(2, {})
    left = {key for key, name in names.items() if (root / name).exists()}
    assert left == {"alive", "this process, another manager"}


def test_pruning_leaves_checkpoints_newer_than_the_resumed_step_alone(two_checkpoints):
    """A run that walked back from a damaged step-2 to step-1 keeps step-2 (not its own timeline) while it
    prunes its own old checkpoints."""
    out, _ = two_checkpoints
    _zero(checkpoint(out, 2) / "model.safetensors")
    model, opt = objects()
    ckpt = CheckpointManager(out, {"model": model}, {"optimizer": opt}, keep=1)
    with pytest.warns(CheckpointSkippedWarning):
        ckpt.load()
    ckpt.save(1, {"again": True})
    assert checkpoint(out, 2).is_dir() and checkpoint(out, 1).is_dir()


# ============================================================================================
# two real processes (gloo): the shared-folder protocol, the manifest of both ranks' files, a failure
# on rank 0 that reaches rank 1
# ============================================================================================
RANK_SCRIPT = textwrap.dedent("""
    import datetime, json, sys, torch
    import torch.distributed as dist
    from torch import nn
    import adatok_vlm.training.checkpointing as checkpointing
    from adatok_vlm.training.checkpointing import CheckpointManager

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()

    def any_rank(flag):
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value)
        return value.item() > 0

    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = CheckpointManager(sys.argv[1], {"model": model}, {"optimizer": opt}, is_main_process=rank == 0,
                             rank=rank, world_size=2, local_rank=rank, barrier=dist.barrier, any_rank=any_rank)
    ckpt.claim(resume="auto")
    torch.manual_seed(100 + rank)
    ckpt.save(1, {"k": 1})
    if rank == 0:                                  # the main process's disk fills up during step 2
        real = checkpointing.save_file
        def full(tensors, path):
            if path.endswith("model.safetensors"):
                raise OSError(28, "No space left on device", path)
            return real(tensors, path)
        checkpointing.save_file = full
    try:
        ckpt.save(2, {"k": 2})
        outcome = "saved"
    except OSError as error:
        outcome = f"{type(error).__name__}: {error}"
    ckpt.release()
    print(json.dumps({"rank": rank, "outcome": outcome}), flush=True)
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_two_processes_share_one_folder_list_both_ranks_files_and_both_stop_on_a_main_rank_failure(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "run"
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                                                  MASTER_PORT=port, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)))
             for r in (0, 1)]
    results = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=200)
        assert proc.returncode == 0, stderr[-3000:]
        row = json.loads(stdout.strip().splitlines()[-1])
        results[row["rank"]] = row["outcome"]
    assert results[0].startswith("CheckpointWriteError") and "model.safetensors" in results[0]
    assert results[1].startswith("CheckpointWriteError") and "main process could not write" in results[1]
    ckpt = manager(out, *objects())
    assert ckpt.latest() == checkpoint(out, 1) and not checkpoint(out, 2).exists()
    files = json.loads((checkpoint(out, 1) / MANIFEST).read_text())["files"]
    assert {"rng-rank00000.safetensors", "rng-rank00001.safetensors", "world.json"} <= set(files)
    _truncate(checkpoint(out, 1) / "rng-rank00001.safetensors")          # the other rank's file
    with pytest.raises(CheckpointCorruptError, match="rng-rank00001.safetensors") as info:
        ckpt.load(checkpoint(out, 1))
    assert info.value.check == "size"
    assert not (out / LOCK_FILE).exists(), "released"
