"""Stage 1: train the AdaTok tokenizer with Nested Tail Masking (paper Sec. 4.1, eq. 5).

    python -m adatok_vlm.training.train_tokenizer --config configs/tokenizer/adatok-tiny.yaml \
        --output_dir outputs/tiny --max_steps 2000 --train.lr 2e-3
    accelerate launch -m adatok_vlm.training.train_tokenizer --config configs/tokenizer/adatok-s.yaml ...

Set-up lives here; the loop's shared pieces (LR schedule, EMA, checkpoints, logging) live in
``engine`` and ``checkpointing``. ``--resume auto`` continues from the latest complete checkpoint
with the same step, optimizer, EMA, data position and RNG state.

Under DeepSpeed ZeRO-2/3 (``--train.deepspeed configs/deepspeed/zero3.json``, or ``accelerate launch
--config_file configs/accelerate/...``) the same loop runs unchanged: the tokenizer and its AdamW
become one DeepSpeed engine (sharded optimizer state and gradients, and under ZeRO-3 sharded
weights); logs are averaged over ranks and written by rank 0; sample grids and the export read a
consolidated copy (``distributed.materialize``); checkpoints hold the engine's shards
(``adatok export`` consolidates them).

The GAN problem (two models, two optimizers). The PatchGAN discriminator is kept *outside* ZeRO: a
plain ``DistributedDataParallel`` replica with its own torch AdamW, stepped with its own
``backward``. Chosen over Accelerate's multiple DeepSpeed plugins (a second engine) because

* ``accelerator.backward`` drives one DeepSpeed engine (the last one prepared): two engines would
  need two hand-driven ``engine.backward``/``engine.step`` paths and two sets of "auto" batch values;
* L_G's gradient flows *through* the discriminator to the tokenizer; the discriminator is evaluated
  there with detached parameters (``AdaTokStage1Loss._frozen_discriminator``), which a ZeRO-3
  discriminator (empty parameter shards outside its own forward hooks) would not allow, while a
  replica allows it for free;
* the discriminator is small (about 3% of the tokenizer's parameters at the ``adatok-s`` size):
  sharding it would save next to nothing while adding collectives to every generator step.

Its parameters, optimizer and LeCam statistics are replicated, so rank 0 checkpoints them in
safetensors as in a single-process run.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..tokenizer import AdaTokConfig, AdaTokModel
from .batches import PreloadedImages, ResumableBatchSampler, collate_preloaded, preload_images
from .checkpointing import CheckpointManager
from .config import parse_config
from .distributed import (any_rank, assert_replicas_match, describe_batch, final_model, half_precision_autocast,
                          materialize, mean_over_ranks, param_gatherer, replicate, stop_if_non_finite, uses_deepspeed,
                          zero_stage)
from .engine import EMA, RunLogger, configure_threads, lr_at, optimizer_step, run_progress, set_lr
from .evaluation import default_lengths
from .launch import make_accelerator


# =============================================================================================
# config
# =============================================================================================
@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"          # fashion_mnist | natural_crops | a folder | a save_to_disk dir | a cached hub name
    train_split: str = "train"
    eval_split: str = "test"
    resize_mode: str = "pad"                 # "pad" letter-boxes small images (28 -> 32); "shortest_edge" resizes
    crop: str = "center"
    flip: bool = False                       # random horizontal flips (seeded by step: resumable)
    preload: bool = True                     # process the whole split once into memory (small data sets)
    num_workers: int = 0
    limit: int | None = None                 # use only the first N training images
    num_crops: int = 20000                   # natural_crops only


@dataclass
class LossConfig:
    perceptual_weight: float = 0.0           # lambda_p (eq. 5)
    perceptual_net: str = "vgg"
    gan_weight: float = 0.0                  # lambda_g (eq. 5)
    pixel_weight: float = 0.0                # extra L2 on the decoded image (for a VAE latent space)
    gan_start_step: int = 0
    adaptive_gan_weight: bool = True
    lecam_weight: float = 0.0
    disc_lr: float | None = None             # defaults to train.lr
    disc_base_channels: int = 64
    disc_num_layers: int = 3


@dataclass
class TrainConfig:
    output_dir: str = "outputs/tokenizer"
    seed: int = 0
    max_steps: int = 1000
    time_budget_s: float | None = None       # stop (and finish the LR schedule) within this wall time
    batch_size: int = 64                     # per device
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 4e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    ema_decay: float = 0.0                   # 0 disables EMA
    mixed_precision: str = "auto"            # bf16 on GPUs that support it, fp32 on CPU
    num_threads: int | None = None
    log_every: int = 10
    sample_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None                # "auto" | a checkpoint folder
    export: bool = True                      # save_pretrained the final (EMA) model to <output_dir>/model
    deepspeed: str | None = None             # DeepSpeed JSON (configs/deepspeed/zero2.json) or its name ("zero3")


@dataclass
class TokenizerTrainingConfig:
    model: dict = field(default_factory=lambda: {"preset": "adatok-tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def build_model_config(section: dict) -> AdaTokConfig:
    """``{"preset": name, **overrides}`` (or plain AdaTokConfig fields) -> AdaTokConfig."""
    section = dict(section)
    preset = section.pop("preset", None)
    return AdaTokConfig.from_preset(preset, **section) if preset else AdaTokConfig(**section)


# =============================================================================================
# data
# =============================================================================================
def build_image_processor(model_config: AdaTokConfig, data: DataConfig, train: bool):
    from ..image_processing_adatok import AdaTokImageProcessor

    return AdaTokImageProcessor(size=model_config.image_size, resize_mode=data.resize_mode,
                                crop="random" if (train and data.crop == "random") else "center", do_flip=False)


def load_split(data: DataConfig, split: str, seed: int = 0):
    from .data import load_image_dataset

    kwargs = {"num_crops": data.num_crops, "seed": seed} if data.dataset == "natural_crops" else {}
    return load_image_dataset(data.dataset, split=split, **kwargs)


def build_train_data(cfg: TokenizerTrainingConfig, model_config: AdaTokConfig):
    dataset = load_split(cfg.data, cfg.data.train_split, cfg.train.seed)
    if cfg.data.limit:
        dataset = dataset.select(range(min(cfg.data.limit, len(dataset))))
    processor = build_image_processor(model_config, cfg.data, train=True)
    if cfg.data.preload:
        return preload_images(dataset, processor), collate_preloaded
    from .data import ImageTransformDataset, collate_images

    return ImageTransformDataset(dataset, processor), collate_images


def flip_batch(pixels: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """Random horizontal flips drawn from (seed, step): the same on resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    flip = torch.rand(pixels.shape[0], generator=g) < 0.5
    return torch.where(flip.to(pixels.device)[:, None, None, None], pixels.flip(-1), pixels)


# =============================================================================================
# the adaptive GAN weight under DeepSpeed
# =============================================================================================
class LastLayerInput:
    """Keeps the input ``h [B, n, dim]`` of the decoder's last layer from the latest forward pass."""

    def __init__(self, layer: torch.nn.Module):
        self.h = None
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.h = args[0].detach()


def replayed_adaptive_weight(accelerator, raw_model: AdaTokModel, loss_fn, h: torch.Tensor,
                             target_latents: torch.Tensor, pixels: torch.Tensor, pixel_weight: float) -> float:
    """VQGAN's adaptive weight ``lambda_g * ||d nll/d w|| / ||d L_G/d w||`` for a DeepSpeed engine.

    ``torch.autograd.grad`` through an engine's outputs fires DeepSpeed's backward hooks (its
    prologue/epilogue would run for a pass that is not the training backward), and under ZeRO-3 ``w``
    is a shard. Both losses depend on the last layer's weight ``w`` only through ``h w^T + b`` (``h``
    held fixed), so replaying that layer and everything after it on a detached ``h`` with a gathered,
    detached copy of ``w`` gives exactly the same two gradients, in a small graph DeepSpeed never sees.
    """
    from ..tokenizer.losses import adaptive_generator_weight, hinge_g_loss
    from ..tokenizer.modeling_adatok import unpatchify
    from .distributed import gathered

    layer = raw_model.decoder.to_patches
    with gathered(accelerator, list(layer.parameters())):   # a collective under ZeRO-3
        w = layer.weight.detach().clone().requires_grad_(True)
        b = layer.bias.detach().clone() if layer.bias is not None else None
    c = raw_model.config
    latents = unpatchify(torch.nn.functional.linear(h, w, b), c.patch_size, c.latent_channels,
                         c.latent_grid_size // c.patch_size)
    recon = raw_model.latent_space.decode(latents)
    nll = torch.nn.functional.mse_loss(latents.float(), target_latents.detach().float())
    if pixel_weight > 0:
        nll = nll + pixel_weight * torch.nn.functional.mse_loss(recon.float(), pixels.float())
    if loss_fn.perceptual is not None:
        nll = nll + loss_fn.perceptual_weight * loss_fn.perceptual(recon, pixels).mean()
    g_loss = hinge_g_loss(loss_fn._frozen_discriminator(recon))
    return loss_fn.gan_weight * float(adaptive_generator_weight(nll, g_loss, w, loss_fn.max_adaptive_weight))


@contextlib.contextmanager
def fixed_gan_weight(loss_fn, weight: float | None):
    """Run ``generator_loss`` with a weight computed elsewhere (``None``: leave the loss as it is)."""
    if weight is None:
        yield
        return
    saved = loss_fn.adaptive_gan_weight, loss_fn.gan_weight
    loss_fn.adaptive_gan_weight, loss_fn.gan_weight = False, weight
    try:
        yield
    finally:
        loss_fn.adaptive_gan_weight, loss_fn.gan_weight = saved


# =============================================================================================
# the loop
# =============================================================================================
def train(cfg: TokenizerTrainingConfig) -> dict:
    """Run stage-1 training; returns a summary (steps, wall time, images/s, export path)."""
    tc = cfg.train
    configure_threads(tc.num_threads)
    accelerator = make_accelerator(tc.mixed_precision, tc.grad_accum, deepspeed=tc.deepspeed,
                                   micro_batch_size=tc.batch_size, grad_clip=tc.grad_clip)
    out_dir = Path(tc.output_dir)
    is_main = accelerator.is_main_process
    ds = uses_deepspeed(accelerator)

    # Same init on every rank, different data randomness per rank.
    torch.manual_seed(tc.seed)
    model_config = build_model_config(cfg.model)
    model = AdaTokModel(model_config)
    assert_replicas_match(accelerator, model, "tokenizer")
    torch.manual_seed(tc.seed + 1000 * accelerator.process_index)

    data, collate = build_train_data(cfg, model_config)
    sampler = ResumableBatchSampler(len(data), tc.batch_size, seed=tc.seed, rank=accelerator.process_index,
                                    world_size=accelerator.num_processes)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=cfg.data.num_workers > 0)
    fast_batches = isinstance(data, PreloadedImages) and cfg.data.num_workers == 0

    params = [p for p in model.parameters() if p.requires_grad]
    num_trainable = sum(p.numel() for p in params)   # counted before ZeRO-3 shards the parameters
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    loss_fn, disc, disc_opt = None, None, None
    if cfg.loss.perceptual_weight > 0 or cfg.loss.gan_weight > 0:
        from ..tokenizer.losses import AdaTokStage1Loss

        lc = cfg.loss
        loss_fn = AdaTokStage1Loss(perceptual_weight=lc.perceptual_weight,
                                   perceptual_net=lc.perceptual_net if lc.perceptual_weight > 0 else None,
                                   gan_weight=lc.gan_weight, gan_start_step=lc.gan_start_step,
                                   adaptive_gan_weight=lc.adaptive_gan_weight, lecam_weight=lc.lecam_weight,
                                   disc_base_channels=lc.disc_base_channels, disc_num_layers=lc.disc_num_layers)
        if lc.gan_weight > 0:
            disc = loss_fn.discriminator
            disc_opt = torch.optim.AdamW(disc.parameters(), lr=lc.disc_lr or tc.lr, betas=(0.5, 0.9),
                                         weight_decay=tc.weight_decay)
    # The EMA copies the whole model before prepare (under ZeRO-3 prepare shards it in place).
    ema = EMA(model, tc.ema_decay, gather=param_gatherer(accelerator)).to(accelerator.device) \
        if tc.ema_decay > 0 else None
    if ds:
        model, optimizer = accelerator.prepare(model, optimizer)
        if disc is not None:   # outside ZeRO: a DDP replica (see the module docstring)
            disc = replicate(disc, accelerator)
            loss_fn.discriminator = disc
    elif disc is not None:
        model, optimizer, disc, disc_opt = accelerator.prepare(model, optimizer, disc, disc_opt)
        loss_fn.discriminator = disc   # the wrapped one, so its gradients are synchronised across ranks
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    if loss_fn is not None:
        loss_fn.to(accelerator.device)
    raw_model = accelerator.unwrap_model(model)
    replay = ds and disc is not None and cfg.loss.adaptive_gan_weight
    last_layer_input = LastLayerInput(raw_model.decoder.to_patches) if replay else None

    # Under DeepSpeed the engine writes the tokenizer and its optimizer (sharded); the rest is replicated.
    modules = {} if ds else {"model": raw_model}
    optimizers = {} if ds else {"optimizer": optimizer}
    if ema is not None:
        modules["ema"] = ema
    if disc is not None:
        modules["discriminator"] = accelerator.unwrap_model(disc) if not ds else getattr(disc, "module", disc)
        optimizers["disc_optimizer"] = disc_opt

    def write_pretrained(folder: Path) -> None:
        model_config.save_pretrained(folder)
        build_image_processor(model_config, cfg.data, train=False).save_pretrained(folder)

    ckpt = CheckpointManager(out_dir, modules, optimizers, keep=tc.keep_checkpoints, is_main_process=is_main,
                             engines={"model": model} if ds else None,
                             pretrained={"model": write_pretrained} if ds else None,
                             rank=accelerator.process_index, world_size=accelerator.num_processes,
                             local_rank=accelerator.local_process_index,
                             barrier=accelerator.wait_for_everyone)

    state = {"step": 0, "epoch": 0, "batch": 0, "elapsed_s": 0.0, "images": 0, "skipped_images": 0}
    if tc.resume:
        path = None if tc.resume == "auto" else tc.resume
        if tc.resume != "auto" or ckpt.latest() is not None:
            state = ckpt.load(path)
            if is_main:
                print(f"resumed from {path or ckpt.latest()} at step {state['step']}")
    sampler.set_position(state["epoch"], state["batch"])

    global_batch = tc.batch_size * tc.grad_accum * accelerator.num_processes
    logger = RunLogger(out_dir, enabled=is_main)
    if is_main:
        print(f"AdaTok stage 1: {model_config.num_latent_tokens} tokens, "
              f"{num_trainable / 1e6:.2f}M trainable parameters, "
              f"{len(data)} images, {describe_batch(tc.batch_size, tc.grad_accum, accelerator.num_processes)}, "
              f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}"
              + (f", DeepSpeed ZeRO-{zero_stage(accelerator)}" if ds else ""))
        if getattr(data, "num_skipped", 0):
            print(f"skipped {data.num_skipped} unreadable images while preprocessing")
    sample_images = _sample_images(data, 8)

    def save(step: int) -> Path | None:   # with several processes ckpt.save fences itself with barriers
        return ckpt.save(step, state)

    bar = tqdm(total=tc.max_steps, initial=state["step"], disable=not is_main, desc="stage 1 (NTM)",
               dynamic_ncols=True)
    started = time.time() - state["elapsed_s"]
    last_log_time, last_log_images = time.time(), state["images"]
    model.train()
    done = False
    while not done:
        for batch in loader if not fast_batches else _fast_iter(data, sampler):
            step = state["step"]
            pixels = batch["pixel_values"].to(accelerator.device, non_blocking=True)
            state["skipped_images"] += int(batch.get("num_skipped", 0))
            if not fast_batches and any_rank(accelerator, pixels.shape[0] == 0):
                state["batch"] += 1   # every image of a batch was unreadable (here or on another rank): skip it
                continue
            if cfg.data.flip:
                pixels = flip_batch(pixels, tc.seed + accelerator.process_index, step)
            elapsed = time.time() - started
            progress = run_progress(step, elapsed, tc.max_steps, tc.time_budget_s)
            lr = lr_at(progress, step, tc.lr, tc.warmup_steps, tc.lr_schedule, tc.min_lr_ratio)
            set_lr(optimizer, lr)
            with accelerator.accumulate(model), half_precision_autocast(accelerator):
                out = model(pixels, return_reconstruction=loss_fn is not None or cfg.loss.pixel_weight > 0)
                losses = {"recon_loss": out.recon_loss}
                loss = out.loss
                if cfg.loss.pixel_weight > 0:
                    losses["pixel_loss"] = torch.nn.functional.mse_loss(out.reconstruction.float(), pixels.float())
                    loss = loss + cfg.loss.pixel_weight * losses["pixel_loss"]
                if loss_fn is not None:
                    weight = None
                    if replay and loss_fn.gan_active(step):
                        weight = replayed_adaptive_weight(accelerator, raw_model, loss_fn, last_layer_input.h,
                                                          out.target_latents, pixels, cfg.loss.pixel_weight)
                    with fixed_gan_weight(loss_fn, weight):
                        loss, logs = loss_fn.generator_loss(pixels, out.reconstruction, loss, step,
                                                            raw_model.last_layer_weight())
                    losses.update({k: torch.as_tensor(v) for k, v in logs.items()})
                losses["loss"] = loss
                stop_if_non_finite(accelerator, losses, step, save, close=(bar, logger))
                grad_norm = optimizer_step(accelerator, loss, optimizer, params, tc.grad_clip)
                if disc is not None and ds:
                    # The replica outside ZeRO: accelerator.backward would drive the tokenizer's engine.
                    sync = accelerator.sync_gradients or not hasattr(disc, "no_sync")
                    with contextlib.nullcontext() if sync else disc.no_sync():
                        d_loss, d_logs = loss_fn.discriminator_loss(pixels, out.reconstruction.detach(), step)
                        (d_loss / tc.grad_accum).backward()
                    if accelerator.sync_gradients:
                        disc_opt.step()
                        disc_opt.zero_grad(set_to_none=True)
                    losses.update({k: torch.as_tensor(v) for k, v in d_logs.items()})
                elif disc is not None:
                    d_loss, d_logs = loss_fn.discriminator_loss(pixels, out.reconstruction.detach(), step)
                    accelerator.backward(d_loss)
                    disc_opt.step()
                    disc_opt.zero_grad(set_to_none=True)
                    losses.update({k: torch.as_tensor(v) for k, v in d_logs.items()})
            state["batch"] += 1
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.update(raw_model)
            state["step"] = step = step + 1
            state["images"] += global_batch
            state["elapsed_s"] = elapsed = time.time() - started
            bar.update(1)
            if step % tc.log_every == 0 or step == 1:
                now = time.time()
                ips = (state["images"] - last_log_images) / max(now - last_log_time, 1e-9)
                last_log_time, last_log_images = now, state["images"]
                values = mean_over_ranks(accelerator, {k: float(v.detach()) for k, v in losses.items()})
                values.update(lr=lr, images_per_s=ips, mean_kept_tokens=float(out.lengths.float().mean()))
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                logger.log(step, values)
                postfix = {"loss": f"{values['loss']:.4f}", "lr": f"{lr:.2e}", "img/s": f"{ips:.0f}"}
                if tc.time_budget_s:
                    postfix["left"] = f"{max(0.0, tc.time_budget_s - elapsed):.0f}s"
                bar.set_postfix(postfix)
            if tc.sample_every and step % tc.sample_every == 0 and sample_images is not None:
                from .visualize import reconstruction_grid

                grid_model = materialize(accelerator, model)   # a collective under ZeRO-3
                if is_main:
                    reconstruction_grid(grid_model, sample_images, default_lengths(model_config.num_latent_tokens),
                                        out_dir / "samples" / f"step-{step:08d}.png")
                del grid_model
                model.train()
                accelerator.wait_for_everyone()
            if tc.save_every and step % tc.save_every == 0:
                save(step)
            if step >= tc.max_steps or (tc.time_budget_s and elapsed >= tc.time_budget_s):
                done = True
                break
        else:
            state["epoch"] += 1
            state["batch"] = 0
            sampler.set_position(state["epoch"], 0)
            if is_main and state["skipped_images"]:
                print(f"epoch {state['epoch']}: {state['skipped_images']} unreadable images skipped so far")
    bar.close()
    final_ckpt = save(state["step"])
    summary = {"steps": state["step"], "wall_s": state["elapsed_s"],
               "images_per_s": state["images"] / max(state["elapsed_s"], 1e-9),
               "num_parameters": num_trainable,
               "skipped_images": state["skipped_images"] + int(getattr(data, "num_skipped", 0)),
               "checkpoint": str(final_ckpt) if final_ckpt else None}
    export_model = None
    if tc.export:
        export_model = ema.shadow if ema is not None else final_model(accelerator, model, final_ckpt)   # collective
    if tc.export and is_main:
        export_dir = out_dir / "model"
        export_model.save_pretrained(export_dir)
        build_image_processor(model_config, cfg.data, train=False).save_pretrained(export_dir)
        summary["model_dir"] = str(export_dir)
        logger.log(state["step"], {"event": "export", **{k: v for k, v in summary.items() if k != "checkpoint"}})
    accelerator.wait_for_everyone()
    logger.close()
    return summary


def _fast_iter(data: PreloadedImages, sampler: ResumableBatchSampler):
    for indices in sampler:
        yield data.batch(indices)


def _sample_images(data, count: int) -> torch.Tensor | None:
    if isinstance(data, PreloadedImages) and len(data) >= count:
        return data.pixels[:count].float() / 255.0
    return None


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_config(TokenizerTrainingConfig, argv)
    summary = train(cfg)
    if summary.get("model_dir"):
        print(f"exported model: {summary['model_dir']}")
    return summary


if __name__ == "__main__":
    main()
