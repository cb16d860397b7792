"""The VAE-latent cache of stage 1 (training/cache_latents.py), at the tiny preset with a tiny random VAE.

The central check: a stage-1 step from the cache gives the same loss, step for step over two epochs of
training, as the step from pixels with the same crops and flips (same seed): ``model(latents=...)`` against
``model(pixels)``, the latents themselves checked equal to ``latent_space.encode(pixels)`` batch by batch;
and the same through the real trainer (``train_tokenizer.main`` with and without ``--data.latents``).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from adatok_vlm.tokenizer import AdaTokConfig, AdaTokModel
from adatok_vlm.training.batches import ResumableBatchSampler, preload_images
from adatok_vlm.training.cache_latents import (CacheLatentsConfig, LatentCache, build_cache, crop_recipe, main,
                                               vae_fingerprint)
from adatok_vlm.training.data import ImageTransformDataset, NaturalImageTransform, load_image_dataset
from adatok_vlm.training.data_loading import EpochTaggedBatchSampler, collate_images
from adatok_vlm.training.data_setup import DataConfig, build_image_processor, flip_batch

from conftest import TINY_VAE

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES, SEED, BATCH = 10, 3, 4


# ---------------------------------------------------------------------------------------------
# fixtures: a small photo-like data set and a tiny random VAE on disk
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """``NUM_IMAGES`` smooth colour images of assorted sizes (so crops differ), saved with ``save_to_disk``."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(NUM_IMAGES):
        h, w = 36 + 3 * (i % 4), 40 + 5 * (i % 3)
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.uniform(0, 255, size=3)
        array = (base + 60 * np.sin(xx[..., None] / (3 + i) + yy[..., None] / 5 + np.arange(3))
                 + rng.normal(0, 10, size=(h, w, 3)))
        images.append(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(NUM_IMAGES)]}, features=features)
    folder = tmp_path_factory.mktemp("data") / "photos"
    ds.save_to_disk(str(folder))
    return folder


def save_vae(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    AutoencoderKL(**TINY_VAE).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return save_vae(tmp_path_factory.mktemp("vae") / "tiny-vae", seed=0)


def model_fields(vae_dir: Path) -> dict:
    return {"preset": "adatok-tiny", "latent_space": "vae", "vae_config": TINY_VAE, "vae_path": str(vae_dir),
            "patch_size": 2}


def cache_args(vae_dir: Path, image_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model.vae_path", str(vae_dir), "--model.preset", "adatok-tiny", "--model.latent_space", "vae",
            "--model.vae_config", json.dumps(TINY_VAE), "--model.patch_size", "2",
            "--data.dataset", str(image_dir), "--output_dir", str(out), "--seed", str(SEED),
            "--train.shard_size", "3", "--train.batch_size", "4", *extra]


def tiny_model(vae_dir: Path) -> AdaTokModel:
    fields = dict(model_fields(vae_dir))
    fields.pop("preset")
    torch.manual_seed(0)
    model = AdaTokModel(AdaTokConfig.from_preset("adatok-tiny", **fields))
    model.latent_space.load_vae_weights()
    return model.train()


def compare_training(vae_dir: Path, steps) -> None:
    """Train two copies of one model for every ``(step, pixels, raw cached latents)`` of ``steps``, one from the
    pixels, one from the cache; the losses (and the latents they read) must agree at every step."""
    from_pixels = tiny_model(vae_dir)
    from_cache = copy.deepcopy(from_pixels)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (from_pixels, from_cache)]
    count = 0
    for step, pixels, cached in steps:
        latents = from_cache.latent_space.normalize(cached)
        torch.testing.assert_close(latents, from_pixels.latent_space.encode(pixels), rtol=1e-5, atol=1e-5)
        loss_pixels = from_pixels(pixels, generator=torch.Generator().manual_seed(step)).loss
        loss_cache = from_cache(latents=latents, generator=torch.Generator().manual_seed(step)).loss
        torch.testing.assert_close(loss_cache, loss_pixels, rtol=1e-4, atol=1e-6)
        for loss, opt in zip((loss_pixels, loss_cache), opts):
            opt.zero_grad()
            loss.backward()
            opt.step()
        count += 1
    assert count >= 4


# ---------------------------------------------------------------------------------------------
# the same loss, step for step
# ---------------------------------------------------------------------------------------------
def test_center_crop_cache_trains_like_pixels(tmp_path, vae_dir, image_dir):
    """Centre crops (preloaded, uint8) with the trainer's per-step flips: two epochs of steps agree."""
    out = tmp_path / "cache"
    summary = main(cache_args(vae_dir, image_dir, out, "--data.flip", "true"))
    assert summary["complete"] and summary["num_images"] == NUM_IMAGES
    info = json.loads((out / "cache_info.json").read_text())
    assert info["recipe"]["crop"] == "center" and info["recipe"]["flip"] == "step"
    assert len(info["shards"]) == 4   # 10 images in shards of 3

    model = tiny_model(vae_dir)
    fingerprint = vae_fingerprint(model.latent_space.vae)
    assert fingerprint == info["vae_fingerprint"]   # the model's copy of the VAE fingerprints like the folder's
    data = DataConfig(dataset=str(image_dir), flip=True)
    cache = LatentCache(out, vae_fingerprint=fingerprint,
                        recipe=crop_recipe(data, model.config.image_size, SEED, num_items=NUM_IMAGES))
    assert len(cache) == NUM_IMAGES

    # The pixel path of train_tokenizer: preloaded centre crops, ResumableBatchSampler, flip_batch by step.
    pixels_set = preload_images(load_image_dataset(str(image_dir)), build_image_processor(model.config, data, True),
                                cache=False)
    sampler = ResumableBatchSampler(len(pixels_set), BATCH, seed=SEED)

    def steps():
        step = 0
        for epoch in range(2):
            sampler.set_position(epoch)
            for indices in sampler:
                step += 1
                pixels = flip_batch(pixels_set.batch(indices)["pixel_values"], SEED, step)
                yield step, pixels, cache.batch(indices, epoch, step, flip_seed=SEED)["latents"]

    compare_training(vae_dir, steps())


def test_random_crop_cache_trains_like_pixels(tmp_path, vae_dir, image_dir):
    """K seeded random crops per image with per-item flips (data.transforms natural): for epochs < K the cache
    reads exactly the crop and flip NaturalImageTransform draws for (seed, epoch, item); epoch K reuses epoch 0's."""
    out = tmp_path / "cache"
    k = 2
    main(cache_args(vae_dir, image_dir, out, "--data.transforms", "natural", "--data.flip", "true",
                    "--train.crops_per_image", str(k)))
    model = tiny_model(vae_dir)
    cache = LatentCache(out, vae_fingerprint=vae_fingerprint(model.latent_space.vae))
    assert cache.info["recipe"]["num_crops"] == k and cache.flip_rule == "item"
    assert cache.flip_drawn.any() and not cache.flip_drawn.all()   # both orientations are really used

    dataset = ImageTransformDataset(load_image_dataset(str(image_dir)),
                                    NaturalImageTransform(32, train=True, seed=SEED, flip=True))
    sampler = EpochTaggedBatchSampler(ResumableBatchSampler(len(dataset), BATCH, seed=SEED))

    def steps():
        step = 0
        for epoch in range(k):
            sampler.set_position(epoch)
            for tagged in sampler:
                step += 1
                pixels = collate_images([dataset[item] for item in tagged])["pixel_values"]
                yield step, pixels, cache.batch([i for _, i in tagged], epoch, step)["latents"]

    compare_training(vae_dir, steps())
    first = cache.batch(list(range(NUM_IMAGES)), epoch=0)["latents"]
    assert torch.equal(cache.batch(list(range(NUM_IMAGES)), epoch=k)["latents"], first)
    assert not torch.equal(cache.batch(list(range(NUM_IMAGES)), epoch=1)["latents"], first)


# ---------------------------------------------------------------------------------------------
# the fingerprint
# ---------------------------------------------------------------------------------------------
def test_cache_refuses_another_vae(tmp_path, vae_dir, image_dir):
    out = tmp_path / "cache"
    main(cache_args(vae_dir, image_dir, out))
    other = save_vae(tmp_path / "other-vae", seed=1)
    other_model = tiny_model(other)
    with pytest.raises(ValueError, match="fingerprint"):
        LatentCache(out, vae_fingerprint=vae_fingerprint(other_model.latent_space.vae))
    # Resuming into the same folder with another VAE is refused too (no mixed latents).
    with pytest.raises(ValueError, match="vae_fingerprint"):
        main(cache_args(other, image_dir, out))
    # Statistics written into the VAE folder later (latent-stats) leave the fingerprint as it was.
    config = json.loads((vae_dir / "config.json").read_text())
    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    with_stats = AutoencoderKL.from_config({**config, "latents_mean": [0.1] * 4, "latents_std": [2.0] * 4})
    with_stats.load_state_dict(vae.state_dict())
    assert vae_fingerprint(with_stats) == vae_fingerprint(vae)
    with pytest.raises(ValueError, match="recipe"):
        LatentCache(out, vae_fingerprint=vae_fingerprint(vae),
                    recipe=crop_recipe(DataConfig(dataset=str(image_dir), flip=True), 32, SEED, num_items=NUM_IMAGES))


# ---------------------------------------------------------------------------------------------
# resuming and ranks
# ---------------------------------------------------------------------------------------------
def cached_rows(folder: Path) -> dict[str, np.ndarray]:
    rows = datasets.concatenate_datasets([datasets.load_from_disk(str(folder / "shards" / name))
                                          for name in json.loads((folder / "cache_info.json").read_text())["shards"]])
    rows = rows.with_format("numpy")
    return {column: np.asarray(rows[column]) for column in ("latent", "latent_flipped", "label", "crop")}


def assert_same_rows(a: dict, b: dict) -> None:
    assert a["latent"].shape == b["latent"].shape == (NUM_IMAGES, 4, 8, 8)
    for column in a:
        np.testing.assert_array_equal(a[column], b[column])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, vae_dir, image_dir) -> dict:
    out = tmp_path_factory.mktemp("reference") / "cache"
    main(cache_args(vae_dir, image_dir, out))
    return cached_rows(out)


def test_resume_after_a_stop_after_n_shards(tmp_path, vae_dir, image_dir, reference):
    out = tmp_path / "cache"
    first = main(cache_args(vae_dir, image_dir, out, "--train.max_shards", "2"))
    assert first["complete"] is False and first["shards_written"] == 2 and len(first["missing_shards"]) == 2
    with pytest.raises(FileNotFoundError, match="incomplete"):
        LatentCache(out, vae_fingerprint="whatever")
    second = main(cache_args(vae_dir, image_dir, out))
    assert second["complete"] and second["shards_written"] == 2
    assert_same_rows(cached_rows(out), reference)


def test_resume_after_sigkill_mid_shard(tmp_path, vae_dir, image_dir, reference):
    """A subprocess is SIGKILLed while it writes its third shard (after the data are on disk in the temporary
    folder, before the rename); the rerun drops that half-write, redoes the shard and loses nothing."""
    out = tmp_path / "cache"
    child = textwrap.dedent(f"""
        import os, signal, sys
        import datasets
        from adatok_vlm.training import cache_latents
        real, calls = datasets.Dataset.save_to_disk, []
        def save_then_die(self, path, *args, **kwargs):
            calls.append(path)
            real(self, path, *args, **kwargs)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        datasets.Dataset.save_to_disk = save_then_die
        cache_latents.main({cache_args(vae_dir, image_dir, out)!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    shards = out / "shards"
    assert sorted(p.name for p in shards.iterdir() if not p.name.startswith(".")) == ["000000000-000000003",
                                                                                       "000000003-000000006"]
    assert any(p.name.startswith(".000000006-000000009.tmp-") for p in shards.iterdir())   # the half-write
    assert not (out / "cache_info.json").exists()
    summary = main(cache_args(vae_dir, image_dir, out))
    assert summary["complete"] and summary["shards_written"] == 2
    assert not any(p.name.startswith(".") for p in shards.iterdir())
    assert_same_rows(cached_rows(out), reference)


def test_ranks_split_the_shards_and_rank0_merges(tmp_path, vae_dir, image_dir, reference):
    out = tmp_path / "cache"
    rank0 = main(cache_args(vae_dir, image_dir, out, "--train.rank", "0", "--train.world_size", "2"))
    assert rank0["complete"] is False and rank0["shards_written"] == 2
    assert rank0["missing_shards"] == ["000000006-000000009", "000000009-000000010"]   # rank 1's block
    rank1 = main(cache_args(vae_dir, image_dir, out, "--train.rank", "1", "--train.world_size", "2"))
    assert rank1["complete"] is None and rank1["shards_written"] == 2
    assert not (out / "cache_info.json").exists()   # only rank 0 merges
    merged = main(cache_args(vae_dir, image_dir, out, "--train.rank", "0", "--train.world_size", "2"))
    assert merged["complete"] and merged["shards_written"] == 0
    assert_same_rows(cached_rows(out), reference)


def test_bad_settings_name_the_argument(tmp_path, vae_dir, image_dir):
    with pytest.raises(ValueError, match="train.output_dir"):
        build_cache(CacheLatentsConfig())
    with pytest.raises(ValueError, match="train.rank"):
        main(cache_args(vae_dir, image_dir, tmp_path / "c", "--train.rank", "2", "--train.world_size", "2"))
    with pytest.raises(ValueError, match="train.crops_per_image"):
        crop_recipe(DataConfig(transforms="natural"), 32, 0, crops_per_image=0)
    with pytest.raises(ValueError, match="data.crop"):   # the processor's unseeded random placement
        crop_recipe(DataConfig(crop="random"), 32, 0, num_items=NUM_IMAGES)
    with pytest.raises(ValueError, match="num_items"):    # preload decided by size: the size is needed
        crop_recipe(DataConfig(), 32, 0)
    with pytest.raises(FileNotFoundError, match="not a latent cache"):
        LatentCache(tmp_path, vae_fingerprint="x")


# ---------------------------------------------------------------------------------------------
# the real trainer: train_tokenizer.main from pixels vs --data.latents
# ---------------------------------------------------------------------------------------------
def train_args(vae_dir: Path, image_dir: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--model.vae_path", str(vae_dir), "--model.preset", "adatok-tiny", "--model.latent_space", "vae",
            "--model.vae_config", json.dumps(TINY_VAE), "--model.patch_size", "2",
            "--data.dataset", str(image_dir), "--output_dir", str(out), "--seed", str(SEED),
            "--max_steps", str(steps), "--train.batch_size", str(BATCH), "--train.lr", "1e-3",
            "--train.lr_schedule", "constant", "--train.warmup_steps", "0", "--train.log_every", "1", "--train.sample_every", "0",
            "--train.save_every", "0", "--train.export", "false", "--train.num_threads", "1", *extra]


def logged(out: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


@pytest.fixture
def count_vae_encodes(monkeypatch) -> list[int]:
    """Counts every ``AutoencoderKL.encode`` call in this process (the frozen VAE encoder)."""
    calls = [0]
    real = AutoencoderKL.encode

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counted)
    return calls


def test_trainer_from_the_cache_logs_the_pixel_losses_and_never_runs_the_vae_encoder(tmp_path, vae_dir, image_dir,
                                                                                     count_vae_encodes):
    """Stage 1 at the tiny preset, centre crops with per-step flips, pixel-space losses off: three epochs
    (6 steps) from pixels and from ``--data.latents`` log the same losses step for step, and the cached run
    never calls the VAE encoder (its pixel data is not even built)."""
    from adatok_vlm.training import train_tokenizer

    cache = tmp_path / "cache"
    main(cache_args(vae_dir, image_dir, cache, "--data.flip", "true"))
    steps = 6
    train_tokenizer.main(train_args(vae_dir, image_dir, tmp_path / "pixels", steps, "--data.flip", "true"))
    assert count_vae_encodes[0] >= steps   # the counter sees the pixel path's encoder
    count_vae_encodes[0] = 0
    summary = train_tokenizer.main(train_args(vae_dir, image_dir, tmp_path / "cached", steps, "--data.flip", "true",
                                              "--data.latents", str(cache)))
    assert summary["steps"] == steps
    assert count_vae_encodes[0] == 0
    for key in ("loss", "recon_loss", "mean_kept_tokens"):
        pixels, cached = logged(tmp_path / "pixels", key), logged(tmp_path / "cached", key)
        assert len(pixels) == steps
        assert cached == pytest.approx(pixels, rel=1e-4, abs=1e-6), key
    # A cache of other flips (another recipe) is refused, naming the setting.
    with pytest.raises(ValueError, match="recipe"):
        train_tokenizer.main(train_args(vae_dir, image_dir, tmp_path / "other", 1, "--data.latents", str(cache)))


def test_trainer_from_a_random_crop_cache_with_pixel_losses_matches_pixels(tmp_path, vae_dir, image_dir):
    """Seeded random crops (data.transforms natural, K = 2 per image) with a pixel-space loss on: the pixels
    are still read (as that loss's targets) beside the cached latents; the first K epochs log the same losses
    as the pixel path, pixel loss included, and later epochs run on the cached crops."""
    from adatok_vlm.training import train_tokenizer

    cache = tmp_path / "cache"
    natural = ("--data.transforms", "natural", "--data.flip", "true", "--data.num_workers", "0")
    main(cache_args(vae_dir, image_dir, cache, *natural, "--train.crops_per_image", "2"))
    on = ("--loss.pixel_weight", "0.5")
    train_tokenizer.main(train_args(vae_dir, image_dir, tmp_path / "pixels", 4, *natural, *on))
    summary = train_tokenizer.main(train_args(vae_dir, image_dir, tmp_path / "cached", 6, *natural, *on,
                                              "--data.latents", str(cache)))
    assert summary["steps"] == 6
    for key in ("loss", "recon_loss", "pixel_loss"):
        pixels, cached = logged(tmp_path / "pixels", key), logged(tmp_path / "cached", key)
        assert len(pixels) == 4 and len(cached) == 6
        assert cached[:4] == pytest.approx(pixels, rel=1e-4, abs=1e-6), key


def test_trainer_refuses_a_cache_it_cannot_use(tmp_path, vae_dir, image_dir):
    from adatok_vlm.training import train_tokenizer

    cache = tmp_path / "cache"
    main(cache_args(vae_dir, image_dir, cache))
    pixel_space = ["--model.preset", "adatok-tiny", "--data.dataset", str(image_dir), "--output_dir",
                   str(tmp_path / "p"), "--max_steps", "1", "--train.batch_size", str(BATCH),
                   "--data.latents", str(cache)]
    with pytest.raises(ValueError, match="data.latents"):   # a pixel-space tokenizer has no VAE latents
        train_tokenizer.main(pixel_space)
    with pytest.raises(ValueError, match="data.latents"):   # latents of other images
        train_tokenizer.main(train_args(vae_dir, image_dir, tmp_path / "l", 1, "--data.limit", "8",
                                        "--data.latents", str(cache)))
    with pytest.raises(ValueError, match="fingerprint"):    # another VAE
        train_tokenizer.main(train_args(save_vae(tmp_path / "other-vae", seed=1), image_dir, tmp_path / "v", 1,
                                        "--data.latents", str(cache)))


def test_forward_takes_pixels_or_latents(vae_dir):
    """``forward(latents=...)`` is ``forward(pixels)`` without the VAE encoder; bad latents name ``latents``."""
    model = tiny_model(vae_dir).eval()
    pixels = torch.rand(2, 3, 32, 32)
    latents = model.latent_space.encode(pixels)
    a, b = model(pixels, num_tokens=4), model(latents=latents, num_tokens=4)
    torch.testing.assert_close(b.loss, a.loss)
    torch.testing.assert_close(b.reconstruction, a.reconstruction)
    with pytest.raises(ValueError, match="exactly one"):
        model(pixels, latents=latents)
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="latents must have shape"):
        model(latents=latents[:, :3])
    with pytest.raises(TypeError, match="latents must be a floating-point"):
        model(latents=latents.long())
    with pytest.raises(ValueError, match="latents contains NaN"):
        model(latents=latents.masked_fill(latents > 0, float("nan")))
