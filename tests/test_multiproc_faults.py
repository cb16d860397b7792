"""SIGKILL in a 2-process DeepSpeed ZeRO-2 run, for real (issue 20 item 6), then ``--train.resume auto``.

Stage 1 (the tiny tokenizer) runs as two CPU processes over gloo, each started by this test with the
usual ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` (no launcher: a launcher would kill the surviving rank
itself, and on a real cluster the survivor is often alone on another node), through
``tests/ds_kill_worker.py``. One job is killed, resumed, killed again... in four ways:

* **one rank**: SIGKILL of rank 0 or 1 at a random step. The other rank must notice on its own and exit
  with status 1 and the one-line ``PeerProcessLostError`` message ("another process of this run died
  ..."), never hang (the test waits for it with a bound, and ``train.collective_timeout_s`` bounds a
  peer that hangs instead of dying);
* **the whole job**: SIGKILL of both processes at once (their process group, as a scheduler does) at a
  random step;
* **inside a checkpoint write**: one rank SIGKILLs itself right after its k-th file of a checkpoint
  (k random: DeepSpeed's shards, the RNG files, ``world.json``, ``trainer_state.json``, the manifest,
  or just before the rename); the other rank must exit on its own as above;
* **a hung rank**: SIGSTOP of one rank at a random step (alive, holding its sockets open, so gloo sees
  no error): with ``--train.collective_timeout_s 45`` the other rank must give up after the timeout with
  the same message; the stopped rank is then SIGKILLed.

After every kill the newest checkpoint that verifies is at most ``save_every`` steps behind, and the
last ``--train.resume auto`` run's exported weights equal an uninterrupted run's **bit for bit**
(``torch.equal``): fp32 ZeRO-2 on CPU restores the engine's module weights, each rank's fp32 optimizer
partition and each rank's RNG streams exactly, and the data position continues at the same batch, so no
tolerance is needed.

Trials: ``make test`` runs one trial (seed 0) of the kind that covers the most at once: one rank killed inside a
checkpoint write, so the survivor must notice and the half-written checkpoint must be skipped on resume.
``ADATOK_NIGHTLY=1`` (``make kill-trials``) runs 5 of every kind,
``ADATOK_KILL_TRIALS=N`` N of each, in a shuffled order with random steps, victims and files from a seed
that is printed (``ADATOK_KILL_SEED`` repeats one). The outcome of every trial is printed and saved as
``<pytest basetemp>/multiproc_kill_trials.json``. Each trial is one 2-process launch, plus the
uninterrupted run and the last resume: 3 launches in ``make test`` (the four kinds took 6 launches and
21 minutes on the 2 shared development cores at a load of 15, where one launch's start-up alone took 1-3
minutes).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adatok_vlm.training.checkpointing import CheckpointManager

deepspeed = pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ds_kill_worker.py"
TINY = {"preset": "adatok-tiny", "hidden_size": 32, "decoder_hidden_size": 32, "num_attention_heads": 2,
        "decoder_num_attention_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "num_latent_tokens": 8}
SAVE_EVERY = 2
KINDS = ("one_rank", "whole_job", "in_save", "hang")
MAKE_TEST_KINDS = ("in_save",)   # the default run's one trial; every kind runs under ADATOK_NIGHTLY / _KILL_TRIALS
HANG_TIMEOUT_S = 45              # train.collective_timeout_s of the launch whose rank is stopped
FILES_PER_RANK = {0: 6, 1: 3}    # checkpoint files a rank writes, as ds_kill_worker counts them (engine shards = 1)
LAUNCH_TIMEOUT_S = 600           # a hang guard only: a launch takes ~10-60 s on 2 loaded cores
SURVIVOR_TIMEOUT_S = 300         # the same for a surviving rank (gloo notices a dead peer within seconds)
LOST_MESSAGE = "another process of this run died"


def trials_per_kind() -> int:
    if os.environ.get("ADATOK_KILL_TRIALS"):
        return int(os.environ["ADATOK_KILL_TRIALS"])
    return 5 if os.environ.get("ADATOK_NIGHTLY") == "1" else 1


def kinds_to_run() -> tuple[str, ...]:
    nightly = os.environ.get("ADATOK_NIGHTLY") == "1" or os.environ.get("ADATOK_KILL_TRIALS")
    return KINDS if nightly else MAKE_TEST_KINDS


def kill_seed() -> int:
    if os.environ.get("ADATOK_KILL_SEED"):
        return int(os.environ["ADATOK_KILL_SEED"])
    nightly = os.environ.get("ADATOK_NIGHTLY") == "1" or os.environ.get("ADATOK_KILL_TRIALS")
    return random.SystemRandom().randrange(10**6) if nightly else 0


pytestmark = pytest.mark.timeout(900 + 360 * len(kinds_to_run()) * trials_per_kind())
JOBS: list = []                  # every job a test started: killed at teardown, whatever happened


def flags(out: Path, max_steps: int) -> list[str]:
    """The stage-1 command line of every launch (``--train.resume auto`` always: a fresh folder starts fresh)."""
    argv = ["--output_dir", str(out), "--max_steps", str(max_steps), "--seed", "3", "--train.batch_size", "4",
             "--train.lr", "3e-3", "--train.warmup_steps", "0", "--train.lr_schedule", "constant",
             "--train.log_every", "1", "--train.sample_every", "0", "--train.save_every", str(SAVE_EVERY),
             "--train.num_threads", "1", "--train.deepspeed", "zero2", "--train.resume", "auto",
             "--data.dataset", "natural_crops", "--data.num_crops", "64", "--data.limit", "16",
             "--data.preload", "true"]
    return argv + [x for k, v in TINY.items() for x in (f"--model.{k}", json.dumps(v))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """Two ranks started by hand in one process group (so the whole job can be killed at once)."""

    def __init__(self, argv: list[str], logs: Path, cache: Path, kill_in_save: tuple[int, int, int] | None = None):
        port, self.logs, self.procs = free_port(), logs, []
        JOBS.append(self)
        for rank in range(2):
            env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                       TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", ADATOK_CACHE=str(cache), RANK=str(rank),
                       LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
            env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "adatok-vlm" / "torch_extensions"))
            env.pop("ACCELERATE_USE_DEEPSPEED", None)
            own = []
            if kill_in_save is not None and kill_in_save[0] == rank:
                own = ["--kill-in-save", f"{kill_in_save[1]}:{kill_in_save[2]}"]
            group = {"process_group": self.procs[0].pid if self.procs else 0}   # one new group: killpg kills both
            with open(self.log(rank), "w") as log:
                self.procs.append(subprocess.Popen([sys.executable, str(WORKER), *own, "--", *argv], cwd=REPO,
                                                   env=env, stdout=log, stderr=subprocess.STDOUT, **group))

    def log(self, rank: int) -> Path:
        return self.logs.with_name(f"{self.logs.name}.rank{rank}.log")

    def output(self, rank: int) -> str:
        return self.log(rank).read_text(errors="replace")

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def wait(self, rank: int, timeout: float) -> int:
        try:
            return self.procs[rank].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"rank {rank} hung (still running after {timeout:.0f} s):\n{self.output(rank)[-3000:]}")

    def kill_all(self) -> None:
        if self.procs and any(p.poll() is None for p in self.procs):
            try:
                os.killpg(self.procs[0].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()               # a rank that left the group
            p.wait()


@pytest.fixture(autouse=True)
def no_leftover_jobs():
    yield
    while JOBS:
        JOBS.pop().kill_all()


def last_logged_step(log: Path) -> int:
    if not log.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


def wait_for_step(job: Job, log: Path, target: int) -> None:
    deadline = time.time() + LAUNCH_TIMEOUT_S
    while last_logged_step(log) < target and job.running() and time.time() < deadline:
        time.sleep(0.005)
    if not job.running() or last_logged_step(log) < target:
        job.kill_all()
        pytest.fail(f"the job did not reach step {target} alive (rc {[p.returncode for p in job.procs]}):\n"
                    f"{job.output(0)[-3000:]}")


def checkpoint_step(out: Path) -> int | None:
    latest = CheckpointManager(out, {}, {}).latest()
    return int(latest.name.split("-")[1]) if latest is not None else None


def expect_survivor_exit(job: Job, rank: int) -> dict:
    """The surviving rank exits by itself, with status 1 and the message naming the cause."""
    started = time.time()
    rc = job.wait(rank, SURVIVOR_TIMEOUT_S)
    text = job.output(rank)
    assert rc == 1, f"surviving rank {rank} exited with {rc}:\n{text[-3000:]}"
    assert LOST_MESSAGE in text and "--train.resume auto" in text, text[-3000:]
    assert "Traceback" not in text, f"one line, no traceback:\n{text[-3000:]}"
    return {"survivor": rank, "survivor_rc": rc, "survivor_exit_s": round(time.time() - started, 1)}


def run_trial(kind: str, rng: random.Random, out: Path, argv: list[str], logs: Path, cache: Path) -> dict:
    start = last_logged_step(out / "log.jsonl")
    target = start + rng.randint(3, 6)
    record = {"kind": kind, "target_step": target}
    if kind == "in_save":
        step = target + (-target) % SAVE_EVERY                  # the next checkpoint at or after the target
        victim = rng.randrange(2)
        files = rng.randint(1, FILES_PER_RANK[victim])
        record.update(checkpoint=step, victim=victim, killed_after_file=files)
        job = Job(argv, logs, cache, kill_in_save=(victim, step, files))
        rc = job.wait(victim, LAUNCH_TIMEOUT_S)
        assert rc == -signal.SIGKILL, f"rank {victim} was to kill itself inside checkpoint {step} (rc {rc}):\n" \
                                      f"{job.output(victim)[-3000:]}"
        record.update(expect_survivor_exit(job, 1 - victim))
    else:
        extra = ["--train.collective_timeout_s", str(HANG_TIMEOUT_S)] if kind == "hang" else []
        job = Job(argv + extra, logs, cache)
        wait_for_step(job, out / "log.jsonl", target)
        if kind in ("one_rank", "hang"):
            victim = rng.randrange(2)
            job.procs[victim].send_signal(signal.SIGKILL if kind == "one_rank" else signal.SIGSTOP)
            record["victim"] = victim
            record.update(expect_survivor_exit(job, 1 - victim))
            job.kill_all()             # the stopped rank
        else:
            job.kill_all()
            assert all(p.returncode == -signal.SIGKILL for p in job.procs)
    reached = last_logged_step(out / "log.jsonl")
    resumable = checkpoint_step(out)
    assert resumable is not None, "a complete checkpoint survives the kill"
    assert resumable >= reached - SAVE_EVERY, f"at most save_every steps lost (reached {reached}, latest {resumable})"
    record.update(killed_after_step=reached, resumable_checkpoint=resumable)
    return record


def test_sigkill_of_a_rank_the_job_or_a_checkpoint_write_then_resume_gives_the_uninterrupted_weights(
        tmp_path, tmp_path_factory, capsys):
    n, seed = trials_per_kind(), kill_seed()
    rng = random.Random(seed)
    kinds = [k for k in kinds_to_run() for _ in range(n)]
    rng.shuffle(kinds)
    max_steps = 8 * len(kinds) + 8
    cache = tmp_path / "cache"
    with capsys.disabled():
        print(f"\nmulti-process kill trials: seed {seed} (ADATOK_KILL_SEED={seed} repeats them), {n} per kind")

    straight = tmp_path / "straight"
    job = Job(flags(straight, max_steps), tmp_path / "straight", cache)
    assert [job.wait(r, LAUNCH_TIMEOUT_S) for r in (0, 1)] == [0, 0], job.output(0)[-3000:]
    expected = load_file(str(straight / "model" / "model.safetensors"))

    out = tmp_path / "killed"
    argv, records = flags(out, max_steps), []
    for i, kind in enumerate(kinds):
        records.append(run_trial(kind, rng, out, argv, tmp_path / f"trial{i}", cache))
    job = Job(argv, tmp_path / "final", cache)
    assert [job.wait(r, LAUNCH_TIMEOUT_S) for r in (0, 1)] == [0, 0], job.output(0)[-3000:]
    assert "resumed from" in job.output(0)
    got = load_file(str(out / "model" / "model.safetensors"))
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{key} differs from the uninterrupted run"
    assert not list((out / "checkpoints").glob(".tmp-*")), "no partial checkpoint is left behind"

    summary = {"seed": seed, "trials_per_kind": n, "max_steps": max_steps, "trials": records,
               "final_weights_equal": True}
    (tmp_path_factory.getbasetemp() / "multiproc_kill_trials.json").write_text(json.dumps(summary, indent=1))
    counts = {k: sum(r["kind"] == k for r in records) for k in kinds_to_run()}
    with capsys.disabled():
        print(f"\nmulti-process kill trials (seed {seed}): {counts}, every resume reached the uninterrupted run's "
              f"final weights bit for bit")
        for r in records:
            print("  " + json.dumps(r))


@pytest.mark.parametrize("value", [0.0, -5.0, float("nan"), float("inf")])
def test_the_collective_timeout_is_a_checked_setting(value):
    from adatok_vlm.training.loop import LoopConfig

    assert LoopConfig().collective_timeout_s == 600.0
    with pytest.raises(ValueError, match="train.collective_timeout_s must be a finite number of seconds > 0"):
        LoopConfig(collective_timeout_s=value)


def test_only_a_failed_collective_becomes_the_peer_lost_message():
    """What gloo raised in these tests is recognised (also when wrapped); a bug of this rank is left as it is."""
    from types import SimpleNamespace

    from adatok_vlm.training.distributed import PeerProcessLostError, is_collective_failure, peer_lost

    reset = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:46515: "
                         "Connection reset by peer. This is typically caused by a remote worker hanging")
    timed_out = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                             "45000ms for recv operation to complete")
    wrapped = ValueError("could not save")
    wrapped.__cause__ = reset
    two, one = SimpleNamespace(num_processes=2, process_index=1), SimpleNamespace(num_processes=1, process_index=0)
    for error in (reset, timed_out, wrapped, torch.distributed.DistBackendError("NCCL watchdog")):
        assert is_collective_failure(error)
        lost = peer_lost(two, error, 45.0, "out")
        assert isinstance(lost, PeerProcessLostError) and LOST_MESSAGE in str(lost)
        assert "collective_timeout_s = 45 s" in str(lost) and "--train.resume auto" in str(lost)
    assert peer_lost(one, reset, 45.0, "out") is None                       # one process: nothing to lose
    for bug in (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), KeyError("x"), ValueError("lr")):
        assert not is_collective_failure(bug) and peer_lost(two, bug, 45.0, "out") is None
