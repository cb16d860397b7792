"""Stage 1: train the AdaTok tokenizer with Nested Tail Masking (paper Sec. 4.1, eq. 5).

    python -m adatok_vlm.training.train_tokenizer --config configs/tokenizer/adatok-tiny.yaml \
        --output_dir outputs/tiny --max_steps 2000 --train.lr 2e-3
    accelerate launch -m adatok_vlm.training.train_tokenizer --config configs/tokenizer/adatok-s.yaml ...

This module holds the stage (``TokenizerStage``: its model, losses, discriminator step and outputs);
the loop itself (LR schedule, checkpoints, resume, logging, export) is ``loop.run``, the data
``data_setup``. ``--resume auto`` continues from the latest complete checkpoint with the same step,
optimizer, EMA, data position and RNG state.

``--data.latents CACHE`` (a folder written by ``adatok cache-latents``, checked against this run's VAE
fingerprint, crop recipe and source images) feeds the encoder the cached VAE latents of the very crops
and flips the pixel path would use, so a step runs no VAE encoder and the losses are the same step for
step. With the pixel-space losses off (``loss.reconstruction latent``; ``loss.perceptual_weight``,
``gan_weight``, ``pixel_weight`` all 0) no pixel data is built at all (and no sample grids are drawn: they
need images); with any of them on (the default ``loss.reconstruction pixel`` is one: eq. 5's L2 on the
decoded image), the pixels are still read, as the targets of those losses, beside the latents.

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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..tokenizer import AdaTokConfig, AdaTokModel
from .batches import PreloadedImages, ResumableBatchSampler
from .config import build_model_config
from .data_setup import (DataConfig, StreamData, StreamEpochs, build_image_processor, build_train_data,
                         epoch_batches, flip_batch, resolve_num_workers, step_flips)
from .distributed import (assert_replicas_match, materialize, mean_over_ranks, param_gatherer, replicate,
                          uses_deepspeed)
from .engine import EMA
from .evaluation import default_lengths
from .loop import LoopConfig, Stage, main as run_main, rank_seed, run


# =============================================================================================
# config
# =============================================================================================
RECONSTRUCTION_LOSSES = ("pixel", "latent")


@dataclass
class LossConfig:
    """Eq. 5, ``L_NTM = L_recon + lambda_p L_P + lambda_g L_G``, and the discriminator's settings.

    ``reconstruction`` picks ``L_recon``: ``"pixel"`` (the paper's: "a pixel-level reconstruction loss (e.g.
    L2)", the decoded image against the input, both scaled to [-1, 1]; through the frozen VAE decoder in a
    VAE latent space) or ``"latent"`` (L2 between the predicted and the target latents: no VAE decoder, so a
    latent-cached run builds no pixel data when the other pixel losses are off). In the pixel latent space the
    latents *are* the image in [-1, 1], so the two are the same loss (computed once, bit for bit today's).
    """

    reconstruction: str = "pixel"            # L_recon (eq. 5): "pixel" (the paper) or "latent"
    perceptual_weight: float = 0.0           # lambda_p (eq. 5)
    perceptual_net: str = "vgg"
    gan_weight: float = 0.0                  # lambda_g (eq. 5)
    pixel_weight: float = 0.0                # an extra L2 on the decoded image in [0, 1], beside L_recon
    gan_start_step: int = 0
    adaptive_gan_weight: bool = True
    lecam_weight: float = 0.0
    disc_lr: float | None = None             # defaults to train.lr
    disc_base_channels: int = 64
    disc_num_layers: int = 3

    def __post_init__(self):
        if self.reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"loss.reconstruction: expected one of {RECONSTRUCTION_LOSSES}, got {self.reconstruction!r}")


def pixel_l2(reconstruction: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Eq. 5's pixel-level ``L_recon``: MSE of the decoded image against the input, both in [-1, 1] (the
    units of the pixel latent space, where this equals the latent L2)."""
    return torch.nn.functional.mse_loss(reconstruction.float() * 2.0 - 1.0, pixels.float() * 2.0 - 1.0)


def uses_pixel_reconstruction(lc: LossConfig, model_config: AdaTokConfig) -> bool:
    """Whether ``L_recon`` must decode to pixels: ``"pixel"`` outside the pixel latent space (inside it the
    latent L2 the model computes is already the pixel L2)."""
    return lc.reconstruction == "pixel" and model_config.latent_space != "pixel"


@dataclass
class TrainConfig(LoopConfig):
    output_dir: str = "outputs/tokenizer"
    weight_decay: float = 4e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    ema_decay: float = 0.0                   # 0 disables EMA
    sample_every: int = 500                  # reconstruction grids of 8 training images; 0 disables


@dataclass
class TokenizerTrainingConfig:
    model: dict = field(default_factory=lambda: {"preset": "adatok-tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


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
                             target_latents: torch.Tensor, pixels: torch.Tensor, lc: LossConfig) -> float:
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
    nll = (pixel_l2(recon, pixels) if uses_pixel_reconstruction(lc, c)
           else torch.nn.functional.mse_loss(latents.float(), target_latents.detach().float()))
    if lc.pixel_weight > 0:
        nll = nll + lc.pixel_weight * torch.nn.functional.mse_loss(recon.float(), pixels.float())
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
# the stage
# =============================================================================================
class TokenizerStage(Stage):
    """Stage 1 for :func:`~.loop.run`: NTM reconstruction (eq. 5), optionally with the perceptual and
    GAN losses; the discriminator is a second model with its own optimizer (see the module docstring)."""

    desc = "stage 1 (NTM)"

    def __init__(self, cfg: TokenizerTrainingConfig, accelerator):
        tc, lc, self.cfg, self.accelerator = cfg.train, cfg.loss, cfg, accelerator
        ds = uses_deepspeed(accelerator)
        self.model_config = build_model_config(cfg.model)
        model = AdaTokModel(self.model_config)
        assert_replicas_match(accelerator, model, "tokenizer")
        rank_seed(accelerator, tc.seed)
        # The latent cache (data.latents), opened before prepare: under ZeRO-3 the VAE weights would be shards.
        self.cache = open_latent_cache(cfg, self.model_config, model)
        self.pixel_recon = uses_pixel_reconstruction(lc, self.model_config)
        self.needs_pixels = lc.perceptual_weight > 0 or lc.gan_weight > 0 or lc.pixel_weight > 0 or self.pixel_recon
        self.data, self.preloaded = None, False
        if self.cache is None or self.needs_pixels:
            self.data, collate = build_train_data(cfg, self.model_config, allow_stream=True)
        self.streamed = isinstance(self.data, StreamData)
        if self.streamed and self.cache is not None:
            raise ValueError(f"data.latents: a latent cache is indexed by image position, but data.dataset "
                             f"{cfg.data.dataset!r} is read as a stream; drop data.latents or set data.streaming false")
        if self.cache is not None and self.needs_pixels:
            self.data = check_cache_matches_data(self.cache, self.data, cfg.data)
        if self.streamed:   # this rank's part of the stream; the loop's set_position reaches it (see StreamEpochs)
            self.sampler = StreamEpochs.for_run(self.data, cfg, accelerator)
            self.batches = self.sampler.stream
        else:
            num_items = len(self.data) if self.data is not None else len(self.cache)
            self.sampler = ResumableBatchSampler(num_items, tc.batch_size, seed=tc.seed,
                                                 rank=accelerator.process_index, world_size=accelerator.num_processes)
        if self.data is None:   # pixel-space losses off: the cache's latents are the whole batch
            self.batches = lambda: ({"indices": i, "epoch": self.sampler.epoch} for i in self.sampler)
        elif not self.streamed:
            self.batches = epoch_batches(self.data, collate, self.sampler, cfg.data.num_workers)
            self.preloaded = isinstance(self.data, PreloadedImages) and resolve_num_workers(self.data,
                                                                                             cfg.data.num_workers) == 0
            if self.cache is not None:
                self.batches = cached_positions(self.batches, self.data, self.sampler, self.preloaded)

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in self.params)   # counted before ZeRO-3 shards the parameters
        optimizer = torch.optim.AdamW(self.params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        self.loss_fn, disc, disc_opt = build_losses(lc, tc)
        # The EMA copies the whole model before prepare (under ZeRO-3 prepare shards it in place).
        self.ema = EMA(model, tc.ema_decay, gather=param_gatherer(accelerator)).to(accelerator.device) \
            if tc.ema_decay > 0 else None
        if ds:
            model, optimizer = accelerator.prepare(model, optimizer)
            if disc is not None:   # outside ZeRO: a DDP replica (see the module docstring)
                disc = replicate(disc, accelerator)
        elif disc is not None:     # the wrapped one, so its gradients are synchronised across ranks
            model, optimizer, disc, disc_opt = accelerator.prepare(model, optimizer, disc, disc_opt)
        else:
            model, optimizer = accelerator.prepare(model, optimizer)
        if self.loss_fn is not None:
            if disc is not None:
                self.loss_fn.discriminator = disc
            self.loss_fn.to(accelerator.device)
        self.model, self.optimizer, self.disc, self.disc_opt = model, optimizer, disc, disc_opt
        self.raw = accelerator.unwrap_model(model)
        replay = ds and disc is not None and lc.adaptive_gan_weight
        self.last_layer_input = LastLayerInput(self.raw.decoder.to_patches) if replay else None
        # Under DeepSpeed the engine writes the tokenizer and its optimizer (sharded); these are replicated.
        self.replicated = {"ema": self.ema} if self.ema is not None else {}
        if disc is not None:
            self.replicated["discriminator"] = getattr(disc, "module", disc)
            self.replicated_optimizers = {"disc_optimizer": disc_opt}
        self.sample_images = _sample_images(self.data, 8)
        if accelerator.is_main_process and getattr(self.data, "num_skipped", 0):
            print(f"skipped {self.data.num_skipped} unreadable images while preprocessing")

    def counters(self) -> dict:
        return {"skipped_images": 0}

    def write_pretrained(self, folder: Path) -> None:
        self.model_config.save_pretrained(folder)
        build_image_processor(self.model_config, self.cfg.data, train=False).save_pretrained(folder)

    def banner(self) -> str:
        images = (self.data.describe() if self.streamed else f"{len(self.data)} images" if self.data is not None
                  else f"{len(self.cache)} cached images")
        if self.cache is not None:
            images += f" (VAE latents from {self.cache.path}" + (", pixels for the pixel-space losses)"
                                                                 if self.needs_pixels else ", no VAE encoder)")
        return (f"AdaTok stage 1: {self.model_config.num_latent_tokens} tokens, "
                f"{self.num_trainable / 1e6:.2f}M trainable parameters, {images}")

    def prepare(self, batch, state: dict):
        """``(pixels or None, normalised cached latents or None)``; pixels only when there is pixel data."""
        device, seed = self.accelerator.device, self.cfg.train.seed + self.accelerator.process_index
        pixels = latents = None
        if self.data is not None:
            if self.drop_unreadable(batch, state, may_be_empty=not self.preloaded):
                return None   # every image of the batch was unreadable (here or on another rank)
            pixels = batch["pixel_values"].to(device, non_blocking=True)
            if step_flips(self.cfg.data):
                pixels = flip_batch(pixels, seed, state["step"])
        if self.cache is not None:   # the same (image, crop, flip) as the pixels; no VAE encoder
            raw = self.cache.batch(batch["indices"], batch["epoch"], state["step"], flip_seed=seed)["latents"]
            latents = self.raw.latent_space.normalize(raw.to(device, non_blocking=True))
        return pixels, latents

    def step(self, batch, state: dict) -> dict:
        lc, loss_fn, step = self.cfg.loss, self.loss_fn, state["step"]
        pixels, latents = batch
        out = self.model(pixels if latents is None else None, latents=latents,
                         return_reconstruction=loss_fn is not None or lc.pixel_weight > 0 or self.pixel_recon)
        losses = {"recon_loss": out.recon_loss}
        loss = out.loss
        if self.pixel_recon:   # eq. 5's pixel L2 replaces the latent L2 (logged as latent_loss)
            losses["latent_loss"], losses["recon_loss"] = out.recon_loss, pixel_l2(out.reconstruction, pixels)
            loss = losses["recon_loss"] + self.model_config.kl_weight * out.kl_loss
        if lc.pixel_weight > 0:
            losses["pixel_loss"] = torch.nn.functional.mse_loss(out.reconstruction.float(), pixels.float())
            loss = loss + lc.pixel_weight * losses["pixel_loss"]
        if loss_fn is not None:
            weight = None
            if self.last_layer_input is not None and loss_fn.gan_active(step):
                weight = replayed_adaptive_weight(self.accelerator, self.raw, loss_fn, self.last_layer_input.h,
                                                  out.target_latents, pixels, lc)
            with fixed_gan_weight(loss_fn, weight):
                loss, logs = loss_fn.generator_loss(pixels, out.reconstruction, loss, step,
                                                    self.raw.last_layer_weight())
            losses.update({k: torch.as_tensor(v) for k, v in logs.items()})
        losses["loss"] = loss
        self.out, self.losses = out, losses
        return losses

    def after_backward(self, batch, state: dict) -> None:
        """The discriminator's step on this micro-batch's (detached) reconstruction."""
        if self.disc is None:
            return
        pixels = batch[0]
        acc, disc, recon = self.accelerator, self.disc, self.out.reconstruction.detach()
        if uses_deepspeed(acc):
            # The replica outside ZeRO: accelerator.backward would drive the tokenizer's engine.
            sync = acc.sync_gradients or not hasattr(disc, "no_sync")
            with contextlib.nullcontext() if sync else disc.no_sync():
                d_loss, d_logs = self.loss_fn.discriminator_loss(pixels, recon, state["step"])
                (d_loss / self.cfg.train.grad_accum).backward()
            if acc.sync_gradients:
                self.disc_opt.step()
                self.disc_opt.zero_grad(set_to_none=True)
        else:
            d_loss, d_logs = self.loss_fn.discriminator_loss(pixels, recon, state["step"])
            acc.backward(d_loss)
            self.disc_opt.step()
            self.disc_opt.zero_grad(set_to_none=True)
        self.losses.update({k: torch.as_tensor(v) for k, v in d_logs.items()})

    def on_step_end(self, state: dict, log: bool) -> dict | None:
        values = None
        if log:
            values = mean_over_ranks(self.accelerator, {k: float(v.detach()) for k, v in self.losses.items()})
            values["mean_kept_tokens"] = float(self.out.lengths.float().mean())
        step, every = state["step"], self.cfg.train.sample_every
        if every and step % every == 0 and self.sample_images is not None:
            from .visualize import reconstruction_grid

            grid_model = materialize(self.accelerator, self.model)   # a collective under ZeRO-3
            if self.accelerator.is_main_process:
                reconstruction_grid(grid_model, self.sample_images,
                                    default_lengths(self.model_config.num_latent_tokens),
                                    Path(self.cfg.train.output_dir) / "samples" / f"step-{step:08d}.png")
            del grid_model
            self.model.train()
            self.accelerator.wait_for_everyone()
        return values

    def on_epoch_end(self, state: dict) -> None:
        if self.accelerator.is_main_process and state["skipped_images"]:
            print(f"epoch {state['epoch'] + 1}: {state['skipped_images']} unreadable images skipped so far")

    def summary(self, state: dict) -> dict:
        return {"num_parameters": self.num_trainable,
                "skipped_images": state["skipped_images"] + int(getattr(self.data, "num_skipped", 0))}

    def export(self, model: AdaTokModel, folder: Path, state: dict) -> dict:
        model.save_pretrained(folder)
        build_image_processor(self.model_config, self.cfg.data, train=False).save_pretrained(folder)
        return {"model_dir": str(folder)}


def open_latent_cache(cfg: TokenizerTrainingConfig, model_config: AdaTokConfig, model: AdaTokModel):
    """The :class:`~.cache_latents.LatentCache` at ``cfg.data.latents`` checked against this run (its VAE's
    fingerprint, the crop recipe, the source images), or ``None`` without one. Call it before
    ``accelerator.prepare``: it reads the VAE's whole weights (loading them from ``vae_path`` first)."""
    if not cfg.data.latents:
        return None
    if model_config.latent_space != "vae":
        raise ValueError(f"data.latents: a latent cache holds VAE latents, but this tokenizer works in the "
                         f"{model_config.latent_space!r} latent space (model.latent_space); drop --data.latents")
    from .cache_latents import LatentCache, crop_recipe, vae_fingerprint

    model.latent_space._ensure_weights()
    cache = LatentCache(cfg.data.latents, vae_fingerprint(model.latent_space.vae))
    cache.check_source(cfg.data)
    cache.check_recipe(crop_recipe(cfg.data, model_config.image_size, cfg.train.seed, cache.num_crops,
                                   num_items=cache.info["source"]["num_items"], channels=model_config.num_channels))
    return cache


class CachedCropEpochs(torch.utils.data.Dataset):
    """A per-item seeded pixel data set (``ImageTransformDataset`` over ``NaturalImageTransform``) read at
    epoch ``e % num_crops``: the crop a random-crop latent cache holds for epoch ``e``, so pixel targets and
    cached latents show the same crop past the first ``num_crops`` epochs too."""

    def __init__(self, data, num_crops: int):
        self.data, self.num_crops, self.image_processor = data, num_crops, data.image_processor

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        epoch, index = item
        return self.data[(int(epoch) % self.num_crops, int(index))]


def check_cache_matches_data(cache, data, data_cfg: DataConfig):
    """The pixel data a cached run with pixel-space losses reads beside ``cache`` (wrapped by
    :class:`CachedCropEpochs` for a random-crop cache); a ``ValueError`` naming ``data.latents`` when the
    cache's image positions are not the data's."""
    if len(cache) != len(data):
        raise ValueError(f"data.latents: the cache {str(cache.path)!r} holds {len(cache)} images, but the training "
                         f"data ({data_cfg.dataset!r}) has {len(data)}: rebuild the cache from this data set")
    if not isinstance(data, PreloadedImages) and cache.info["skipped"]:
        raise ValueError(f"data.latents: the cache {str(cache.path)!r} skipped unreadable images "
                         f"({cache.info['skipped']}), so its positions differ from the data set's, which this run "
                         "decodes per item; remove those files and rebuild the cache, or set data.preload true")
    if cache.num_crops > 1:
        data = CachedCropEpochs(data, cache.num_crops)
    return data


def cached_positions(batches, data, sampler, preloaded: bool):
    """Tag each pixel batch with what :meth:`LatentCache.batch` needs: the images' positions and the epoch."""
    if preloaded:   # sliced directly: the sampler's positions
        return lambda: ({**data.batch(i), "indices": i, "epoch": sampler.epoch} for i in sampler)
    # through a DataLoader: collate_images keeps the key (the item's index) of every image it kept
    return lambda: ({**b, "indices": list(b["keys"]), "epoch": sampler.epoch} for b in batches())


def build_losses(lc: LossConfig, tc: TrainConfig):
    """``(loss_fn, discriminator, its optimizer)``: the perceptual/GAN terms of eq. 5, ``None`` parts when off."""
    if lc.perceptual_weight <= 0 and lc.gan_weight <= 0:
        return None, None, None
    from ..tokenizer.losses import AdaTokStage1Loss

    loss_fn = AdaTokStage1Loss(perceptual_weight=lc.perceptual_weight,
                               perceptual_net=lc.perceptual_net if lc.perceptual_weight > 0 else None,
                               gan_weight=lc.gan_weight, gan_start_step=lc.gan_start_step,
                               adaptive_gan_weight=lc.adaptive_gan_weight, lecam_weight=lc.lecam_weight,
                               disc_base_channels=lc.disc_base_channels, disc_num_layers=lc.disc_num_layers)
    if lc.gan_weight <= 0:
        return loss_fn, None, None
    disc = loss_fn.discriminator
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=lc.disc_lr or tc.lr, betas=(0.5, 0.9),
                                 weight_decay=tc.weight_decay)
    return loss_fn, disc, disc_opt


def _sample_images(data, count: int) -> torch.Tensor | None:
    if isinstance(data, PreloadedImages) and len(data) >= count:
        return data.pixels[:count].float() / 255.0
    return None


def train(cfg: TokenizerTrainingConfig) -> dict:
    """Run stage-1 training; returns a summary (steps, wall time, images/s, export path)."""
    return run(cfg, TokenizerStage)


def main(argv: list[str] | None = None) -> dict:
    return run_main(TokenizerTrainingConfig, train, argv, "model")


if __name__ == "__main__":
    main()
