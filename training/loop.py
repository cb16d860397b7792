"""The one training loop every stage runs (MAE's ``engine`` idea, Hugging Face Trainer's hook names).

    def train(cfg: MyTrainingConfig) -> dict:
        return run(cfg, MyStage)        # MyStage(cfg, accelerator) builds the model, data and optimizer

:func:`run` owns what all four trainers (tokenizer, policy, DiT, VLM) share: the Accelerator and
threads, the init seed, the one :class:`~.checkpointing.CheckpointManager`, ``--resume`` (with its
"resumed from ... at step N" line), the start-up banner, the progress bar, the learning rate
(``engine.lr_at`` over ``engine.run_progress``), the non-finite stop, logging, save / stop at the
step or time budget / epoch rollover, Ctrl-C, the final checkpoint and the export. A
:class:`Stage` keeps only what is its own: its data (``batches``), its step (``step``, plus
``after_backward`` for a second optimizer), its logged values (``on_step_end``) and its outputs
(``export``).

The order of what every rank does is fixed here, so the collectives line up across processes: per
micro-batch ``prepare`` (a stage may ask ``any_rank``), the LR, ``step`` with the non-finite check
and the optimizer step inside ``accelerator.accumulate``; after a synchronised step the EMA update,
``on_step_end`` (where a stage averages its logs over ranks), the save. ``state["batch"]`` counts
the micro-batches taken from the sampler (skipped ones included), so a resumed run continues from
the same batch of the same epoch.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpointing import CheckpointManager
from .integrity import config_defaults
from .config import parse_config
from .distributed import (PeerProcessLostError, any_rank, describe_batch, final_model, half_precision_autocast,
                          peer_lost, set_collective_timeout, stop_if_non_finite, uses_deepspeed, zero_stage)
from .engine import RunLogger, configure_threads, lr_at, optimizer_step, run_progress, set_lr
from .launch import make_accelerator

LR_SCHEDULES = ("cosine", "linear", "constant")


# =============================================================================================
# the run fields every stage shares
# =============================================================================================
@dataclass
class LoopConfig:
    """The ``train`` section fields :func:`run` reads; each stage's train config extends it and
    overrides only its own defaults."""

    output_dir: str = "outputs/run"
    seed: int = 0
    max_steps: int = 1000
    time_budget_s: float | None = None       # stop (and finish the LR schedule) within this wall time
    batch_size: int = 64                     # per device
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    lr_schedule: str = "cosine"              # cosine | linear | constant (after the warm-up)
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0                   # 0 disables clipping
    mixed_precision: str = "auto"            # bf16 on GPUs that support it, fp32 on CPU
    num_threads: int | None = None           # None: see engine.configure_threads
    log_every: int = 10
    save_every: int = 500                    # 0: only the final checkpoint
    keep_checkpoints: int = 2
    resume: str | None = None                # "auto" | a checkpoint folder
    overwrite: bool = False                  # allow a fresh run into an output_dir that holds another run's checkpoints
    export: bool = True                      # save_pretrained the final model to <output_dir>/model
    deepspeed: str | None = None             # DeepSpeed JSON (configs/deepspeed/zero2.json) or its name ("zero3")
    # With several processes: how long any collective waits for the other ranks before this rank stops with
    # PeerProcessLostError (a rank that dies is noticed at once over gloo; this bounds a hung or unreachable one)
    collective_timeout_s: float = 600.0

    def __post_init__(self):
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"train.{name} must be {expected}, got {getattr(self, name)!r}")

        need(self.max_steps >= 1, "max_steps", ">= 1")
        need(self.time_budget_s is None or self.time_budget_s > 0, "time_budget_s", "> 0 seconds or null")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.grad_accum >= 1, "grad_accum", ">= 1")
        need(self.lr > 0, "lr", "> 0")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "in [0, 1]")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {LR_SCHEDULES}")
        need(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(isinstance(self.betas, (list, tuple)) and len(self.betas) == 2
             and all(0.0 <= float(b) < 1.0 for b in self.betas), "betas", "a list of 2 values in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", ">= 0")
        need(self.num_threads is None or self.num_threads >= 1, "num_threads", ">= 1 or null")
        need(self.log_every >= 1, "log_every", ">= 1")
        need(self.save_every >= 0, "save_every", ">= 0")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1")
        need(math.isfinite(self.collective_timeout_s) and self.collective_timeout_s > 0, "collective_timeout_s",
             "a finite number of seconds > 0")


# =============================================================================================
# what a stage provides
# =============================================================================================
class Stage:
    """One training stage: built as ``Stage(cfg, accelerator)`` after the init seed is set, then driven
    by :func:`run`. ``__init__`` must set ``model`` (prepared), ``optimizer`` and ``params``; the rest
    has defaults.

    Checkpoint contents: without DeepSpeed ``weights()`` (default ``(tag, unwrapped model)``) and
    ``optimizer``; under DeepSpeed the engine ``model`` under ``tag`` (its shards) and, when set,
    ``write_pretrained(folder)`` beside it (what ``adatok export`` needs). ``replicated`` and
    ``replicated_optimizers`` (an EMA, a discriminator) are saved in either case.
    """

    desc = "train"                 # the progress bar's label
    tag = "model"                  # the engine's name in checkpoints (and in final_model)
    count: str | None = "images"   # the state counter advanced by the global batch each step ({count}_per_s)
    autocast = True                # run step() under a half-precision engine's autocast
    postfix_keys: tuple = ()       # logged values shown on the bar beside loss / lr
    log_export = True              # append an {"event": "export"} row to log.jsonl
    ema = None                     # an engine.EMA updated after every optimizer step (exported when set)
    replicated: dict | None = None             # extra modules saved by rank 0 in every mode
    replicated_optimizers: dict | None = None  # their optimizers
    write_pretrained = None        # folder -> None: config (and processor) beside the engine's shards
    whole = None                   # final_model's ``whole``: the module to export when the engine is part of it
    rebuild = None                 # final_model's ``rebuild``: builds an empty copy to load whole weights into
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list

    def counters(self) -> dict:
        """The stage's own entries of the trainer state (checkpointed; restored on resume)."""
        return {}

    def weights(self) -> tuple[str, object]:
        """What a run without DeepSpeed checkpoints as its model: ``(name, object with state_dict)``."""
        return self.tag, self.accelerator.unwrap_model(self.model)

    def banner(self) -> str:
        """The first line of the run, printed by the main process (the loop adds batch, device, precision)."""
        return type(self).__name__

    def set_position(self, epoch: int, batch: int) -> None:
        """Start the data at ``batch`` of ``epoch`` (after a resume, and at every epoch rollover)."""
        self.sampler.set_position(epoch, batch)

    def batches(self):
        """The (rest of the) current epoch's batches."""
        raise NotImplementedError

    def prepare(self, batch, state: dict):
        """Move a batch to the device; ``None`` skips it (it still counts as taken from the sampler)."""
        return batch

    def drop_unreadable(self, batch, state: dict, may_be_empty: bool = True) -> bool:
        """For ``prepare`` of a batch of images decoded per item: add its ``num_skipped`` unreadable images to
        ``state["skipped_images"]``, and with ``may_be_empty`` say whether the batch is empty here or on another
        rank (a collective: every rank asks at every step), so that all ranks skip that step together."""
        state["skipped_images"] = state.get("skipped_images", 0) + int(batch.get("num_skipped", 0))
        return may_be_empty and any_rank(self.accelerator, batch["pixel_values"].shape[0] == 0)

    def step(self, batch, state: dict) -> dict:
        """Forward pass of one micro-batch: the values to check for NaN/inf, ``"loss"`` (backpropagated) among them."""
        raise NotImplementedError

    def after_backward(self, batch, state: dict) -> None:
        """After the optimizer step, inside ``accumulate``: a second model's step (the GAN discriminator)."""

    def on_step_end(self, state: dict, log: bool) -> dict | None:
        """After an optimizer step (``state["step"]`` already advanced): bookkeeping, and the values to
        log when ``log`` (averaged over ranks here: every rank calls this at every step)."""
        return None

    def on_epoch_end(self, state: dict) -> None:
        """After the last batch of an epoch, before the rollover."""

    def on_train_end(self, state: dict) -> None:
        """After the last step, before the final checkpoint (every rank)."""

    def summary(self, state: dict) -> dict:
        """The stage's entries of the summary ``train`` returns."""
        return {}

    def export(self, model: torch.nn.Module, folder: Path, state: dict) -> dict:
        """Write the whole trained ``model`` (main process only); returns the paths for the summary."""
        model.save_pretrained(folder)
        return {"model_dir": str(folder)}


class TrainingInterrupted(Exception):
    """Ctrl-C during a run: the state was saved; ``str()`` is the one line to show."""

    def __init__(self, step: int, checkpoint: str | None, is_main: bool):
        self.step, self.checkpoint, self.is_main = step, checkpoint, is_main
        super().__init__(f"interrupted at step {step}; resume with --resume auto"
                         + (f" (checkpoint {checkpoint})" if checkpoint else ""))


# =============================================================================================
# small pieces
# =============================================================================================
def rank_seed(accelerator, seed: int) -> None:
    """Seed the global stream per rank after the model is built: the same init everywhere, different
    data randomness per rank."""
    torch.manual_seed(seed + 1000 * accelerator.process_index)


def expected_steps(step: int, elapsed: float, max_steps: int, time_budget_s: float | None) -> int:
    """How many steps the run will take, as far as it is known: ``max_steps``, or fewer when the time
    budget ends it first (the steps so far scaled to the whole budget). The bar's total, so its ETA
    holds for either budget."""
    if not time_budget_s or step <= 0 or elapsed <= 0:
        return max_steps
    return max(step, min(max_steps, round(step * time_budget_s / elapsed)))


def checkpoint_manager(accelerator, out_dir: Path, keep: int) -> CheckpointManager:
    """The run's one CheckpointManager, before the stage exists: it claims the output folder first, so
    nothing is built, measured or written there before the lock is held and a previous run is refused
    or removed. :func:`attach_stage` then registers what its checkpoints hold."""
    return CheckpointManager(out_dir, {}, {}, keep=keep, is_main_process=accelerator.is_main_process,
                             rank=accelerator.process_index, world_size=accelerator.num_processes,
                             local_rank=accelerator.local_process_index, barrier=accelerator.wait_for_everyone,
                             any_rank=lambda flag: any_rank(accelerator, flag))


def attach_stage(ckpt: CheckpointManager, stage: Stage, accelerator) -> CheckpointManager:
    """Register the built ``stage``'s pieces with the run's manager (see :class:`Stage` for what it holds)."""
    modules, optimizers = dict(stage.replicated or {}), dict(stage.replicated_optimizers or {})
    engines = pretrained = None
    if uses_deepspeed(accelerator):
        engines = {stage.tag: stage.model}
        pretrained = {stage.tag: stage.write_pretrained} if stage.write_pretrained is not None else None
    else:
        name, weights = stage.weights()
        modules, optimizers = {name: weights, **modules}, {"optimizer": stage.optimizer, **optimizers}
    return ckpt.attach(modules, optimizers, engines=engines, pretrained=pretrained,
                       model_config=architecture(stage.model),
                       model_config_defaults=architecture(stage.model, defaults=True))


# Config entries that say where things are or how they are labelled, not what the weights are: a
# resume may change them (a moved VAE folder) without the checkpoint's weights stopping to fit.
NOT_ARCHITECTURE = ("vae_path", "architectures", "auto_map", "id2label", "label2id")


def architecture(model: torch.nn.Module, defaults: bool = False) -> dict | None:
    """The model config a checkpoint records and a resume must match (``CheckpointManager(model_config=)``:
    a changed field is named before any weights load), without the entries in ``NOT_ARCHITECTURE``.
    ``defaults``: the same for the config class's defaults (``integrity.config_defaults``), which stand in
    for a field a checkpoint from before that field existed does not record."""
    config = getattr(getattr(model, "module", model), "config", None)
    if not callable(getattr(config, "to_dict", None)):
        return None
    values = config_defaults(config) if defaults else config.to_dict()
    return None if values is None else {k: v for k, v in values.items() if k not in NOT_ARCHITECTURE}


# =============================================================================================
# the loop
# =============================================================================================
def run(cfg, stage_cls: type[Stage]) -> dict:
    """Train ``stage_cls(cfg, accelerator)`` under ``cfg.train`` (a :class:`LoopConfig`); returns a
    summary (steps, wall time, throughput, final checkpoint, export paths, the stage's own entries).
    Raises :class:`~.engine.NonFiniteLossError` on NaN/inf (after saving) and
    :class:`TrainingInterrupted` on Ctrl-C (after saving the last completed step; a half-accumulated
    step is redone on resume; with several processes each rank gets the launcher's signal and the
    save is collective, as every save is).

    The output folder is claimed (lock, refusal to mix with another run, ``overwrite``) before the stage is
    built, so nothing is measured or written there first (stage 2's reward table). With several processes
    every collective is bounded by ``train.collective_timeout_s``, and a rank whose peer died or hung raises
    :class:`~.distributed.PeerProcessLostError` naming the cause."""
    tc: LoopConfig = cfg.train
    configure_threads(tc.num_threads)
    accelerator = make_accelerator(tc.mixed_precision, tc.grad_accum, deepspeed=tc.deepspeed,
                                   micro_batch_size=tc.batch_size, grad_clip=tc.grad_clip)
    set_collective_timeout(accelerator, tc.collective_timeout_s)
    ckpt = checkpoint_manager(accelerator, Path(tc.output_dir), tc.keep_checkpoints)
    try:
        with ckpt.claim(resume=tc.resume, overwrite=tc.overwrite):   # the lock, before anything is built or written
            torch.manual_seed(tc.seed)                               # the same init on every rank
            stage = stage_cls(cfg, accelerator)
            set_collective_timeout(accelerator, tc.collective_timeout_s)   # and the groups the engine made
            attach_stage(ckpt, stage, accelerator)
            return _train(cfg, accelerator, stage, ckpt)
    except Exception as error:
        lost = peer_lost(accelerator, error, tc.collective_timeout_s, tc.output_dir)
        if lost is None:
            raise
        raise lost from error


def _train(cfg, accelerator, stage: Stage, ckpt: CheckpointManager) -> dict:
    """:func:`run`'s body, inside the claimed output folder."""
    tc: LoopConfig = cfg.train
    is_main, world, ds = accelerator.is_main_process, accelerator.num_processes, uses_deepspeed(accelerator)
    out_dir = Path(tc.output_dir)
    raw_model = accelerator.unwrap_model(stage.model)
    state = {"step": 0, "epoch": 0, "batch": 0, "elapsed_s": 0.0, **({stage.count: 0} if stage.count else {}),
             **stage.counters()}
    if tc.resume and (tc.resume != "auto" or ckpt.latest() is not None):
        path = ckpt.latest() if tc.resume == "auto" else tc.resume
        state = ckpt.load(path)
        if is_main:
            print(f"resumed from {path} at step {state['step']}")
    stage.set_position(state["epoch"], state["batch"])

    logger = RunLogger(out_dir, enabled=is_main)
    if is_main:
        threads = "" if torch.cuda.is_available() else f", {torch.get_num_threads()} CPU threads"
        print(f"{stage.banner()}, {describe_batch(tc.batch_size, tc.grad_accum, world)}, device {accelerator.device}"
              f"{threads}, mixed precision {accelerator.mixed_precision}"
              + (f", DeepSpeed ZeRO-{zero_stage(accelerator)}" if ds else ""))
    global_batch = tc.batch_size * tc.grad_accum * world
    saved = {"step": None, "path": None}

    def save(step: int) -> Path | None:   # with several processes ckpt.save fences itself with barriers
        saved.update(step=step, path=ckpt.save(step, state))
        return saved["path"]

    bar = tqdm(total=expected_steps(state["step"], state["elapsed_s"], tc.max_steps, tc.time_budget_s),
               initial=state["step"], disable=not is_main, desc=stage.desc, dynamic_ncols=True)
    started = time.time() - state["elapsed_s"]
    last_log = {"time": time.time(), "step": state["step"], "count": state.get(stage.count, 0)}
    batch_at_step = state["batch"]
    stage.model.train()
    done = state["step"] >= tc.max_steps                          # a finished run takes no step
    try:
        while not done:
            for batch in stage.batches():
                step = state["step"]
                batch = stage.prepare(batch, state)
                if batch is None:
                    state["batch"] += 1
                    continue
                elapsed = time.time() - started
                lr = lr_at(run_progress(step, elapsed, tc.max_steps, tc.time_budget_s), step, tc.lr,
                           tc.warmup_steps, tc.lr_schedule, tc.min_lr_ratio)
                set_lr(stage.optimizer, lr)
                autocast = half_precision_autocast(accelerator) if stage.autocast else contextlib.nullcontext()
                with accelerator.accumulate(stage.model), autocast:
                    checks = stage.step(batch, state)
                    stop_if_non_finite(accelerator, checks, step, save, close=(bar, logger))
                    grad_norm = optimizer_step(accelerator, checks["loss"], stage.optimizer, stage.params,
                                               tc.grad_clip)
                    stage.after_backward(batch, state)
                state["batch"] += 1
                if not accelerator.sync_gradients:
                    continue
                if stage.ema is not None:
                    stage.ema.update(raw_model)
                state["step"] = step = step + 1
                if stage.count:
                    state[stage.count] += global_batch
                state["elapsed_s"] = elapsed = time.time() - started
                batch_at_step = state["batch"]
                log = step % tc.log_every == 0 or step == 1
                values = stage.on_step_end(state, log)
                if tc.time_budget_s:
                    bar.total = expected_steps(step, elapsed, tc.max_steps, tc.time_budget_s)
                bar.update(1)
                if log and values is not None:
                    _log(logger, bar, stage, values, state, last_log, lr, grad_norm, tc)
                if tc.save_every and step % tc.save_every == 0:
                    save(step)
                if step >= tc.max_steps or (tc.time_budget_s and elapsed >= tc.time_budget_s):
                    done = True
                    break
            else:
                stage.on_epoch_end(state)
                state["epoch"] += 1
                state["batch"] = batch_at_step = 0
                stage.set_position(state["epoch"], 0)
    except KeyboardInterrupt:
        bar.close()
        state["batch"] = batch_at_step                          # redo a half-accumulated step on resume
        path = saved["path"] if saved["step"] == state["step"] else save(state["step"])
        logger.close()
        raise TrainingInterrupted(state["step"], str(path) if path else None, is_main) from None
    bar.close()
    stage.on_train_end(state)
    final_ckpt = save(state["step"])
    summary = {"steps": state["step"], "wall_s": state["elapsed_s"],
               **({f"{stage.count}_per_s": state[stage.count] / max(state["elapsed_s"], 1e-9)} if stage.count else {}),
               "checkpoint": str(final_ckpt) if final_ckpt else None, **stage.summary(state)}
    if tc.export:
        exported = stage.ema.shadow if stage.ema is not None else final_model(      # a collective
            accelerator, stage.model, final_ckpt, stage.tag, whole=stage.whole, rebuild=stage.rebuild)
        if is_main:
            write_training_info(out_dir / "model", cfg, state, world)   # the model card's "training" section
            summary.update(stage.export(exported, out_dir / "model", state))
            if stage.log_export:
                logger.log(state["step"], {"event": "export",
                                           **{k: v for k, v in summary.items() if k != "checkpoint"}})
    accelerator.wait_for_everyone()
    logger.close()
    return summary


def write_training_info(folder: Path, cfg, state: dict, world: int) -> None:
    """What the run knows of itself, for the exported model's card (``tokenizer.model_card``): its data,
    steps, global batch, learning rate and seed."""
    from ..tokenizer.model_card import TRAINING_INFO

    tc, data = cfg.train, getattr(cfg, "data", None)
    source = getattr(data, "dataset", None) or getattr(data, "tokens", None)
    training = {"data": str(source) if source is not None else None, "steps": state["step"],
                "global_batch": tc.batch_size * tc.grad_accum * world, "lr": tc.lr, "seed": tc.seed}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TRAINING_INFO).write_text(json.dumps({"training": training}, indent=1), encoding="utf-8")


def _log(logger: RunLogger, bar, stage: Stage, values: dict, state: dict, last: dict, lr: float, grad_norm,
         tc: LoopConfig) -> None:
    """Add the loop's own values (lr, gradient norm, throughput since the last log) and write them."""
    now, step = time.time(), state["step"]
    seconds = max(now - last["time"], 1e-9)
    values = {**values, "lr": lr, "step_time_s": seconds / max(1, step - last["step"])}
    if grad_norm is not None:
        values["grad_norm"] = float(grad_norm)
    postfix = {"loss": f"{values['loss']:.4f}", "lr": f"{lr:.2e}"}
    if stage.count:
        values[f"{stage.count}_per_s"] = (state[stage.count] - last["count"]) / seconds
        postfix["/s"] = f"{values[f'{stage.count}_per_s']:.0f}"
    last.update(time=now, step=step, count=state.get(stage.count, 0))
    logger.log(step, values)
    postfix.update({k: f"{values[k]:.3g}" for k in stage.postfix_keys if k in values})
    if tc.time_budget_s:
        postfix["left"] = f"{max(0.0, tc.time_budget_s - state['elapsed_s']):.0f}s"
    bar.set_postfix(postfix)


def main(config_cls, train, argv: list[str] | None, what: str) -> dict:
    """A trainer's command line: parse ``config_cls``, ``train`` it, print where ``what`` was exported.
    Ctrl-C prints one line and exits with status 130 (the checkpoint it saved resumes with ``--resume auto``);
    a rank whose peer died or hung (:class:`~.distributed.PeerProcessLostError`) prints one line naming the cause
    and exits with status 1."""
    cfg, _ = parse_config(config_cls, argv)
    try:
        summary = train(cfg)
    except TrainingInterrupted as stop:
        if stop.is_main:
            print(stop)
        raise SystemExit(130) from None
    except PeerProcessLostError as lost:
        print(f"error: {lost}", file=sys.stderr, flush=True)   # every surviving rank says it: each may be alone
        raise SystemExit(1) from None
    if summary.get("model_dir"):
        print(f"exported {what}: {summary['model_dir']}")
    return summary
