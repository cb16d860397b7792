"""One stage-1 step with and without the VAE-latent cache, side by side in one process.

    python benchmarks/latent_cache.py                      # adatok-s, batch 2, 256x256, 1 thread
    python benchmarks/latent_cache.py --batch_size 4 --repeats 3 --out benchmarks/results/latent_cache.json

Random weights of the real architectures (``adatok-s``: the ViT encoder/decoder over the VA-VAE f16d32
latent grid, whose VAE is randomly initialised too: nothing is downloaded). A cache of ``batch-size``
random 256x256 images is built first with the real command (``training/cache_latents.py``: save the VAE to a
folder, encode both flips, write the shards), then, alternating within each repeat so machine load hits
both sides alike:

* **encode side**: ``model.latent_space.encode(pixels)`` (the frozen VAE encoder) vs
  ``LatentCache.batch(indices)`` + ``latent_space.normalize`` (reading the memory-mapped shards);
* **full step** (forward, backward, AdamW step; pixel-space losses off, so the VAE decoder is not run):
  ``model(pixels).loss`` vs ``model(latents=cached latents).loss``.

Reports the median seconds of each, the speed-ups, images/s and the 1-minute load average sampled before
every measurement (the machine is shared: read the numbers with it). Writes FILE.json and FILE.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build_cache_for(images, vae, preset: str, workdir: Path) -> tuple[Path, float]:
    """A latent cache of ``images`` (uint8 ``[N, S, S, 3]``) built with the real command; returns (path, seconds)."""
    import datasets

    from adatok_vlm.training.cache_latents import main as cache_main

    data_dir, vae_dir, out = workdir / "images", workdir / "vae", workdir / "cache"
    datasets.Dataset.from_dict({"image": list(images)}, features=datasets.Features({"image": datasets.Image()})) \
        .save_to_disk(str(data_dir))
    vae.save_pretrained(str(vae_dir))
    seconds = timed(lambda: cache_main(["--model.preset", preset, "--model.vae_path", str(vae_dir),
                                        "--data.dataset", str(data_dir), "--data.resize_mode", "shortest_edge",
                                        "--output_dir", str(out), "--train.batch_size", str(len(images)),
                                        "--train.device", "cpu"]))
    return out, seconds


def run(args) -> dict:
    import numpy as np
    import torch

    from adatok_vlm.tokenizer import AdaTokConfig, AdaTokModel
    from adatok_vlm.training.cache_latents import LatentCache, vae_fingerprint

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AdaTokModel(AdaTokConfig.from_preset(args.preset, vae_random_init=True)).train()
    size = model.config.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.batch_size, size, size, 3), dtype=np.uint8)
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir, build_s = build_cache_for(images, model.latent_space.vae, args.preset, Path(tmp))
        cache = LatentCache(cache_dir, vae_fingerprint=vae_fingerprint(model.latent_space.vae))
        indices = list(range(args.batch_size))
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def encode_vae():
            model.latent_space.encode(pixels)

        def encode_cache():
            model.latent_space.normalize(cache.batch(indices)["latents"])

        def step(loss_fn):
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()

        def step_pixels():
            step(lambda: model(pixels, return_reconstruction=False, generator=torch.Generator().manual_seed(0)).loss)

        def step_cache():
            step(lambda: model(latents=model.latent_space.normalize(cache.batch(indices)["latents"]),
                               return_reconstruction=False, generator=torch.Generator().manual_seed(0)).loss)

        # Same inputs on both sides: the cached latents equal the encoder's (up to float rounding).
        agree = float((model.latent_space.normalize(cache.batch(indices)["latents"])
                       - model.latent_space.encode(pixels)).abs().max())
        cases = {"encode_vae": encode_vae, "encode_cache": encode_cache,
                 "step_pixels": step_pixels, "step_cache": step_cache}
        for fn in cases.values():   # warm-up (allocator, oneDNN kernels, page cache)
            for _ in range(args.warmup):
                fn()
        times = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                loads.append(os.getloadavg()[0])
                times[name].append(timed(fn))
        loads.append(os.getloadavg()[0])
    med = {name: statistics.median(values) for name, values in times.items()}
    b = args.batch_size
    result = {
        "preset": args.preset, "image_size": size, "batch_size": b, "threads": args.threads,
        "repeats": args.repeats, "warmup": args.warmup, "weights": "random (real architectures)",
        "pixel_space_losses": "off (the VAE decoder is not run by either step)",
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "cache_build_seconds": build_s,
        "max_abs_diff_cached_vs_encoder": agree,
        "seconds": times,
        "median_seconds": med,
        "images_per_second": {name: b / s for name, s in med.items()},
        "speedup": {"encode_side": med["encode_vae"] / med["encode_cache"],
                    "full_step": med["step_pixels"] / med["step_cache"]},
        "vae_share_of_pixel_step": (med["step_pixels"] - med["step_cache"]) / med["step_pixels"],
        "load_average_1min": {"min": min(loads), "max": max(loads), "mean": statistics.mean(loads),
                              "cpu_count": os.cpu_count()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    return result


def markdown(r: dict) -> str:
    med, ips = r["median_seconds"], r["images_per_second"]
    load = r["load_average_1min"]
    lines = [
        f"# Stage-1 step with and without the latent cache ({r['preset']}, batch {r['batch_size']}, "
        f"{r['image_size']}x{r['image_size']}, {r['threads']} thread(s))",
        "",
        f"Random weights of the real architectures ({r['trainable_parameters'] / 1e6:.1f}M trainable); pixel-space "
        f"losses off. Median of {r['repeats']} repeats after {r['warmup']} warm-up; 1-minute load average during the "
        f"run {load['min']:.2f}-{load['max']:.2f} on {load['cpu_count']} cores (shared machine).",
        "",
        "| what | from pixels (VAE encoder) | from the latent cache | speed-up |",
        "| --- | ---: | ---: | ---: |",
        f"| encode side, s/batch | {med['encode_vae']:.3f} | {med['encode_cache']:.4f} | "
        f"{r['speedup']['encode_side']:.0f}x |",
        f"| full step (fwd+bwd+AdamW), s/batch | {med['step_pixels']:.3f} | {med['step_cache']:.3f} | "
        f"{r['speedup']['full_step']:.2f}x |",
        f"| full step, images/s | {ips['step_pixels']:.3f} | {ips['step_cache']:.3f} | |",
        "",
        f"The VAE encoder is {100 * r['vae_share_of_pixel_step']:.0f}% of a step from pixels. Building the cache of "
        f"these {r['batch_size']} images (both flips, shards on disk) took {r['cache_build_seconds']:.1f} s; cached "
        f"latents match the encoder's to {r['max_abs_diff_cached_vs_encoder']:.1e}.",
        "",
        f"`{r['command']}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from adatok_vlm.training.flags import FlagParser
    from adatok_vlm.training.results import write_results

    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="adatok-s")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "latent_cache.json"))
    args = parser.parse_args(argv)
    for name in ("batch_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    result = run(args)
    write_results(args.out, result, markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
