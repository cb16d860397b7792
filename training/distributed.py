"""Scale-out helpers: DeepSpeed ZeRO through Accelerate's plugin, shared by every training loop.

The trainers stay the same code on one CPU, one GPU, one node of 8 GPUs or many nodes. What differs
under DeepSpeed is gathered here, so a loop only asks questions such as "is this ZeRO-3?" or "give me
a full copy of the model on the main process":

* ``build_deepspeed_plugin`` turns a DeepSpeed JSON (``configs/deepspeed/zero2.json`` ...) into
  Accelerate's ``DeepSpeedPlugin``, filling the ``"auto"`` values our configs own: micro batch,
  accumulation, gradient clipping (DeepSpeed clips inside its own step; ``clip_grad_norm_`` then only
  reports the norm), and forcing ``stage3_gather_16bit_weights_on_model_save`` so that a ZeRO-3 run can
  still write sample grids and a ``save_pretrained`` export.
* Under ZeRO-3 every rank holds only a shard of each parameter; any forward pass is a collective.
  ``gathered`` (``deepspeed.zero.GatheredParameters``) and ``materialize`` (a consolidated plain
  copy on the main process) are the two ways a loop reads whole weights; rank-0-only forwards through
  the sharded module would hang the other ranks.
* ``replicate`` wraps a small module that stays *outside* ZeRO (the GAN discriminator) in plain DDP.
* ``assert_replicas_match`` checks that every rank built the same initial weights (init seeds match;
  data seeds are offset per rank by the trainers).
* ``mean_over_ranks`` averages logged values, so a logged loss is the global batch's loss.
* ``set_collective_timeout`` bounds every collective (``train.collective_timeout_s``); ``peer_lost`` turns
  the error of a collective whose peer died or hung into ``PeerProcessLostError``, naming the cause.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# what kind of run is this?
# ---------------------------------------------------------------------------------------------
def deepspeed_requested(config: str | dict | None = None) -> bool:
    """True when a DeepSpeed config is given or ``accelerate launch`` was told to use DeepSpeed."""
    return bool(config) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    """The ZeRO stage of the active DeepSpeed plugin, 0 when DeepSpeed is not in use."""
    if not uses_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].get("stage", 0))


# ---------------------------------------------------------------------------------------------
# the DeepSpeed plugin
# ---------------------------------------------------------------------------------------------
def resolve_deepspeed_config(config: str | dict) -> dict:
    """A dict, a JSON path, or a bare name of ``configs/deepspeed`` (``"zero2"``, ``"zero3_offload"``)."""
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    path = Path(config)
    from .config import configs_dir

    # a name: the working folder's configs/deepspeed (a checkout's, or a user's own), then the packaged one
    folders = (Path.cwd() / "configs" / "deepspeed", configs_dir() / "deepspeed")
    for folder in folders:
        if not path.is_file() and (folder / f"{config}.json").is_file():
            path = folder / f"{config}.json"
    if not path.is_file():
        names = sorted({p.stem for folder in folders for p in folder.glob("*.json")})
        raise FileNotFoundError(f"DeepSpeed config {config!r} not found (a JSON file, or a name of "
                                f"configs/deepspeed/: {names})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_deepspeed_plugin(config: str | dict | None, micro_batch_size: int, gradient_accumulation_steps: int = 1,
                           grad_clip: float = 0.0):
    """Accelerate's ``DeepSpeedPlugin`` with the ``"auto"`` values our training config owns filled in.

    ``config`` None reads what ``accelerate launch`` exported (``deepspeed_config_file`` or the inline
    ``zero_stage`` of an Accelerate YAML). ``zero3_init_flag`` stays off: our models are built whole on
    every rank and sharded by ``prepare``, so frozen helpers (the stage-1 tokenizer under stage 2, the
    perceptual net) are never swept into ``zero.Init`` by ``from_pretrained``.
    """
    from accelerate.utils import DeepSpeedPlugin

    hf_ds_config = resolve_deepspeed_config(config) if config else None
    plugin = DeepSpeedPlugin(hf_ds_config=hf_ds_config, gradient_accumulation_steps=gradient_accumulation_steps,
                             gradient_clipping=float(grad_clip) if grad_clip and grad_clip > 0 else 0.0,
                             zero3_init_flag=False)
    ds = plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
    zero = ds.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        plugin.zero3_save_16bit_model = True
    return plugin


# ---------------------------------------------------------------------------------------------
# reading whole weights under ZeRO-3
# ---------------------------------------------------------------------------------------------
def gathered(accelerator, params: Iterable[nn.Parameter]):
    """Context in which ZeRO-3 parameters are whole on every rank (a collective); a no-op otherwise."""
    if zero_stage(accelerator) != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def param_gatherer(accelerator) -> Callable | None:
    """``gathered`` bound to ``accelerator`` under ZeRO-3 (for :class:`~.engine.EMA`), else None."""
    if zero_stage(accelerator) != 3:
        return None
    return lambda params: gathered(accelerator, params)


def full_state_dict(accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the main process (``{}`` elsewhere under ZeRO-3). Call on every rank."""
    if uses_deepspeed(accelerator):
        state = accelerator.get_state_dict(model)
        return state if accelerator.is_main_process else {}
    return accelerator.unwrap_model(model).state_dict()


def materialize(accelerator, model: nn.Module) -> nn.Module | None:
    """A plain module with whole weights on the main process, ``None`` elsewhere. Call on every rank.

    Without ZeRO-3 it is the unwrapped model itself; under ZeRO-3 a fresh copy (built from the
    model's config under a forked RNG, so the training stream is untouched) loads the consolidated
    weights: sample grids and exports then run on rank 0 alone without touching the shards.
    """
    raw = accelerator.unwrap_model(model)
    if zero_stage(accelerator) != 3:
        return raw if accelerator.is_main_process else None
    state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    with torch.random.fork_rng(devices=[]):
        copy = type(raw)(raw.config)
    copy.load_state_dict(state)
    return copy.to(accelerator.device).train(raw.training)


# ---------------------------------------------------------------------------------------------
# modules kept outside ZeRO, consistency checks, logging
# ---------------------------------------------------------------------------------------------
def replicate(module: nn.Module, accelerator) -> nn.Module:
    """Plain DistributedDataParallel over the default process group (a no-op with one process)."""
    module = module.to(accelerator.device)
    if accelerator.num_processes == 1:
        return module
    device_ids = [accelerator.device.index] if accelerator.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def assert_replicas_match(accelerator, module: nn.Module, what: str = "model") -> None:
    """Raise if the ranks built different initial weights (a per-rank seed before model init)."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        total = torch.zeros(2, dtype=torch.float64)
        for p in module.parameters():
            total[0] += p.detach().double().sum().cpu()
            total[1] += p.detach().double().square().sum().cpu()
    sums = accelerator.gather(total.to(accelerator.device)).view(-1, 2).cpu()
    if not torch.allclose(sums, sums[:1].expand_as(sums), rtol=1e-9, atol=0.0):
        raise RuntimeError(f"the {what} differs across ranks at init ({sums.tolist()}): seed the model "
                           "construction with the same seed on every rank")


def mean_over_ranks(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Average scalar logs over ranks (a collective: every rank calls it at the same steps)."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return {k: float(v) for k, v in zip(keys, t.cpu().tolist())}


def describe_batch(micro: int, accumulation: int, world: int) -> str:
    """``"global batch 64 = 8 micro x 2 accumulation x 4 processes"``, printed by every trainer."""
    return (f"global batch {micro * accumulation * world} = {micro} micro x {accumulation} accumulation "
            f"x {world} processes")


def non_finite_anywhere(accelerator, bad: tuple[str, float] | None) -> tuple[str, float] | None:
    """``check_finite``'s answer made the same on every rank, so all ranks stop (and save) together."""
    if accelerator.num_processes == 1:
        return bad
    flag = torch.tensor([0.0 if bad is None else 1.0], device=accelerator.device)
    if float(accelerator.reduce(flag, reduction="sum")) == 0:
        return None
    return bad if bad is not None else ("loss on another rank", float("nan"))


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any (a collective with several processes)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return float(accelerator.reduce(value, reduction="sum")) > 0


# ---------------------------------------------------------------------------------------------
# a rank that dies or hangs
# ---------------------------------------------------------------------------------------------
class PeerProcessLostError(RuntimeError):
    """A collective failed: another process of the run died (SIGKILL, out of memory, a lost node), hung past
    ``train.collective_timeout_s`` or cannot be reached. Raised on each surviving rank by ``loop.run``."""


# What a failed collective's error says (gloo's and NCCL's transports, c10d's process group and store).
COLLECTIVE_FAILURE_SIGNS = ("gloo", "NCCL", "ProcessGroup", "c10d", "Connection reset by peer",
                            "Connection closed by peer", "Broken pipe")


def set_collective_timeout(accelerator, seconds: float) -> None:
    """Bound every collective of this run to ``seconds``: the default process group and every group made so far
    (DeepSpeed clones the world group for its reductions, and a new group starts from torch's 30-minute default
    whatever the default group was given). A no-op with one process. Call again after an engine is built."""
    if accelerator.num_processes == 1:
        return
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    setter = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout   # torch < 2.10
    groups = list(getattr(getattr(dist.distributed_c10d, "_world", None), "pg_map", None) or [None])
    for group in groups:
        try:
            setter(datetime.timedelta(seconds=float(seconds)), group)
        except (ValueError, RuntimeError):   # a group this rank is not in; a backend that keeps its timeout
            pass


def is_collective_failure(error: BaseException | None) -> bool:
    """Whether ``error`` (or an error it was raised from) is a failed collective rather than a bug of this rank."""
    import torch.distributed as dist

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, dist.DistError):
            return True
        if isinstance(error, RuntimeError) and any(sign in str(error) for sign in COLLECTIVE_FAILURE_SIGNS):
            return True
        error = error.__cause__ or error.__context__
    return False


def peer_lost(accelerator, error: BaseException, timeout_s: float, output_dir) -> PeerProcessLostError | None:
    """The clear error for a rank whose collective failed because of another rank (``None`` for any other error,
    and with one process): it names the cause, the timeout and how to continue."""
    if accelerator.num_processes == 1 or isinstance(error, PeerProcessLostError) or not is_collective_failure(error):
        return None
    first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return PeerProcessLostError(
        f"rank {accelerator.process_index} of {accelerator.num_processes} stops: another process of this run died, "
        f"hung for more than train.collective_timeout_s = {timeout_s:g} s, or cannot be reached (a collective "
        f"failed: {first_line[:300]}). Restart every process with --train.resume auto: the run continues from the "
        f"newest complete checkpoint in {output_dir}/checkpoints")


def stop_if_non_finite(accelerator, values: dict, step: int, save: Callable[[int], Path | None],
                       close: Iterable = ()) -> None:
    """When any rank's ``values`` hold NaN or inf, every rank saves (``save(step)``), closes ``close``
    (progress bar, logger) and raises :class:`~.engine.NonFiniteLossError` naming the value and the step."""
    from .engine import NonFiniteLossError, check_finite

    bad = non_finite_anywhere(accelerator, check_finite(values))
    if bad is None:
        return
    path = save(step)
    for handle in close:
        handle.close()
    raise NonFiniteLossError(step, bad[0], bad[1], str(path) if path else None)


def fill_bucket_sizes(accelerator, hidden_size: int) -> None:
    """Fill the hidden-size-based ``"auto"`` ZeRO buckets for a model without ``config.hidden_size``
    (Accelerate's own rule: h*h reduce bucket, 0.9*h*h prefetch, 10*h persistence threshold)."""
    if not uses_deepspeed(accelerator):
        return
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("zero_optimization", {})
    values = {"reduce_bucket_size": hidden_size * hidden_size,
              "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
              "stage3_param_persistence_threshold": 10 * hidden_size}
    for key, value in values.items():
        if zero.get(key) == "auto":
            zero[key] = value


def half_precision_autocast(accelerator):
    """Autocast for a DeepSpeed bf16/fp16 engine (a no-op otherwise).

    Such an engine holds its weights in half precision but neither casts the inputs nor covers the
    pieces that stay outside it (frozen nets, the GAN discriminator, a policy head called directly):
    autocast makes every matmul/conv agree on the dtype, as Accelerate's own autocast does for DDP.
    """
    if not uses_deepspeed(accelerator):
        return contextlib.nullcontext()
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("bf16", {}).get("enabled") is True:
        return torch.autocast(device_type=accelerator.device.type, dtype=torch.bfloat16)
    if ds.get("fp16", {}).get("enabled") is True:
        return torch.autocast(device_type=accelerator.device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def half_precision_engine(accelerator) -> bool:
    """Whether a DeepSpeed engine keeps its weights in bf16/fp16 (fp32 master copies in the optimizer)."""
    if not uses_deepspeed(accelerator):
        return False
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    return ds.get("bf16", {}).get("enabled") is True or ds.get("fp16", {}).get("enabled") is True


def final_model(accelerator, model: nn.Module, checkpoint: str | Path | None, tag: str = "model", *,
                whole: nn.Module | None = None, rebuild: Callable[[], nn.Module] | None = None) -> nn.Module | None:
    """The trained model to export, whole, on the main process (``None`` elsewhere); call on every rank.

    The one export path of every trainer. Without DeepSpeed, or under ZeRO-1/2 with fp32 weights, the
    live module is exact and is returned as it is. Otherwise its whole weights are read: the fp32
    master weights from the run's final ``checkpoint`` (engine ``tag``) for a half-precision engine
    (its live weights are rounded copies), or gathered from the ranks under ZeRO-3 (a collective);
    they are loaded into a fresh copy, ``rebuild()`` (default: the module's class built from its
    config), under a forked RNG so the training stream is untouched.

    ``whole`` is the module to export when the engine trains only a part of it (stage 2's policy and
    quality heads inside the frozen tokenizer): the engine's weights, named as in ``whole``, replace
    its own, and the rest of ``whole`` is kept.
    """
    target = whole if whole is not None else accelerator.unwrap_model(model)
    half = half_precision_engine(accelerator)
    if not half and zero_stage(accelerator) != 3:
        return target if accelerator.is_main_process else None
    if half:
        state = None
        if accelerator.is_main_process:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)
    else:
        state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    if whole is not None:
        state = {**whole.state_dict(), **state}
    with torch.random.fork_rng(devices=[]):
        copy = rebuild() if rebuild is not None else type(target)(target.config)
    result = copy.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"the whole weights of {tag!r} do not fit the rebuilt {type(copy).__name__}: missing "
                           f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return copy.to(accelerator.device)
