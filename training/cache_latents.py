"""A VAE-latent cache for stage 1: encode the training set once, train from the stored latents.

    python -m adatok_vlm.training.cache_latents --model.vae_path DIR --data.dataset /data/imagenet \
        --output_dir CACHE [--data.transforms natural --train.crops_per_image 8] [--train.rank R --train.world_size W]

Stage 1 (Nested Tail Masking) runs the frozen VAE encoder on every image of every step although its
output never changes for a given crop (MAR and LightningDiT cache latents for the same reason). This
module writes, for every training image, the VAE latent of each crop the recipe uses, in both horizontal
orientations, and reads them back per step with the same (image, crop, flip) the pixel path would draw.

What is stored
    The VAE posterior *mean* (``latent_space.vae_latents``: the mode, which is what ``VAELatentSpace.encode``
    reads; AdaTok never samples the posterior), **un-normalised**: the per-channel statistics
    (``adatok latent-stats``) or the scalar factor are applied at read time by
    ``model.latent_space.normalize``, so re-measuring them never invalidates a cache. One row per
    (image, crop): ``latent`` and ``latent_flipped`` (``[C, h, w]``, float32, or float16 with
    ``--train.dtype float16``: half the disk, not bit-identical to the encoder), ``flip_drawn`` (the flip
    a per-item seeded transform draws for this crop), ``crop`` and ``label``. Row ``image * K + crop``;
    images are the *readable* ones, in data-set order (unreadable ones are skipped and counted, as
    preloading skips them), so image ``i`` of the cache is item ``i`` of the preloaded training set.

The crop recipes (``crop_recipe``: the trainer's own pixel path, ``data_setup.build_train_data``)
    - ``data.transforms: processor, data.crop: center`` (the defaults): one crop per image, made by the
      trainer's own image processor (``data_setup.build_image_processor``) and, when the trainer would
      preload the split (``data.preload``, or null and the split fits ``data.preload_max_gb``), quantised
      to uint8 exactly as preloading does (``batches.preload_images``). Flips, when ``data.flip``, follow
      the trainer's per-step rule ``data_setup.flip_batch(pixels, seed + rank, step)`` ("step" flips).
    - ``data.transforms: natural``: ``K = train.crops_per_image`` (default 8) crops per image made by
      :class:`~.data_transforms.NaturalImageTransform` (shorter-side resize + random square crop, the
      MaskGIT / TiTok recipe, or ``data.crop_scale``'s random resized crop), crop ``k`` being the one it
      draws for ``(seed, epoch=k, item)``. Epoch ``e`` reads crop ``e % K`` with the flip the transform drew
      for it ("item" flips, when ``data.flip``), so the first ``K`` epochs are exactly the pixel path's
      (``ImageTransformDataset`` + ``EpochTaggedBatchSampler``) and later epochs cycle through the same ``K``
      crops (MAR caches a fixed set of augmentations the same way).
    - The processor's ``data.crop: random`` (unseeded placements) cannot be cached.

The folder (``CACHE``)
    ``build.json`` (what is being built: the VAE's fingerprint, the crop recipe, the source data),
    ``shards/<start>-<end>/`` (one ``datasets`` ``save_to_disk`` folder per ``train.shard_size`` images,
    written to a temporary sibling and renamed, so a kill loses at most the shard in progress) and, once
    every shard is there, ``cache_info.json`` (the same identity plus the shard list and counts): its
    presence marks the cache complete. Shards are fixed slices of the data set, so a rerun (with any
    number of ranks) skips the ones on disk and never duplicates or loses an entry. Rank ``r`` of ``W``
    takes the contiguous block of shards ``[r*J/W, (r+1)*J/W)``; rank 0 merges: it checks every shard
    (range, rows, crop order) and writes ``cache_info.json``; the reader concatenates the memory-mapped
    shards (no copy of the latents). Under ``accelerate launch`` the ranks come from the environment and
    rank 0 waits for the others; with explicit ``--train.rank/--train.world_size`` (separate jobs) a rank-0
    run merges when it finds every shard, else it names the missing ones (rerun it when they are done).

The VAE fingerprint (:func:`vae_fingerprint`) hashes the VAE's architecture (its diffusers config minus
the fields that do not change what it computes) and every weight; :class:`LatentCache` refuses a cache
whose fingerprint differs from the model's VAE.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import build_model_config, parse_config
from .data_setup import DataConfig, build_image_processor, flip_batch, load_split, require_map_style

CACHE_VERSION = 1
FLIP_RULES = ("none", "step", "item")
CACHE_DTYPES = ("float32", "float16")
# AutoencoderKL config fields that do not change the latents or reconstructions it computes: the
# normalisation AdaTok applies itself (kept out so `latent-stats` writing them into the folder never
# invalidates a cache) and pipeline hints. Fields starting with "_" (diffusers' bookkeeping) are dropped too.
FINGERPRINT_IGNORED = ("latents_mean", "latents_std", "scaling_factor", "shift_factor", "sample_size",
                       "force_upcast")


# =============================================================================================
# helpers: fingerprint, recipe, flips, atomic writes
# =============================================================================================
def vae_fingerprint(vae: nn.Module) -> str:
    """A sha256 (hex, 16 digits) of ``vae``'s architecture (its config without :data:`FINGERPRINT_IGNORED`)
    and of every tensor of its state dict (name, dtype, shape, bytes). Equal for the same weights however
    they were loaded (``load_pretrained_vae`` or an AdaTok model's ``latent_space.vae``)."""
    config = getattr(vae, "config", None)
    if config is None:
        raise TypeError(f"vae: expected a diffusers AutoencoderKL (with a .config), got {type(vae).__name__}")
    arch = {k: v for k, v in dict(config).items() if not k.startswith("_") and k not in FINGERPRINT_IGNORED}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def crop_recipe(data: DataConfig, image_size: int, seed: int, crops_per_image: int = 8,
                num_items: int | None = None, channels: int = 3) -> dict:
    """The crop-and-flip recipe a cache stores and a trainer must match (a plain, JSON-able dict): the one
    the trainer's pixel path (``data_setup.build_train_data``) runs for ``data``.

    ``data.transforms == "processor"`` with ``data.crop == "center"``: one crop (the trainer's image
    processor), quantised to uint8 when the trainer would preload the split (``data_sources.decide_preload``
    for ``num_items`` images of ``channels`` x ``image_size``^2: pass ``num_items`` unless ``data.preload`` is
    set), flipped by the trainer's step rule when ``data.flip``. ``data.transforms == "natural"``:
    ``crops_per_image`` crops of :class:`NaturalImageTransform` seeded by ``seed`` (``data.crop_scale``),
    with its own per-item flips when ``data.flip``. The processor's ``crop: random`` draws unseeded
    placements, so no cache can hold them: a ``ValueError``. See the module docstring."""
    from .data_sources import decide_preload

    if data.crop not in ("center", "random"):
        raise ValueError(f"data.crop: expected 'center' or 'random', got {data.crop!r}")
    if isinstance(crops_per_image, bool) or not isinstance(crops_per_image, int) or crops_per_image < 1:
        raise ValueError(f"train.crops_per_image: expected a positive int, got {crops_per_image!r}")
    if data.transforms == "natural":
        return {"crop": "random", "image_size": int(image_size), "transform": "NaturalImageTransform",
                "seed": int(seed), "scale": list(data.crop_scale) if data.crop_scale is not None else None,
                "num_crops": int(crops_per_image), "flip": "item" if data.flip else "none"}
    if data.crop == "random":
        raise ValueError("data.crop: 'random' with data.transforms 'processor' places each crop with an unseeded "
                         "draw, which a latent cache cannot reproduce; use data.transforms natural (seeded random "
                         "crops, cached as train.crops_per_image crops per image) or data.crop center")
    if data.preload is None and num_items is None:
        raise ValueError("num_items: data.preload is null (decided by the split's size), so the recipe needs the "
                         "number of training images to know whether the trainer quantises them to uint8")
    uint8 = decide_preload(num_items, image_size, preload=data.preload, preload_max_gb=data.preload_max_gb,
                           channels=channels)
    return {"crop": "center", "image_size": int(image_size), "resize_mode": data.resize_mode,
            "preload_uint8": bool(uint8), "num_crops": 1, "flip": "step" if data.flip else "none"}


def step_flips(batch_size: int, seed: int, step: int) -> torch.Tensor:
    """``BoolTensor[batch_size]``: which batch positions ``data_setup.flip_batch(pixels, seed, step)`` flips.

    Read off ``flip_batch`` itself (applied to a two-column ramp), so the cache and the pixel path share
    one rule."""
    ramp = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(batch_size, 1, 1, 2)
    return flip_batch(ramp, seed, step)[:, 0, 0, 0] == 1.0


def _write_json_atomically(path: Path, record: dict) -> None:
    """Concurrent ranks may write ``build.json`` at once: each through its own temporary file, then a rename."""
    from .checkpointing import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shard_ranges(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """The fixed ``[start, end)`` image slices of a cache (independent of the number of ranks)."""
    return [(a, min(a + shard_size, num_images)) for a in range(0, num_images, shard_size)]


def rank_shards(num_shards: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous block of shard ids: ``[rank*J//W, (rank+1)*J//W)``."""
    return range(rank * num_shards // world_size, (rank + 1) * num_shards // world_size)


def shard_name(start: int, end: int) -> str:
    return f"{start:09d}-{end:09d}"


# =============================================================================================
# encoding one shard
# =============================================================================================
def _shard_pixels(dataset, recipe: dict, data: DataConfig, model_config, start: int, end: int):
    """Pixels of images ``[start, end)`` as the trainer would see them: ``(crops [n, K, 3, S, S] in [0, 1],
    flip_drawn [n, K] bool, labels [n], skipped {reason: count})`` over the readable images only."""
    from .batches import preload_images
    from .data_loading import SkippedImage, process_item

    k = recipe["num_crops"]
    part = dataset.select(range(start, end))
    size = recipe["image_size"]
    empty = (torch.empty(0, k, 3, size, size), torch.zeros(0, k, dtype=torch.bool), torch.empty(0, dtype=torch.long))
    if recipe["crop"] == "center" and recipe["preload_uint8"]:
        try:
            pre = preload_images(part, build_image_processor(model_config, data, train=True), cache=False)
        except ValueError:   # "no readable image": every image of the shard was skipped
            return (*empty, {"unreadable_or_unusable": len(part)} if len(part) else {})
        pixels = pre.pixels.float().div_(255.0)[:, None]
        return pixels, torch.zeros(pixels.shape[:2], dtype=torch.bool), pre.labels, \
            ({"unreadable_or_unusable": pre.num_skipped} if pre.num_skipped else {})
    import datasets

    if recipe["crop"] == "center":
        plain, flipping = build_image_processor(model_config, data, train=True), None
    else:
        from .data_transforms import NaturalImageTransform

        seed, scale = recipe["seed"], tuple(recipe["scale"]) if recipe["scale"] is not None else None
        plain = NaturalImageTransform(size, train=True, seed=seed, scale=scale, flip=False)
        # The crop draw comes before the flip draw, so both transforms crop alike; only "item" flips.
        flipping = NaturalImageTransform(size, train=True, seed=seed, scale=scale, flip=True) \
            if recipe["flip"] == "item" else None
    if isinstance(part.features.get("image"), datasets.Image):
        part = part.cast_column("image", datasets.Image(decode=False))
    has_labels = "label" in part.column_names
    crops, drawn, labels, skipped = [], [], [], {}
    for offset in range(len(part)):
        row, index = part[offset], start + offset
        label = int(row["label"]) if has_labels and row["label"] is not None else -1
        items, flips = [], []
        for epoch in range(k):
            item = process_item(row["image"], plain, key=index, epoch=epoch, label=label, index=index)
            if isinstance(item, SkippedImage):
                break
            items.append(item["pixel_values"])
            if flipping is not None:   # the flip this crop gets in the pixel path: compare with both orientations
                seen = process_item(row["image"], flipping, key=index, epoch=epoch, label=label, index=index)
                flips.append(bool(torch.equal(seen["pixel_values"], item["pixel_values"].flip(-1))
                                  and not torch.equal(seen["pixel_values"], item["pixel_values"])))
            else:
                flips.append(False)
        if len(items) < k:
            skipped[item.reason] = skipped.get(item.reason, 0) + 1
            continue
        crops.append(torch.stack(items))
        drawn.append(flips)
        labels.append(label)
    if not crops:
        return (*empty, skipped)
    return torch.stack(crops), torch.tensor(drawn, dtype=torch.bool), torch.tensor(labels, dtype=torch.long), skipped


@torch.no_grad()
def encode_pixels(vae: nn.Module, pixels: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Raw VAE latents (posterior means, float32 on the CPU) of ``pixels [N, 3, S, S]``, ``batch_size`` at a time."""
    from ..tokenizer.latent_space import vae_latents

    out = [vae_latents(vae, pixels[i:i + batch_size].to(device)).float().cpu()
           for i in range(0, pixels.shape[0], batch_size)]
    return torch.cat(out) if out else pixels.new_empty(0)


def _write_shard(folder: Path, crops: torch.Tensor, flips_drawn: torch.Tensor, labels: torch.Tensor,
                 vae: nn.Module, batch_size: int, device: torch.device, dtype: str, meta: dict,
                 latent_shape: tuple[int, int, int]) -> None:
    import datasets

    from .data_common import save_atomically

    n, k = crops.shape[:2]
    flat = crops.reshape(n * k, *crops.shape[2:])
    latent = encode_pixels(vae, flat, batch_size, device)
    latent_flipped = encode_pixels(vae, flat.flip(-1), batch_size, device)
    np_dtype = np.float32 if dtype == "float32" else np.float16
    features = datasets.Features({
        "crop": datasets.Value("int32"), "label": datasets.Value("int64"), "flip_drawn": datasets.Value("bool"),
        "latent": datasets.Array3D(shape=latent_shape, dtype=dtype),
        "latent_flipped": datasets.Array3D(shape=latent_shape, dtype=dtype),
    })
    rows = {
        "crop": np.tile(np.arange(k, dtype=np.int32), n),
        "label": labels.repeat_interleave(k).numpy(),
        "flip_drawn": flips_drawn.reshape(-1).numpy(),
        "latent": latent.numpy().astype(np_dtype) if n else np.zeros((0, *latent_shape), np_dtype),
        "latent_flipped": latent_flipped.numpy().astype(np_dtype) if n else np.zeros((0, *latent_shape), np_dtype),
    }
    built = datasets.Dataset.from_dict(rows, features=features,
                                       info=datasets.DatasetInfo(description=json.dumps(meta, sort_keys=True),
                                                                 features=features))
    save_atomically(built, folder)


# =============================================================================================
# config and the build
# =============================================================================================
@dataclass
class CacheRunConfig:
    output_dir: str | None = None          # CACHE, the folder written (required)
    seed: int = 0                          # the random-crop recipe's seed (the tokenizer run's train.seed)
    crops_per_image: int = 8               # data.transforms: natural only (K crops per image); else 1
    shard_size: int = 256                  # images per shard: a kill loses at most one; its pixels are held
                                           # in memory while it encodes (shard_size x K x 0.79 MB at 256x256)
    batch_size: int = 32                   # images per VAE encoder call
    dtype: str = "float32"                 # float32 (exact) | float16 (half the disk)
    device: str = "auto"                   # auto: cuda when available
    rank: int | None = None                # this process's share; None: from the launcher's environment
    world_size: int | None = None
    max_shards: int | None = None          # stop after writing this many shards (a step budget; rerun to continue)
    num_threads: int | None = None


@dataclass
class CacheLatentsConfig:
    model: dict = field(default_factory=lambda: {"preset": "adatok-s"})
    data: DataConfig = field(default_factory=DataConfig)
    train: CacheRunConfig = field(default_factory=CacheRunConfig)


def _check_run(tc: CacheRunConfig) -> None:
    if not tc.output_dir:
        raise ValueError("train.output_dir: cache-latents needs the cache folder (--output_dir CACHE), got none")
    for name in ("shard_size", "batch_size"):
        value = getattr(tc, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"train.{name}: expected a positive int, got {value!r}")
    if tc.dtype not in CACHE_DTYPES:
        raise ValueError(f"train.dtype: expected one of {CACHE_DTYPES}, got {tc.dtype!r}")
    if tc.max_shards is not None and tc.max_shards < 1:
        raise ValueError(f"train.max_shards: expected a positive int or null, got {tc.max_shards!r}")
    if (tc.rank is None) != (tc.world_size is None):
        raise ValueError(f"train.rank, train.world_size: give both or neither, got {tc.rank!r}, {tc.world_size!r}")
    if tc.rank is not None and not (isinstance(tc.world_size, int) and tc.world_size >= 1 and 0 <= tc.rank < tc.world_size):
        raise ValueError(f"train.rank, train.world_size: expected 0 <= rank < world_size, got {tc.rank!r}, {tc.world_size!r}")


def _world(tc: CacheRunConfig):
    """``(rank, world_size, barrier or None)``: explicit arguments (no collectives), else the launcher's."""
    if tc.rank is not None:
        return tc.rank, tc.world_size, None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # cpu=True on CPU: PartialState() alone makes every torchrun process rank 0 of 1 there (each would
        # encode the whole set); with it, the ranks form a gloo group
        state = PartialState(cpu=not torch.cuda.is_available())
        return state.process_index, state.num_processes, state.wait_for_everyone
    return 0, 1, None


def build_cache(cfg: CacheLatentsConfig) -> dict:
    """Encode this rank's shards of the training set into ``cfg.train.output_dir`` (skipping those on
    disk), then on rank 0 merge when every shard is there. Returns a summary (``complete``, counts, paths)."""
    from ..tokenizer.latent_space import load_pretrained_vae
    from .engine import configure_threads

    tc = cfg.train
    _check_run(tc)
    if tc.num_threads is not None:
        configure_threads(tc.num_threads)
    vae_path = cfg.model.get("vae_path")
    if not vae_path:
        raise ValueError("model.vae_path: cache-latents needs the VAE folder (--model.vae_path DIR), got none")
    model_config = build_model_config(cfg.model)   # --model.X flags merge into the default preset (parse_config)
    if model_config.latent_space != "vae":
        raise ValueError(f"model: a latent cache is for a VAE latent space, got latent_space={model_config.latent_space!r}")
    rank, world_size, barrier = _world(tc)
    if tc.device != "auto":
        device = torch.device(tc.device)
    else:   # one GPU per local rank under a launcher
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
            else torch.device("cpu")
    vae = load_pretrained_vae(vae_path).to(device).eval().requires_grad_(False)
    fingerprint = vae_fingerprint(vae)

    # Not from a stream: stage 1 reads the cache by the image positions of its map-style training set and
    # refuses data.latents with a stream, so a cache of a stream could never be read back.
    dataset = require_map_style(load_split(cfg.data, cfg.data.train_split, tc.seed), cfg.data,
                                "cache-latents (stage 1 reads a latent cache by image position in a map-style "
                                "training set and refuses data.latents with a stream, so the cache must be built "
                                "from the same map-style set)")
    if cfg.data.limit:
        dataset = dataset.select(range(min(cfg.data.limit, len(dataset))))
    recipe = crop_recipe(cfg.data, model_config.image_size, tc.seed, tc.crops_per_image, num_items=len(dataset),
                         channels=model_config.num_channels)
    out = Path(tc.output_dir)
    c, g = int(vae.config.latent_channels), model_config.image_size // (2 ** (len(vae.config.block_out_channels) - 1))
    build = {"version": CACHE_VERSION, "vae_fingerprint": fingerprint, "vae_path": str(vae_path), "recipe": recipe,
             "source": {"dataset": str(cfg.data.dataset), "split": cfg.data.train_split, "limit": cfg.data.limit,
                        "num_items": len(dataset)},
             "shard_size": tc.shard_size, "dtype": tc.dtype, "latent_shape": [c, g, g],
             "latents": "VAE posterior mean (mode), un-normalised; normalise with model.latent_space.normalize"}
    _claim_build(out / "build.json", build)

    ranges = shard_ranges(len(dataset), tc.shard_size)
    mine = [ranges[j] for j in rank_shards(len(ranges), rank, world_size)]
    written = 0
    from tqdm.auto import tqdm

    for start, end in tqdm(mine, desc=f"cache-latents rank {rank}", leave=False):
        folder = out / "shards" / shard_name(start, end)
        if folder.is_dir():
            continue
        if tc.max_shards is not None and written >= tc.max_shards:
            break
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):   # this shard's half-write from a killed run
            shutil.rmtree(stale, ignore_errors=True)
        crops, drawn, labels, skipped = _shard_pixels(dataset, recipe, cfg.data, model_config, start, end)
        meta = {"start": start, "end": end, "num_images": int(crops.shape[0]), "skipped": skipped,
                "vae_fingerprint": fingerprint}
        _write_shard(folder, crops, drawn, labels, vae, tc.batch_size, device, tc.dtype, meta, (c, g, g))
        written += 1
    if barrier is not None:
        barrier()
    summary = {"rank": rank, "world_size": world_size, "shards_written": written, "output_dir": str(out),
               "vae_fingerprint": fingerprint}
    if rank != 0:
        return {**summary, "complete": None}
    missing = [shard_name(a, b) for a, b in ranges if not (out / "shards" / shard_name(a, b)).is_dir()]
    if missing:
        return {**summary, "complete": False, "missing_shards": missing}
    return {**summary, **merge_cache(out)}


def _claim_build(path: Path, build: dict) -> None:
    """Write ``build.json`` on a first run; on a rerun refuse to mix in latents of another VAE, recipe or data."""
    if not path.is_file():
        _write_json_atomically(path, build)
        return
    old = _read_json(path)
    for key in ("version", "vae_fingerprint", "recipe", "source", "shard_size", "dtype", "latent_shape"):
        if old.get(key) != build.get(key):
            raise ValueError(
                f"output_dir: {path.parent} already holds a latent cache built with {key}={old.get(key)!r}, but this run "
                f"has {key}={build.get(key)!r}; resume with the same settings, or choose another --output_dir"
            )


def merge_cache(folder: str | os.PathLike) -> dict:
    """Check every shard of the cache at ``folder`` and write ``cache_info.json`` (marks it complete).

    Each shard must cover exactly its slice, hold ``num_crops`` rows per image in crop order, and carry the
    build's VAE fingerprint; anything else is a ``ValueError`` naming the shard."""
    import datasets

    folder = Path(folder)
    build = _read_json(folder / "build.json")
    k = build["recipe"]["num_crops"]
    names, num_images, skipped = [], 0, {}
    for start, end in shard_ranges(build["source"]["num_items"], build["shard_size"]):
        name = shard_name(start, end)
        shard = datasets.load_from_disk(str(folder / "shards" / name))
        meta = json.loads(shard.info.description or "{}")
        if (meta.get("start"), meta.get("end"), meta.get("vae_fingerprint")) != (start, end, build["vae_fingerprint"]):
            raise ValueError(f"shard {name} of {folder}: it describes {meta} instead of [{start}, {end}) of VAE "
                             f"{build['vae_fingerprint']}; delete it and rerun cache-latents")
        crops = np.asarray(shard["crop"])
        if len(shard) != k * meta["num_images"] or not np.array_equal(crops, np.tile(np.arange(k), meta["num_images"])):
            raise ValueError(f"shard {name} of {folder}: {len(shard)} rows for {meta['num_images']} images x {k} crops, "
                             "or crops out of order; delete it and rerun cache-latents")
        names.append(name)
        num_images += meta["num_images"]
        for reason, count in meta["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    info = {**build, "shards": names, "num_images": num_images, "num_rows": num_images * k, "skipped": skipped}
    _write_json_atomically(folder / "cache_info.json", info)
    return {"complete": True, "num_images": num_images, "skipped": skipped}


# =============================================================================================
# the reader
# =============================================================================================
class LatentCache:
    """Per-step latents from a complete cache, for the (image, crop, flip) the pixel path would use.

    Args:
        path: the cache folder (``cache-latents --output_dir``).
        vae_fingerprint: :func:`vae_fingerprint` of the model's VAE; a cache built with another VAE is a
            ``ValueError`` (its latents would be of another space).
        recipe: optionally, the :func:`crop_recipe` the trainer runs with; a different one is a ``ValueError``.

    ``cache.batch(indices, epoch, step, flip_seed)`` -> ``{"latents": FloatTensor[B, C, h, w] (raw: apply
    ``model.latent_space.normalize``), "labels": LongTensor[B]}`` for images ``indices`` (positions in
    the readable training set, as the trainer's sampler yields them): crop ``epoch % num_crops``; flipped
    by the recipe's rule ("step": ``flip_batch``'s draw for ``(flip_seed, step)`` by batch position, as the
    trainer passes ``seed + rank``; "item": the per-item transform's own draw; "none": never).
    """

    def __init__(self, path: str | os.PathLike, vae_fingerprint: str, recipe: dict | None = None):
        import datasets

        self.path = Path(path)
        info_file = self.path / "cache_info.json"
        if not info_file.is_file():
            state = "is incomplete (no cache_info.json: rerun cache-latents to finish it)" \
                if (self.path / "build.json").is_file() else "is not a latent cache (no cache_info.json)"
            raise FileNotFoundError(f"latents: {str(self.path)!r} {state}")
        self.info = _read_json(info_file)
        if not isinstance(vae_fingerprint, str):
            raise TypeError(f"vae_fingerprint: expected the str from vae_fingerprint(vae), got {type(vae_fingerprint).__name__}")
        if self.info["vae_fingerprint"] != vae_fingerprint:
            raise ValueError(
                f"latents: the cache {str(self.path)!r} was built with the VAE of fingerprint "
                f"{self.info['vae_fingerprint']} ({self.info.get('vae_path')}), but this model's VAE has fingerprint "
                f"{vae_fingerprint}: its latents belong to another latent space. Rebuild it with `adatok cache-latents "
                f"--model.vae_path <this VAE> ...`, or train from pixels (drop --data.latents)"
            )
        self.num_crops = int(self.info["recipe"]["num_crops"])
        if recipe is not None:
            self.check_recipe(recipe)
        self.flip_rule = self.info["recipe"]["flip"]
        shards = [datasets.load_from_disk(str(self.path / "shards" / name)) for name in self.info["shards"]]
        self.rows = datasets.concatenate_datasets(shards).with_format("numpy")
        self.labels = torch.from_numpy(np.asarray(self.rows["label"]).astype(np.int64)).view(-1, self.num_crops)[:, 0]
        self.flip_drawn = torch.from_numpy(np.asarray(self.rows["flip_drawn"]).astype(bool)).view(-1, self.num_crops)

    def check_source(self, data: DataConfig) -> None:
        """``ValueError`` unless the cache was built from ``data``'s training images (data set, split, limit)."""
        source = self.info["source"]
        mine = {"dataset": str(data.dataset), "split": data.train_split, "limit": data.limit}
        theirs = {key: source.get(key) for key in mine}
        same_folder = Path(mine["dataset"]).exists() and Path(str(theirs["dataset"])).exists() \
            and Path(mine["dataset"]).resolve() == Path(str(theirs["dataset"])).resolve()
        if same_folder:   # one folder, spelled differently (relative / absolute)
            theirs["dataset"] = mine["dataset"]
        if theirs != mine:
            raise ValueError(f"data.latents: the cache {str(self.path)!r} holds the latents of {theirs}, but this run "
                             f"trains on {mine}; rebuild it with this run's data settings (adatok cache-latents)")

    def check_recipe(self, recipe: dict) -> None:
        """``ValueError`` unless ``recipe`` (a :func:`crop_recipe`; build it with ``self.num_crops`` for a
        random-crop run) is the one the cache was built with."""
        if recipe != self.info["recipe"]:
            raise ValueError(f"latents: the cache {str(self.path)!r} holds the crop recipe {self.info['recipe']}, "
                             f"but this run uses {recipe}; rebuild the cache with this run's data settings")

    def __len__(self) -> int:
        return int(self.info["num_images"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.info["latent_shape"])

    def flips(self, indices: torch.Tensor, epoch: int, step: int, flip_seed: int | None) -> torch.Tensor:
        """``BoolTensor[B]``: which of ``indices`` are read flipped at this (epoch, step)."""
        if self.flip_rule == "none":
            return torch.zeros(len(indices), dtype=torch.bool)
        if self.flip_rule == "item":
            return self.flip_drawn[indices, epoch % self.num_crops]
        if flip_seed is None:
            raise ValueError("flip_seed: this cache flips by the trainer's step rule (data.flip): pass seed + rank")
        return step_flips(len(indices), flip_seed, step)

    def batch(self, indices, epoch: int = 0, step: int = 0, flip_seed: int | None = None) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.long).view(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise ValueError(f"indices: expected image positions in [0, {len(self)}), got {idx.tolist()[:8]}...")
        flip = self.flips(idx, int(epoch), int(step), flip_seed)
        rows = idx * self.num_crops + int(epoch) % self.num_crops
        latents = torch.empty(idx.numel(), *self.latent_shape, dtype=torch.float32)
        for column, chosen in (("latent", ~flip), ("latent_flipped", flip)):
            where = chosen.nonzero().view(-1)
            if where.numel():
                picked = self.rows[rows[where].tolist()][column]
                latents[where] = torch.from_numpy(np.asarray(picked, dtype=np.float32))
        return {"latents": latents, "labels": self.labels[idx]}


# =============================================================================================
# entry point
# =============================================================================================
def main(argv: list[str] | None = None) -> dict:
    """``cache-latents --model.vae_path DIR --data.dataset SPEC --output_dir CACHE``; returns the summary."""
    cfg, _ = parse_config(CacheLatentsConfig, argv)
    summary = build_cache(cfg)
    if summary.get("complete"):
        print(f"cache-latents: {summary['num_images']} images cached in {summary['output_dir']} "
              f"(VAE {summary['vae_fingerprint']}, skipped {summary['skipped'] or 'none'})")
    elif summary.get("complete") is False:
        missing = summary["missing_shards"]
        print(f"cache-latents: rank 0 wrote {summary['shards_written']} shard(s); {len(missing)} still missing "
              f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): rerun to continue (or after the other "
              "ranks finish), and rank 0 merges")
    else:
        print(f"cache-latents: rank {summary['rank']} wrote {summary['shards_written']} shard(s)")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
