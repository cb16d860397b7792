"""One place that builds the Accelerator, so every entry point runs on one CPU, one GPU or many nodes.

On CPU the process group must use gloo (Accelerate defaults to a backend DeepSpeed and NCCL runs
cannot use there); on GPU bf16 is used when supported, fp32 on CPU.

DeepSpeed ZeRO is switched on either by ``accelerate launch --config_file configs/accelerate/...``
(an Accelerate YAML with ``distributed_type: DEEPSPEED``) or by a trainer's ``train.deepspeed``
field (a JSON such as ``configs/deepspeed/zero3.json``, or its bare name ``zero3``) under any
launcher that sets the usual ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (``torchrun``, ``deepspeed
--no_local_rank``, ``srun`` through ``torchrun``), or with no launcher at all (one process becomes a
world of one). The micro batch, accumulation and clipping in the DeepSpeed JSON are ``"auto"``: the
trainer's config fills them (see ``distributed``).
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from .distributed import build_deepspeed_plugin, deepspeed_requested

# What the launcher said, before any Accelerator of this process wrote its own choice into the env.
_LAUNCHER_USE_DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED")


def resolve_mixed_precision(mixed_precision: str) -> str:
    if mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be 'auto', 'no', 'bf16' or 'fp16', got {mixed_precision!r}")
    if mixed_precision != "auto":
        return mixed_precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(mixed_precision: str = "auto", gradient_accumulation_steps: int = 1,
                     deepspeed_plugin=None, *, deepspeed: str | dict | None = None, micro_batch_size: int = 1,
                     grad_clip: float = 0.0, zero3_init: bool = False) -> Accelerator:
    """The Accelerator for a trainer; with ``deepspeed`` (or a DeepSpeed ``accelerate launch``) a ZeRO run.

    ``micro_batch_size`` and ``grad_clip`` only matter under DeepSpeed, whose engine owns the batch
    arithmetic and clips gradients inside its step. ``zero3_init`` False (our trainers) keeps
    Transformers' ``from_pretrained`` from building models inside ``deepspeed.zero.Init`` under ZeRO-3:
    Accelerate registers its config with Transformers whatever ``zero3_init_flag`` says, which would
    shard frozen helpers (the stage-1 tokenizer of stage 2) that never enter an engine. A trainer whose
    model does not fit one device whole passes True and builds it after this call.
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    on_cpu = not torch.cuda.is_available()
    if deepspeed_plugin is None and deepspeed_requested(deepspeed):
        deepspeed_plugin = build_deepspeed_plugin(deepspeed, micro_batch_size, gradient_accumulation_steps,
                                                  grad_clip)
    if deepspeed_plugin is not None and "LOCAL_RANK" not in os.environ:
        _world_of_one()
    # Only a launched multi-process CPU run (or DeepSpeed, always in a process group) needs gloo;
    # naming a backend in a plain single process would make Accelerate look for a group that does not exist.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and (distributed or deepspeed_plugin) else []
    if deepspeed_plugin is not None:
        # Accelerate drops DeepSpeed when told cpu=True (or ACCELERATE_USE_CPU): on a CPU-only host the
        # DeepSpeed engine runs on its CPU accelerator over the gloo group instead.
        os.environ.pop("ACCELERATE_USE_CPU", None)
        cpu = False
    else:
        # cpu=True on a launched CPU run: without it Accelerate reports no distributed type, so barriers
        # and gradient synchronisation silently do nothing.
        cpu = distributed and on_cpu
    accelerator = Accelerator(cpu=cpu, mixed_precision=resolve_mixed_precision(mixed_precision),
                              gradient_accumulation_steps=gradient_accumulation_steps,
                              kwargs_handlers=handlers, deepspeed_plugin=deepspeed_plugin)
    if deepspeed_plugin is not None and not zero3_init:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        deepspeed_plugin.zero3_init_flag = False
        unset_hf_deepspeed_config()
        deepspeed_plugin.dschf = None
    elif deepspeed_plugin is not None:
        deepspeed_plugin.zero3_init_flag = True
        deepspeed_plugin.set_deepspeed_weakref()
    return accelerator


def _world_of_one() -> None:
    """DeepSpeed always runs inside a process group; without a launcher, make this process a world of
    one (otherwise DeepSpeed goes looking for MPI)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def reset_accelerator_state() -> None:
    """Forget the process-wide Accelerate singletons, so one process can run several trainers in turn
    (each with its own DeepSpeed plugin); the process group itself is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if _LAUNCHER_USE_DEEPSPEED is None:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    else:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = _LAUNCHER_USE_DEEPSPEED
