"""What one length decision costs: fixed length vs ATA ("auto") vs binary search, at any model size.

Table 2's runtime column depends on where the reconstruction error is measured. Binary search
decodes the image at every probe (``ceil(log2 K)`` probes for K allowed lengths); in a VAE latent
space each probe is a transformer decode *plus a VAE decode to pixels*, which is what makes search
expensive in the paper (70.2 vs 4.3 ms). ATA costs one encoder pass plus a tiny MLP. This benchmark
builds the named preset with random weights (a random VAE of the real architecture: nothing to
download). The assumption that makes that a fair stand-in: binary search always makes
``ceil(log2 K)`` probes, whatever the weights. What the weights do change is *where* the probes land:
a random model never reaches ``config.search_threshold``, so every probe climbs to the longest
lengths, and each decode runs over (nearly) all ``m`` tokens. The search time here is therefore the
cost of ``ceil(log2 K)`` long decodes: the upper end for a trained model, whose probes for easy
images stop at shorter prefixes (the VAE decode per probe is the same at every length). It
measures, in one process, same batch, after a warm-up:

* ``fixed``  ``encode(num_tokens=m)``: one encoder pass;
* ``ata``    ``encode(num_tokens="auto")``: one encoder pass + the policy head;
* ``search`` ``encode(num_tokens="search")``: one encoder pass + ``ceil(log2 K)`` decodes;
* ``decode`` one ``decode`` at the full length (for the breakdown).

    python benchmarks/ata_cost.py --preset adatok-s --images 4 --batch_size 2 --out outputs/bench/ata_cost.json
    python benchmarks/ata_cost.py --preset adatok-tiny --images 512 --batch_size 256   # the pixel-space demo model

Writes the JSON and a markdown table beside it. The trained demo model's Table 2 (with rewards) is
``benchmarks/ablation.py``; this script isolates the cost ratio at the paper's scale.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from adatok_vlm import AdaTokConfig, AdaTokModel
from adatok_vlm.training.flags import FlagParser
from adatok_vlm.training.results import write_results

ATA_MAX_VS_FIXED = 1.3       # target: ATA's decision costs at most 1.3x a fixed-length encode
SEARCH_MIN_VS_ATA = 10.0     # target: binary search costs at least 10x ATA (the paper's 70.2 vs 4.3 ms)


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="adatok-s")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="timed passes over the images per method")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench/ata_cost.json", help="JSON file; the .md table goes beside it")
    return p.parse_args(argv)


def build_model(preset: str, device: str, dtype: torch.dtype) -> AdaTokModel:
    overrides = {"vae_random_init": True} if AdaTokConfig.from_preset(preset).latent_space == "vae" else {}
    model = AdaTokModel(AdaTokConfig.from_preset(preset, **overrides))
    model.enable_policy()
    return model.to(device=device, dtype=dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_ms_per_image(fn, batches: list[torch.Tensor], repeats: int, device: torch.device) -> float:
    fn(batches[0])                                           # warm-up (kernels, allocator)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for x in batches:
            fn(x)
    _sync(device)
    return 1000.0 * (time.perf_counter() - start) / (repeats * sum(x.shape[0] for x in batches))


def measure(model: AdaTokModel, images: int, batch_size: int, repeats: int, seed: int) -> dict:
    device, dtype = model.device, model.dtype
    size, m = model.config.image_size, model.num_latent_tokens
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(images, 3, size, size, generator=g)
    batches = [pixels[i : i + batch_size].to(device, dtype) for i in range(0, images, batch_size)]
    encoded = {id(x): model.encode(x, num_tokens=m) for x in batches}
    probes = math.ceil(math.log2(model.length_grid.numel())) if model.length_grid.numel() > 1 else 0
    ms = {
        "fixed": time_ms_per_image(lambda x: model.encode(x, num_tokens=m), batches, repeats, device),
        "ata": time_ms_per_image(lambda x: model.encode(x, num_tokens="auto"), batches, repeats, device),
        "search": time_ms_per_image(lambda x: model.encode(x, num_tokens="search"), batches, repeats, device),
        "decode": time_ms_per_image(lambda x: model.decode(encoded[id(x)].tokens, encoded[id(x)].lengths),
                                    batches, repeats, device),
    }
    return {
        "latent_space": model.config.latent_space, "image_size": size, "num_latent_tokens": m,
        "grid_size": int(model.length_grid.numel()), "search_probes": probes,
        "parameters_trainable": model.num_parameters(only_trainable=True),
        "ms_per_image": ms,
        "ratios": {"ata_vs_fixed": ms["ata"] / ms["fixed"], "search_vs_ata": ms["search"] / ms["ata"],
                   "decode_vs_fixed_encode": ms["decode"] / ms["fixed"]},
    }


def markdown(result: dict) -> str:
    ms, r = result["ms_per_image"], result["ratios"]
    lines = [
        f"# Length-decision cost: {result['preset_name']} ({result['latent_space']} space, "
        f"{result['image_size']}px, m={result['num_latent_tokens']}, {result['grid_size']} lengths, "
        f"{result['search_probes']} search probes)",
        "",
        f"{result['device']}, {result['dtype']}, batch {result['batch_size']}, {result['images']} images, "
        "random weights: no length reaches the search threshold, so every search probe climbs to the longest "
        "lengths (the search's upper cost; a trained model's probes stop earlier on easy images).",
        "",
        "| method | ms / image | vs fixed |",
        "| --- | ---: | ---: |",
    ]
    for name in ("fixed", "ata", "search"):
        lines.append(f"| {name} | {ms[name]:.2f} | {ms[name] / ms['fixed']:.2f}x |")
    lines += ["", f"One full-length decode: {ms['decode']:.2f} ms / image ({r['decode_vs_fixed_encode']:.2f}x an encode). "
              f"ATA costs {r['ata_vs_fixed']:.2f}x the fixed-length encode (target <= {ATA_MAX_VS_FIXED}x); search costs "
              f"{r['search_vs_ata']:.1f}x ATA (target >= {SEARCH_MIN_VS_ATA:g}x).", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = build_model(args.preset, args.device, dtype)
    result = measure(model, args.images, args.batch_size, args.repeats, args.seed)
    result.update(preset_name=args.preset, device=str(model.device), dtype=args.dtype, batch_size=args.batch_size,
                  images=args.images, threads=torch.get_num_threads(), platform=platform.platform())
    ratios = result["ratios"]
    result["checks"] = {f"ata <= {ATA_MAX_VS_FIXED}x fixed": ratios["ata_vs_fixed"] <= ATA_MAX_VS_FIXED,
                        f"search >= {SEARCH_MIN_VS_ATA:g}x ata": ratios["search_vs_ata"] >= SEARCH_MIN_VS_ATA}
    table = markdown(result)
    write_results(args.out, result, table)
    print(table)
    return result


if __name__ == "__main__":
    main()
