"""Class-to-image sampling with a trained DiT and its AdaTok: PNGs, a class grid, a length histogram, an .npz.

    adatok sample-c2i --dit outputs/dit/model --tokenizer outputs/demo/model \
        --classes all --per_class 8 --cfg_scale 4.0 --num_steps 50 --seed 0 --out outputs/samples
    accelerate launch -m adatok_vlm.sample_c2i --dit ... --classes all --per_class 50 --out ...
    adatok sample-c2i --generator ar --model VLM_DIR --classes all --per_class 8 --out DIR   (a VLM instead)

For each requested class the DiT draws a token count from the class's training length histogram
(``p(L | y)``, stored in its config), generates that many tokens with classifier-free guidance, and
the tokenizer decodes them. ``--out`` receives

* ``images/NNNNNN_cCCCC.png``: every sample (``N`` its global index, ``C`` its class);
* ``grid.png``: one row per class (the first ``--grid_classes`` classes, at most ``--grid_per_class``
  samples each), named from the DiT config's ``id2label`` when it has names;
* ``lengths_hist.png``: the generated token counts against the training distribution;
* ``samples_NxHxWx3.npz``: ADM's evaluation format, ``arr_0`` uint8 ``[N, H, W, 3]`` (NHWC), with
  ``arr_1`` / ``labels`` the class ids and ``lengths`` the token counts, in class-major order;
* ``summary.json``: the arguments, counts and the mean length per class.

Under ``accelerate launch`` sample ``i`` goes to rank ``i % W`` (so every rank gets a balanced mix
of classes) and rank ``r`` draws its noise and lengths from seed ``seed + 100003 * r``; the main
process gathers the ranks' parts and writes the grid, the histogram and the .npz.

An entry point (ARCHITECTURE.md): it draws with ``training.visualize`` and checks the tokenizer with
``tokenizer.loading.model_fingerprint``; no library imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .generator.configuration_dit import class_names_from_config
from .tokenizer.loading import model_fingerprint
from .training.flags import FlagParser
from .training.visualize import class_grid, length_histogram, to_uint8

RANK_SEED_STRIDE = 100_003


# ============================================================================================
# sampling
# ============================================================================================
def parse_classes(spec: str, num_classes: int) -> list[int]:
    """``"all"`` or ``"0,1,2"`` (ranges ``"3-7"`` allowed) -> class ids, each checked against ``num_classes``."""
    if spec.strip().lower() == "all":
        return list(range(num_classes))
    out = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--classes must be 'all' or comma-separated class ids such as 0,1,2 or 3-7, "
                             f"got {spec!r}") from None
    bad = [c for c in out if not 0 <= c < num_classes]
    if not out or bad:
        raise ValueError(f"--classes must name ids in 0..{num_classes - 1}, got {spec!r}")
    return out


@torch.no_grad()
def generate_batch(pipe, labels: list[int], cfg_scale: float, num_steps: int, sampler: str,
                   generator: torch.Generator, num_tokens: int | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """One batch through :class:`ClassToImagePipeline`: (uint8 NHWC images, lengths ``[B]``)."""
    out = pipe(labels, num_tokens=num_tokens, cfg_scale=cfg_scale, num_steps=num_steps, sampler=sampler,
               generator=generator, output_type="pt")
    return to_uint8(out.images), out.lengths.cpu()


def _init_state():
    from accelerate import PartialState

    # A launched multi-process run without GPUs must say cpu=True, or Accelerate sets up no process group.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=distributed and not torch.cuda.is_available())


def sample(args: argparse.Namespace) -> dict:
    """Run the sampling described by the parsed command line; returns the summary (on every rank)."""
    from .generator.modeling_dit import AdaTokDiT
    from .generator.pipeline import ClassToImagePipeline
    from .tokenizer import AdaTokModel

    state = _init_state()
    rank, world = state.process_index, state.num_processes
    out = Path(args.out)
    dit_dir = Path(args.dit)
    if not (dit_dir / "config.json").is_file():
        raise FileNotFoundError(f"--dit: no saved AdaTokDiT in {dit_dir} (expected config.json and weights from "
                                "train_dit's export, e.g. outputs/dit/model)")
    provenance_file = dit_dir / "token_cache.json"
    provenance = json.loads(provenance_file.read_text(encoding="utf-8")) if provenance_file.is_file() else {}
    tokenizer = args.tokenizer or provenance.get("tokenizer")
    if not tokenizer or not Path(tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer: no AdaTok folder {tokenizer!r}; pass the tokenizer whose tokens the "
                                "DiT was trained on (--tokenizer DIR)")
    recorded = provenance.get("tokenizer_fingerprint")
    if recorded and model_fingerprint(tokenizer) != recorded and state.is_main_process:
        warnings.warn(f"the DiT was trained on tokens of the tokenizer {provenance.get('tokenizer')} (fingerprint "
                      f"{recorded}) but --tokenizer {tokenizer} holds other weights: the images will be wrong "
                      "unless it is the same model")
    dit = AdaTokDiT.from_pretrained(dit_dir).to(state.device).eval()
    adatok = AdaTokModel.from_pretrained(tokenizer).to(state.device).eval()
    pipe = ClassToImagePipeline(dit, adatok)
    num_tokens = args.num_tokens
    if num_tokens is None and dit.config.length_histograms is None:
        raise ValueError(f"{dit_dir} stores no length histograms; pass --num_tokens N")
    classes = parse_classes(args.classes, dit.config.num_classes)
    if args.per_class < 1:
        raise ValueError(f"--per_class must be >= 1, got {args.per_class}")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    items = [c for c in classes for _ in range(args.per_class)]              # class-major order
    mine = list(range(rank, len(items), world))
    generator = torch.Generator(state.device).manual_seed(args.seed + RANK_SEED_STRIDE * rank)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        print(f"sampling {len(items)} images ({len(classes)} classes x {args.per_class}) with cfg {args.cfg_scale}, "
              f"{args.num_steps} {args.sampler} steps, {world} process(es), device {state.device}")
    from tqdm.auto import tqdm

    started = time.time()
    arrays, lengths = [], []
    bar = tqdm(total=len(mine), disable=not state.is_main_process, desc="sampling", unit="img")
    for lo in range(0, len(mine), args.batch_size):
        chunk = mine[lo : lo + args.batch_size]
        images, lens = generate_batch(pipe, [items[i] for i in chunk], args.cfg_scale, args.num_steps,
                                      args.sampler, generator, num_tokens)
        for i, image in zip(chunk, images):
            Image.fromarray(image).save(image_dir / f"{i:06d}_c{items[i]:04d}.png")
        arrays.append(images)
        lengths.append(lens)
        bar.update(len(chunk))
    bar.close()
    parts = out / ".parts"
    parts.mkdir(parents=True, exist_ok=True)
    h, w = adatok.config.image_size, adatok.config.image_size
    mine_arr = np.concatenate(arrays) if arrays else np.zeros((0, h, w, 3), np.uint8)
    mine_len = torch.cat(lengths).numpy() if lengths else np.zeros(0, np.int64)
    tmp = parts / f".rank-{rank:05d}.tmp.npz"
    np.savez(tmp, images=mine_arr, lengths=mine_len, index=np.asarray(mine, dtype=np.int64))
    os.replace(tmp, parts / f"rank-{rank:05d}.npz")
    state.wait_for_everyone()

    summary = {"num_images": len(items), "classes": classes, "per_class": args.per_class,
               "cfg_scale": args.cfg_scale, "num_steps": args.num_steps, "sampler": args.sampler, "seed": args.seed,
               "num_processes": world, "dit": str(dit_dir), "tokenizer": str(tokenizer),
               "sample_s": time.time() - started}
    if state.is_main_process:
        all_images = np.zeros((len(items), h, w, 3), np.uint8)
        all_lengths = np.zeros(len(items), np.int64)
        for r in range(world):
            part = np.load(parts / f"rank-{r:05d}.npz")
            all_images[part["index"]] = part["images"]
            all_lengths[part["index"]] = part["lengths"]
        labels = np.asarray(items, dtype=np.int64)
        npz = out / f"samples_{len(items)}x{h}x{w}x3.npz"
        np.savez(out / ".samples.tmp.npz", arr_0=all_images, arr_1=labels, labels=labels, lengths=all_lengths)
        os.replace(out / ".samples.tmp.npz", npz)
        names = class_names_from_config(dit.config)
        class_grid(all_images, labels, out / "grid.png", names, max_classes=args.grid_classes,
                   max_per_class=args.grid_per_class)
        reference = None
        if dit.config.length_histograms is not None:
            reference = np.asarray(dit.config.length_histograms, dtype=np.float64)[classes].sum(0)
        length_histogram(all_lengths, dit.config.max_tokens, out / "lengths_hist.png",
                         f"generated token counts (mean {all_lengths.mean():.1f})", reference=reference)
        by_class = {}
        for c in classes:
            sel = all_lengths[labels == c]
            by_class[str(c)] = {"name": names[c] if names else None, "count": int(sel.size),
                                 "mean_length": float(sel.mean())}
        summary.update(npz=str(npz), grid=str(out / "grid.png"), lengths_hist=str(out / "lengths_hist.png"),
                       mean_length=float(all_lengths.mean()), by_class=by_class)
        (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        for r in range(world):
            (parts / f"rank-{r:05d}.npz").unlink(missing_ok=True)
        parts.rmdir()
        print(f"wrote {len(items)} PNGs to {image_dir}, {npz.name}, grid.png and lengths_hist.png in {out} "
              f"(mean length {summary['mean_length']:.2f})")
    state.wait_for_everyone()
    return summary


def build_parser() -> FlagParser:
    from .sample_t2i import build_c2i_parser

    ar = build_c2i_parser()
    names = ", ".join("/".join(a.option_strings) for a in ar._actions if a.option_strings and a.dest != "help")
    old = ", ".join(sorted(ar.old_spellings()))
    p = FlagParser(prog="adatok sample-c2i", description=__doc__.split("\n\n")[0],
                   epilog=f"with --generator ar (an autoregressive VLM instead of a DiT) the options are {names} "
                          f"(old spellings {old}); adatok sample-c2i --generator ar --help describes them")
    p.add_argument("--generator", default="dit", choices=["dit", "ar"],
                   help="dit: a DiT and its AdaTok (the options below); ar: a VLM (--model DIR, see the end)")
    p.add_argument("--dit", required=True, help="a trained AdaTokDiT folder (train_dit's <output_dir>/model)")
    p.add_argument("--tokenizer", default=None,
                   help="the AdaTok folder that decodes the tokens (default: the one the DiT's token cache names)")
    p.add_argument("--classes", default="all", help="'all' or class ids: 0,1,2 or 3-7")
    p.add_argument("--per_class", type=int, default=8, help="samples per class")
    p.add_argument("--cfg_scale", type=float, default=4.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--num_steps", type=int, default=50, help="flow integration steps")
    p.add_argument("--sampler", default="euler", choices=["euler", "heun"])
    p.add_argument("--num_tokens", type=int, default=None, help="a fixed token count (default: the class histogram)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64, help="samples per DiT call, per process")
    p.add_argument("--grid_classes", type=int, default=16, help="rows of grid.png (classes)")
    p.add_argument("--grid_per_class", type=int, default=16, help="columns of grid.png (samples per class)")
    p.add_argument("--out", required=True, help="output folder")
    return p


def main(argv: list[str] | None = None) -> dict:
    """``--generator ar`` hands the arguments to the VLM's class-conditional sampler; otherwise a DiT samples."""
    argv = sys.argv[1:] if argv is None else list(argv)
    generator = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--generator"),
                     next((a.split("=", 1)[1] for a in argv if a.startswith("--generator=")), "dit"))
    if generator == "ar":
        from .sample_t2i import c2i_main

        return c2i_main(argv)
    return sample(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
