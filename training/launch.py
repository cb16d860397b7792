"""One place that builds the Accelerator, so every entry point runs on one CPU, one GPU or many nodes.

On CPU the process group must use gloo (Accelerate defaults to a backend DeepSpeed and NCCL runs
cannot use there); on GPU bf16 is used when supported, fp32 on CPU.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs


def resolve_mixed_precision(mixed_precision: str) -> str:
    if mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be 'auto', 'no', 'bf16' or 'fp16', got {mixed_precision!r}")
    if mixed_precision != "auto":
        return mixed_precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(mixed_precision: str = "auto", gradient_accumulation_steps: int = 1,
                     deepspeed_plugin=None) -> Accelerator:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Only a launched multi-process CPU run needs gloo; naming a backend in a single process would
    # make Accelerate look for a process group that does not exist.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    # cpu=True on a launched CPU run: without it Accelerate reports no distributed type, so barriers
    # and gradient synchronisation silently do nothing.
    return Accelerator(cpu=distributed and not torch.cuda.is_available(),
                       mixed_precision=resolve_mixed_precision(mixed_precision),
                       gradient_accumulation_steps=gradient_accumulation_steps,
                       kwargs_handlers=handlers, deepspeed_plugin=deepspeed_plugin)
