"""Pieces every training loop shares: LR schedule, EMA weights, the non-finite guard, run logging.

Entry points (``train_tokenizer``, ``train_policy``, ...) stay short by composing these.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn


# ---------------------------------------------------------------------------------------------
# learning rate
# ---------------------------------------------------------------------------------------------
def optimizer_step(accelerator, loss: torch.Tensor, optimizer, params, grad_clip: float):
    """``accelerator.backward(loss)``, clipping to ``grad_clip`` on micro-steps that synchronise gradients
    (under DeepSpeed the engine clips inside its step and this only reads the norm), then the optimizer
    step. Returns the gradient norm before clipping, or None when nothing was clipped."""
    accelerator.backward(loss)
    grad_norm = None
    if accelerator.sync_gradients and grad_clip > 0:
        grad_norm = accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def run_progress(step: int, elapsed: float, max_steps: int, time_budget_s: float | None = None) -> float:
    """The fraction of a run done: by steps, or by wall time when a budget is set (whichever is further),
    so a schedule over it finishes within ``time_budget_s``."""
    progress = step / max(1, max_steps)
    return max(progress, elapsed / time_budget_s) if time_budget_s else progress


def lr_at(progress: float, step: int, base_lr: float, warmup_steps: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps``, then ``schedule`` ("cosine", "linear", "constant") over
    ``progress`` in [0, 1] (the fraction of the run done, by steps or by time budget)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    floor = base_lr * min_lr_ratio
    if schedule == "cosine":
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return floor + (base_lr - floor) * (1.0 - progress)
    if schedule == "constant":
        return base_lr
    raise ValueError(f"lr_schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------
class EMA(nn.Module):
    """Exponential moving average of a model's trainable parameters (buffers are copied).

    ``decay`` ramps as ``min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by the
    random init. ``copy_to(model)`` writes the averaged weights into a model (e.g. for export).

    Under ZeRO-3 the live parameters are shards: build the EMA from the whole model *before*
    ``accelerator.prepare`` and pass ``gather`` (``distributed.param_gatherer``), a context factory
    that makes a list of parameters whole on every rank; ``update`` then gathers a chunk of at most
    ``gather_numel`` elements at a time. The shadow is a full copy on every rank.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, gather=None, gather_numel: int = 1 << 26):
        super().__init__()
        self.decay = decay
        self.gather, self.gather_numel = gather, gather_numel
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        n = float(self.num_updates)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        pairs = [(ema_p, p) for (_, ema_p), (_, p) in zip(self.shadow.named_parameters(), model.named_parameters())]
        for chunk in self._chunks(pairs):
            with self.gather([p for _, p in chunk]) if self.gather is not None else contextlib.nullcontext():
                for ema_p, p in chunk:
                    if p.requires_grad:
                        ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - decay)
                    else:
                        ema_p.copy_(p.detach())
        for ema_b, b in zip(self.shadow.buffers(), model.buffers()):
            ema_b.copy_(b)

    def _chunks(self, pairs):
        if self.gather is None:
            yield pairs
            return
        chunk, size = [], 0
        for pair in pairs:
            chunk.append(pair)
            size += pair[0].numel()
            if size >= self.gather_numel:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow.state_dict())


# ---------------------------------------------------------------------------------------------
# guards and logging
# ---------------------------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
    """Raised after a checkpoint was saved, when a loss becomes NaN or infinite."""

    def __init__(self, step: int, name: str, value: float, checkpoint: str | None):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"non-finite {name} ({value}) at step {step}; training stopped"
                         + (f", state saved to {checkpoint}" if checkpoint else ""))


def check_finite(losses: dict[str, torch.Tensor]) -> tuple[str, float] | None:
    """Return ``(name, value)`` of the first non-finite loss, else None."""
    for name, value in losses.items():
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(v):
            return name, v
    return None


class RunLogger:
    """Appends JSON lines to ``<dir>/log.jsonl`` and, where available, writes TensorBoard scalars."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.dir / "log.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except Exception:  # tensorboard is optional at run time
                self.tb = None

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def default_threads(cores: int, local_world_size: int = 1, load: float = 0.0) -> int:
    """CPU threads per process when none is asked for: ``min(cores // local_world_size, cores - round(load))``,
    at least 1.

    Why: intra-op threads only pay while each has a core to itself. Processes sharing a node split its
    cores (``LOCAL_WORLD_SIZE``), and ``load`` counts the cores other work already keeps busy
    (:func:`configure_threads` measures it); one thread more than the free cores makes every thread wait
    at each parallel region's join.
    Measured on a DiT run (25 s budget): 1,385 steps idle with all threads, 286 with one core busy
    elsewhere, 1,155 with one thread. So a busy or shared machine gets what is left, down to 1.
    """
    return max(1, min(cores // max(1, local_world_size), cores - round(load)))


def cores_busy_now(interval: float = 0.1, stat: str = "/proc/stat") -> float | None:
    """How many cores other work keeps busy right now: the machine's non-idle share over ``interval``
    seconds (``/proc/stat``) times its core count, less this process's own CPU time over the interval
    (its other threads), or ``None`` where that file is not readable.

    Why not the 1-minute load average: it lags by a minute, so work that has just ended still counts.
    ``make demo`` right after its own ``pip install`` saw a load of 1.0 on an idle 2-core machine, ran
    stage 1 on one thread and took 1.7x as long (0.77 vs 0.44 s an adatok-natural step of batch 64)."""
    def sample():
        with open(stat, encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)   # all, idle + iowait
    try:
        total0, idle0 = sample()
        own0, wall0 = time.process_time(), time.monotonic()
        time.sleep(interval)
        total1, idle1 = sample()
        own = (time.process_time() - own0) / max(1e-9, time.monotonic() - wall0)
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return max(0.0, cores * (1.0 - (idle1 - idle0) / max(1, total1 - total0)) - own)


def configure_threads(num_threads: int | None = None) -> int:
    """Set PyTorch's intra-op threads: ``num_threads``, or :func:`default_threads` of this machine now
    (the cores this process may use, ``LOCAL_WORLD_SIZE`` from the launcher, and the cores busy elsewhere:
    :func:`cores_busy_now`, or the 1-minute load average where ``/proc/stat`` is missing). Returns the
    count set."""
    if num_threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        load = cores_busy_now()
        if load is None:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        num_threads = default_threads(cores, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), load)
    num_threads = max(1, int(num_threads))
    torch.set_num_threads(num_threads)
    return num_threads
