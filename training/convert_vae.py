"""Released VAE checkpoints -> diffusers folders, and the per-channel latent statistics AdaTok normalises with.

    adatok convert-vae --checkpoint vavae-imagenet256-f16d32-dinov2.pt --arch va-vae-f16d32 --out DIR
    adatok latent-stats --model.vae_path DIR --data.dataset /data/imagenet/train --limit 10000

(or ``python -m adatok_vlm.training.convert_vae [latent-stats] ...``).

``convert-vae`` reads a checkpoint in its original (LDM / taming ``AutoencoderKL``) key layout -- SD-VAE's
``.ckpt`` / ``.safetensors``, VA-VAE's ``.pt`` from LightningDiT -- as tensors only (``torch.load(...,
weights_only=True)``, or safetensors), unwraps ``{"state_dict": ...}``, strips a ``first_stage_model.`` /
``vae.`` / ``model.`` / ``module.`` prefix and keeps only the autoencoder (``encoder.``, ``decoder.``,
``quant_conv.``, ``post_quant_conv.``; the loss, discriminator and VA-VAE's vision-foundation projection
are training-only). The keys are mapped by diffusers' own ``convert_ldm_vae_checkpoint`` (what
``AutoencoderKL.from_single_file`` runs) plus the one thing it cannot read: self-attention inside the
resolution levels (VA-VAE's ``attn_resolutions=[16]``). The model is then loaded *strictly* -- every weight
of the architecture must come from the file -- which ``from_single_file`` does not check (it leaves missing
weights at their random init and only logs unused ones). ``--out`` is written with ``save_pretrained``:
``--model.vae_path DIR`` loads it.

``latent-stats`` measures each latent channel's mean and std (population std, float64, streaming) over
``--limit`` training images (a seeded random subset, so a class-sorted folder is not biased to its first
classes; from a stream -- tar shards, ``--data.streaming true`` -- which cannot be indexed, the first ``--limit``
items in stream order, recorded as such in ``latent_stats.json``), preprocessed exactly as stage-1 evaluation preprocesses them (``train_tokenizer``'s image
processor with ``train=False``: no random crop or flip). It writes them into the VAE folder's
``config.json`` as ``latents_mean`` / ``latents_std`` (diffusers' own ``AutoencoderKL`` fields) and into
``latent_stats.json`` beside it (with how they were measured). ``VAELatentSpace`` then normalises
``(z - mean_c) / std_c``: it picks them up from the folder when it reads the weights, unless
``AdaTokConfig.vae_latent_mean`` / ``vae_latent_std`` (or a scalar factor) are set.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import build_model_config, configs_dir, parse_config
from .data_setup import DataConfig, build_image_processor, load_bounded_split, resolve_num_workers

ARCH_ALIASES = {"sd-vae": "sd-vae-ft-ema", "sd-vae-ft-mse": "sd-vae-ft-ema", "sd-vae-f8c4": "sd-vae-ft-ema"}
# Prefixes a released file may put in front of the autoencoder's own keys (full SD checkpoints, wrappers).
CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.", "model.", "module.")
VAE_KEY_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


# =============================================================================================
# reading an original-format checkpoint
# =============================================================================================
def read_original_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The autoencoder tensors of a released checkpoint, with the LDM key names (``encoder.down.0...``).

    ``.safetensors`` is read with safetensors; ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` with
    ``torch.load(weights_only=True)``: a file that pickles anything but tensors and plain containers is
    refused (``ValueError``), never executed.
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {str(path)!r}")
    if not path.name.endswith(CHECKPOINT_SUFFIXES):
        raise ValueError(f"checkpoint: expected a file ending in one of {CHECKPOINT_SUFFIXES}, got {path.name!r}")
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        loaded = load_file(str(path))
    else:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"checkpoint: {str(path)!r} holds pickled objects other than tensors, which weights_only=True refuses "
                "to load (loading them would run arbitrary code). Re-save its state_dict alone where you trust the "
                "file -- torch.save({'state_dict': ckpt['state_dict']}, 'vae.pt') -- or convert it to .safetensors. "
                f"torch said: {str(err).splitlines()[0]}"
            ) from err
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ValueError(f"checkpoint: expected a state dict in {str(path)!r}, got {type(loaded).__name__}")
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    return extract_vae_state_dict(tensors, source=str(path))


def extract_vae_state_dict(state: dict[str, torch.Tensor], source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """Strip a wrapper prefix and keep only the autoencoder's keys (``encoder.`` ... ``post_quant_conv.``)."""
    prefix = ""
    for candidate in CHECKPOINT_PREFIXES:
        if any(k.startswith(candidate + "encoder.") for k in state):
            prefix = candidate
            break
    vae = {k[len(prefix):]: v for k, v in state.items()
           if k.startswith(prefix) and k[len(prefix):].startswith(VAE_KEY_ROOTS)}
    if not any(k.startswith("encoder.") for k in vae) or not any(k.startswith("decoder.") for k in vae):
        raise ValueError(
            f"checkpoint: found no LDM autoencoder keys (encoder.*, decoder.*, optionally under one of "
            f"{CHECKPOINT_PREFIXES}) in {source}; its first keys are {sorted(state)[:5]}. Is it a diffusers folder "
            "already (then pass it as --model.vae_path directly)?"
        )
    return vae


# =============================================================================================
# architecture configs and key mapping
# =============================================================================================
def load_arch_config(arch: str | os.PathLike) -> dict:
    """A diffusers ``AutoencoderKL`` config: a name under ``configs/vae/`` or a path to a config.json / its folder."""
    name = ARCH_ALIASES.get(str(arch), str(arch))
    arch_dir = configs_dir() / "vae"       # where `--arch NAME` looks for NAME/config.json
    candidates = [Path(os.path.expanduser(name)), arch_dir / name]
    for candidate in candidates:
        file = candidate / "config.json" if candidate.is_dir() else candidate
        if file.is_file():
            with open(file, encoding="utf-8") as f:
                config = json.load(f)
            if not isinstance(config, dict) or "block_out_channels" not in config:
                raise ValueError(f"arch: {str(file)!r} is not a diffusers AutoencoderKL config (no block_out_channels)")
            return config
    known = sorted(p.parent.name for p in arch_dir.glob("*/config.json"))
    raise ValueError(
        f"arch: expected one of {known + sorted(ARCH_ALIASES)} (configs/vae/NAME/config.json) or a path to a diffusers "
        f"AutoencoderKL config.json, got {str(arch)!r}"
    )


def convert_original_vae(vae_state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """LDM-layout autoencoder tensors -> the diffusers ``AutoencoderKL`` state dict of ``config``.

    diffusers' ``convert_ldm_vae_checkpoint`` maps everything but the attention inside the resolution
    levels (``encoder.down.{i}.attn.{j}``, ``decoder.up.{i}.attn.{j}``), which it would pass through under
    their LDM names; those are mapped here, with diffusers' own attention renaming (q/k/v/proj_out -> to_q/
    to_k/to_v/to_out.0, 1x1 convs -> linear weights).
    """
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     update_vae_attentions_ldm_to_diffusers)

    converted = convert_ldm_vae_checkpoint(vae_state, config)
    level_attn = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.")
    converted = {k: v for k, v in converted.items() if not level_attn.match(k)}
    num_up = len(config["up_block_types"])
    groups: dict[tuple[str, str], list[str]] = {}
    for key in vae_state:
        match = level_attn.match(key)
        if match:
            side, level, index = match.groups()
            if side == "encoder.down":
                new = f"encoder.down_blocks.{level}.attentions.{index}"
            else:  # LDM numbers decoder levels from the output side, diffusers from the latent side
                new = f"decoder.up_blocks.{num_up - 1 - int(level)}.attentions.{index}"
            groups.setdefault((f"{side}.{level}.attn.{index}", new), []).append(key)
    for (old, new), keys in groups.items():
        update_vae_attentions_ldm_to_diffusers(keys, converted, vae_state, mapping={"old": old, "new": new})
    return converted


def build_converted_vae(vae_state: dict[str, torch.Tensor], config: dict, source: str = "the checkpoint"):
    """An ``AutoencoderKL`` of ``config`` holding exactly the checkpoint's weights (strict: none missing or extra)."""
    from diffusers import AutoencoderKL

    state = convert_original_vae(vae_state, config)
    vae = AutoencoderKL.from_config(config)
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
            f"{len(unexpected)} not in the architecture (e.g. {unexpected[:3]})" if unexpected else "",
            f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs "
            f"{tuple(expected[wrong[0]].shape)})" if wrong else "") if part)
        raise ValueError(
            f"checkpoint: {source} does not match the --arch architecture ({config.get('block_out_channels')} "
            f"channels, {config.get('latent_channels')} latent channels): {detail}. Pick the matching --arch or "
            "pass a config.json describing this VAE"
        )
    vae.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return vae.eval()


def convert_vae(checkpoint: str | os.PathLike, arch: str | os.PathLike, out: str | os.PathLike):
    """Read ``checkpoint`` (original layout), convert it for ``arch`` and ``save_pretrained`` it to ``out``."""
    config = load_arch_config(arch)
    vae = build_converted_vae(read_original_checkpoint(checkpoint), config, source=repr(os.fspath(checkpoint)))
    out = Path(os.path.expanduser(os.fspath(out)))
    vae.save_pretrained(str(out), safe_serialization=True)
    return vae


# =============================================================================================
# per-channel latent statistics
# =============================================================================================
class ChannelMoments:
    """Streaming per-channel mean and population variance of ``[B, C, h, w]`` batches, in float64.

    Batches are merged with Chan et al.'s pairwise update (no sum-of-squares cancellation).
    """

    def __init__(self, num_channels: int):
        self.count = 0
        self.mean = torch.zeros(num_channels, dtype=torch.float64)
        self.m2 = torch.zeros(num_channels, dtype=torch.float64)

    def update(self, latents: torch.Tensor) -> None:
        x = latents.detach().to("cpu", torch.float64).transpose(0, 1).reshape(latents.shape[1], -1)
        n = x.shape[1]
        if n == 0:
            return
        mean = x.mean(dim=1)
        m2 = ((x - mean[:, None]) ** 2).sum(dim=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / max(self.count, 1)).sqrt()


@dataclass
class LatentStatsConfig:
    model: dict = field(default_factory=lambda: {"preset": "adatok-s"})   # needs vae_path; image_size from here
    data: DataConfig = field(default_factory=DataConfig)                  # data.dataset, data.train_split, ...
    limit: int | None = 10000        # images to measure (a seeded random subset); None: the whole split
    subset_seed: int = 0             # which random subset
    batch_size: int = 32
    device: str = "auto"             # auto: cuda when available
    out: str | None = None           # the stats JSON; default <vae_path>/latent_stats.json
    write_config: bool = True        # also store latents_mean / latents_std in <vae_path>/config.json
    # Ignored: present so that a stage-1 YAML can be passed as --config (same model and data sections).
    train: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)


def _write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def measure_latent_stats(vae, images, batch_size: int = 32, num_workers: int = 0, device: str | torch.device = "cpu",
                         image_processor=None) -> dict:
    """Per-channel mean/std of ``vae``'s latents (see ``vae_latents``) over ``images``.

    ``images`` is a ``datasets.Dataset`` (processed by ``image_processor`` through the project's data
    loader, bad images skipped and counted) or a float tensor ``[N, 3, H, W]`` in [0, 1].
    """
    from ..tokenizer.latent_space import vae_latents

    moments = ChannelMoments(int(vae.config.latent_channels))
    vae = vae.to(device).eval()
    skipped = 0
    if isinstance(images, torch.Tensor):
        batches = ({"pixel_values": images[i:i + batch_size], "num_skipped": 0} for i in range(0, len(images), batch_size))
    else:
        from .data import build_dataloader

        batches = build_dataloader(images, image_processor, batch_size=batch_size, shuffle=False,
                                   num_workers=num_workers, distributed=False)
    from tqdm.auto import tqdm

    for batch in tqdm(batches, desc="latent-stats", unit="batch", disable=not sys.stderr.isatty()):
        skipped += int(batch.get("num_skipped", 0))
        pixels = batch["pixel_values"]
        if pixels.shape[0]:
            moments.update(vae_latents(vae, pixels.to(device)))
    if moments.count == 0:
        raise ValueError("images: no image could be read, so no latent statistics can be measured")
    return {"latent_mean": moments.mean.tolist(), "latent_std": moments.std.tolist(),
            "num_latent_values_per_channel": moments.count, "num_skipped": skipped}


def latent_stats(cfg: LatentStatsConfig) -> dict:
    """Measure the statistics of the VAE at ``cfg.model['vae_path']`` and store them (see the module docstring)."""
    from ..tokenizer.latent_space import load_pretrained_vae

    vae_path = cfg.model.get("vae_path")
    if not vae_path:
        raise ValueError("model.vae_path: latent-stats needs the VAE folder (--model.vae_path DIR), got none")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"limit: expected a positive number of images or null, got {cfg.limit!r}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {cfg.batch_size!r}")
    model_config = build_model_config(cfg.model)   # the image size (and processor) the tokenizer will train with
    vae = load_pretrained_vae(vae_path)
    # A stream: its first --limit items (stream order), held in memory; map-style: a seeded random subset.
    dataset, stream = load_bounded_split(cfg.data, cfg.data.train_split, cfg.subset_seed, cfg.limit, "latent-stats",
                                         "--limit N (a stream's first N images are measured)")
    total = len(dataset)
    if stream is None and cfg.limit is not None and cfg.limit < total:
        order = torch.randperm(total, generator=torch.Generator().manual_seed(cfg.subset_seed))[: cfg.limit]
        dataset = dataset.select(sorted(order.tolist()))
    processor = build_image_processor(model_config, cfg.data, train=False)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    stats = measure_latent_stats(vae, dataset, cfg.batch_size, resolve_num_workers(dataset, cfg.data.num_workers),
                                 device, processor)
    record = {**stats, "num_images": len(dataset) - stats["num_skipped"], "dataset": str(cfg.data.dataset),
              "split": cfg.data.train_split, "image_size": model_config.image_size, "subset_seed": cfg.subset_seed,
              "limit": cfg.limit, "split_size": total, "vae_path": str(vae_path),
              "std": "population (ddof=0) over every latent position of every image; latents are posterior means"}
    if stream is not None:   # not a random subset: subset_seed played no part, split_size is what was read
        record["stream_head"] = stream
    folder = Path(os.path.expanduser(str(vae_path)))
    out = Path(cfg.out) if cfg.out else folder / "latent_stats.json"
    _write_json_atomically(out, record)
    if cfg.write_config:
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"model.vae_path: {str(config_file)!r} is missing, so the statistics cannot be stored in the VAE's "
                f"config (they are in {out}); pass --write_config false to keep only the JSON"
            )
        with open(config_file, encoding="utf-8") as f:
            vae_config = json.load(f)
        vae_config["latents_mean"], vae_config["latents_std"] = stats["latent_mean"], stats["latent_std"]
        _write_json_atomically(config_file, vae_config)
    return record


# =============================================================================================
# entry points
# =============================================================================================
@dataclass
class ConvertVAEConfig:
    checkpoint: str | None = None    # the released file (.ckpt / .pt / .safetensors), original key layout
    arch: str = "va-vae-f16d32"      # a name under configs/vae/ (va-vae-f16d32, sd-vae-ft-ema = sd-vae) or a config.json
    out: str | None = None           # the diffusers folder to write


def main(argv: list[str] | None = None) -> str:
    """``convert-vae --checkpoint FILE --arch NAME --out DIR``; returns the folder written."""
    cfg, _ = parse_config(ConvertVAEConfig, argv)
    if not cfg.checkpoint or not cfg.out:
        raise SystemExit("convert-vae: --checkpoint FILE and --out DIR are required (see --help)")
    vae = convert_vae(cfg.checkpoint, cfg.arch, cfg.out)
    count = sum(p.numel() for p in vae.parameters())
    print(f"convert-vae: wrote {cfg.out} ({count / 1e6:.1f}M parameters, {vae.config.latent_channels} latent channels); "
          f"load it with --model.vae_path {cfg.out}"
          + ("; measure its per-channel latent statistics with `adatok latent-stats`" if vae.config.latent_channels > 4
             else ""))
    return str(cfg.out)


def latent_stats_main(argv: list[str] | None = None) -> dict:
    """``latent-stats --model.vae_path DIR --data.dataset SPEC --limit N``; returns the record written."""
    cfg, _ = parse_config(LatentStatsConfig, argv)
    record = latent_stats(cfg)
    print(f"latent-stats: {record['num_images']} images ({record['num_skipped']} skipped), "
          f"{len(record['latent_mean'])} channels; mean range [{min(record['latent_mean']):.4f}, "
          f"{max(record['latent_mean']):.4f}], std range [{min(record['latent_std']):.4f}, "
          f"{max(record['latent_std']):.4f}]")
    return record


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "latent-stats":
        latent_stats_main(args[1:])
    else:
        main(args[1:] if args and args[0] == "convert-vae" else args)
