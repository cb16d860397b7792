"""`adatok evaluate`: reconstruction metrics of a trained AdaTok on a data split, with pictures.

    adatok evaluate --model outputs/demo/model --data fashion_mnist --split test --limit 1000 \
        --lengths 1,2,4,8,16,32,auto,search --metrics rmse,psnr,ssim,lpips,rqpr,reward,fd_vgg16 \
        --out outputs/eval --batch_size 128 --device cpu
    adatok evaluate ... --metrics rmse,fid --inception_weights pt_inception-2015-12-05-6726825d.pth
    adatok evaluate ... --samples samples.npz        # + gFID / gFD-VGG16 of generated samples vs the split
    adatok evaluate ... --linear_probe --probe_train_limit 10000   # + linear-probe top-1 per token count

gFID the field's way (no model needed): generated samples against ADM's reference batch, with the
Inception Score and ADM's precision / recall from the same InceptionV3 pool_3 features::

    adatok evaluate --samples samples.npz --reference VIRTUAL_imagenet256_labeled.npz \
        --inception_weights pt_inception-2015-12-05-6726825d.pth [--metrics fid,is,pr] [--out DIR]
    torchrun --nproc_per_node 8 -m adatok_vlm.training.evaluate --samples ... --reference ...   # 8 ranks

The reference's ``mu``/``sigma`` are used when present (else its ``arr_0`` images); its ``arr_0``
also gives precision / recall (k = 3). ``--metrics fd_vgg16,pr`` is the offline stand-in (never FID).

rFID over a large split runs on every rank of ``torchrun`` (each its contiguous shard, statistics
and per-image values gathered), streaming the split through DataLoader workers whenever it does not
fit ``--preload_max_gb`` decoded (``--preload false`` forces streaming)::

    torchrun --nproc_per_node 8 -m adatok_vlm.training.evaluate --model DIR --data /data/imagenet \
        --split val --lengths 256,auto --metrics rmse,fid --inception_weights W.pth --out outputs/eval

Length modes (``--lengths``): token counts, ``auto`` (the policy), ``sample``, ``search``, ``oracle``,
``max_mse=X`` and ``mean_budget=N`` (the quality / budget dials). Default: 1, 2, 4, ..., m, plus
``auto`` when the model has a policy.

Writes to ``--out``: ``metrics.json`` (every number, one row per length mode), ``metrics.md`` (the
same as a table), ``<metric>_vs_tokens.png`` (each metric against the token count; adaptive modes
are points at their mean count), ``lengths_hist_<mode>.png`` for every adaptive mode and
``reconstructions.png`` (the first images at every mode beside the original); with ``--linear_probe``
also ``linear_probe_vs_tokens.png`` and a ``linear_probe`` entry in ``metrics.json`` (probes fitted on
``--probe_train_split``, scored on the evaluated images; Appendix B.5).

``fd_vgg16`` is the Frechet distance on VGG16 features (offline weights); ``fid`` is FID proper and
needs the pytorch-fid Inception weights (``--inception_weights``); they are never interchangeable.
Every report names the feature network each number comes from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

from .evaluation import (
    FD_METRICS,
    METRIC_LABELS,
    METRICS,
    EvaluationResult,
    default_lengths,
    evaluate_reconstructions,
    markdown_table,
    parse_length_spec,
    rqpr_key,
)
from .fid import GENERATION_METRICS
from .flags import FlagParser

DEFAULT_METRICS = "rmse,psnr,ssim,lpips,rqpr,reward"
DEFAULT_GENERATION_METRICS = "fid,is,pr"
# --metrics that only measure --samples: training.fid's generation metrics besides the distance itself.
GENERATION_ONLY = tuple(m for m in GENERATION_METRICS if m != "fd")


# ============================================================================================
# arguments
# ============================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="adatok evaluate", description=__doc__)
    p.add_argument("--model", default=None,
                   help="an AdaTok folder (save_pretrained); leave out with --samples --reference for gFID alone")
    p.add_argument("--data", default=None,
                   help="fashion_mnist | natural_crops | an image folder | an ImageNet-layout folder | webdataset "
                        "shards | a save_to_disk folder | a cached hub name (needed with --model)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    p.add_argument("--lengths", default=None,
                   help="comma-separated: ints, auto, sample, search, oracle, max_mse=X, mean_budget=N")
    p.add_argument("--metrics", default=None,
                   help=f"comma-separated, from {','.join(METRICS + GENERATION_ONLY)} (default {DEFAULT_METRICS}; "
                        f"without --model {DEFAULT_GENERATION_METRICS}). is (Inception Score) and pr (precision / "
                        "recall) apply to --samples")
    p.add_argument("--rqpr_thresholds", default=None,
                   help="comma-separated rMSE thresholds for rQPR (default: the model's reward_rl_base)")
    p.add_argument("--lpips_net", default="alex", choices=("alex", "vgg"))
    p.add_argument("--inception_weights", default=None,
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (needed for fid)")
    p.add_argument("--vgg_resize", default="224", help="side the FD-VGG16 features see (an int, or 'none')")
    p.add_argument("--samples", default=None,
                   help="generated samples (.npz with arr_0, or an image folder): adds gFID / gFD-VGG16 vs "
                        "--reference (or vs the split)")
    p.add_argument("--reference", default=None,
                   help="gFID reference: an ADM reference batch .npz (mu/sigma and/or arr_0), a statistics .npz, "
                        "or an image folder")
    p.add_argument("--is_splits", type=int, default=10, help="Inception Score splits (the field's 10)")
    p.add_argument("--pr_k", type=int, default=3, help="nearest neighbours of precision / recall (ADM's 3)")
    p.add_argument("--out", default=None, help="output folder (required with --model)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--resize_mode", default=None, choices=("shortest_edge", "pad"),
                   help="override the image processor's resize mode")
    p.add_argument("--grid_images", type=int, default=8, help="images in reconstructions.png")
    p.add_argument("--num_threads", type=int, default=None, help="CPU threads (torch and BLAS)")
    p.add_argument("--preload", default="auto", choices=("auto", "true", "false"),
                   help="decode the split into memory first: auto = when it fits --preload_max_gb decoded")
    p.add_argument("--preload_max_gb", type=float, default=None,
                   help="the preload bound in GB (default: training.data_sources' DEFAULT_PRELOAD_MAX_GB)")
    p.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader workers decoding a streamed split (default: up to 4 where fork exists)")
    p.add_argument("--streaming", action="store_true", help="stream the data set (hub streaming / webdataset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_progress", action="store_true")
    probe = p.add_argument_group("linear probe (Appendix B.5): top-1 accuracy of a linear classifier on frozen tokens")
    probe.add_argument("--linear_probe", action="store_true", help="also fit and score linear probes (needs labels)")
    probe.add_argument("--probe_train_split", default="train", help="split the probes are fitted on")
    probe.add_argument("--probe_train_limit", type=int, default=10000, help="first N images of that split")
    probe.add_argument("--probe_lengths", default=None, help="comma-separated token counts (default 1, 2, 4, ..., m)")
    probe.add_argument("--probe_pooling", default="mean", choices=("mean", "flatten"))
    probe.add_argument("--probe_tail_drop", action="store_true",
                       help="one probe trained on random prefixes, scored at every length")
    return p


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


@contextlib.contextmanager
def _thread_limit(num_threads: int | None):
    if num_threads is None:
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # BLAS keeps its own setting
        yield
        return
    with threadpool_limits(num_threads):
        yield


# ============================================================================================
# data
# ============================================================================================
def model_processor(model_dir: Path, model, resize_mode: str | None):
    """The image processor saved with the model (or a default one of its size), checked against it."""
    from transformers import AutoImageProcessor

    from ..tokenizer.image_processing_adatok import AdaTokImageProcessor

    if (model_dir / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(model_dir)
    else:
        processor = AdaTokImageProcessor(size=model.config.image_size)
    if resize_mode is not None:
        processor.resize_mode = resize_mode
    if processor.size != model.config.image_size:
        raise ValueError(f"the image processor in {model_dir} makes {processor.size}px images but the model takes "
                         f"{model.config.image_size}px")
    return processor


def open_split(data: str, split: str, limit: int | None, streaming: bool | None = None):
    """The split as a ``datasets.Dataset`` (or ``IterableDataset`` for shards / streams); nothing decoded."""
    from .data import load_image_dataset

    kwargs = {"num_crops": limit} if data in ("natural_crops", "natural-crops") and limit else {}
    return load_image_dataset(data, split=split, limit=limit, streaming=streaming, **kwargs)


def load_pixels(model_dir: Path, model, data: str, split: str, limit: int | None,
                resize_mode: str | None, with_labels: bool = False):
    """The split's images as uint8 ``[N, 3, S, S]`` through the model's own image processor
    (and their labels ``[N]``, -1 where unknown, with ``with_labels``)."""
    from .batches import preload_images

    processor = model_processor(model_dir, model, resize_mode)
    preloaded = preload_images(open_split(data, split, limit), processor)
    if getattr(preloaded, "num_skipped", 0):
        print(f"skipped {preloaded.num_skipped} unreadable images")
    return (preloaded.pixels, preloaded.labels) if with_labels else preloaded.pixels


class StreamedPixels:
    """This rank's shard of a split as uint8 ``[B, 3, S, S]`` batches, decoded in DataLoader workers.

    A map-style split is cut into contiguous rank blocks (:func:`~adatok_vlm.training.fid.shard_bounds`:
    every image exactly once over the ranks, no padding); a stream is split by
    :func:`~adatok_vlm.training.data_sources.shard_stream`. Pixels are rounded to uint8 as a preloaded
    split's are, so streaming and preloading measure the same images. Unreadable images are skipped and
    counted in ``num_skipped``.
    """

    def __init__(self, dataset, processor, batch_size: int, rank: int, world_size: int, num_workers: int | None):
        import datasets

        from .data import build_dataloader, build_stream_loader, default_num_workers
        from .fid import shard_bounds

        if isinstance(dataset, datasets.IterableDataset):
            self.loader = build_stream_loader(dataset, processor, batch_size, rank=rank, world_size=world_size,
                                              num_workers=num_workers)
        else:
            start, stop = shard_bounds(len(dataset), rank, world_size)
            if stop == start:
                raise ValueError(f"the split has {len(dataset)} images, fewer than the {world_size} ranks")
            self.loader = build_dataloader(dataset.select(range(start, stop)), processor, batch_size=batch_size,
                                           shuffle=False, distributed=False,
                                           num_workers=default_num_workers() if num_workers is None else num_workers)
        self.num_skipped = 0

    def __iter__(self):
        for batch in self.loader:
            self.num_skipped += int(batch["num_skipped"])
            if batch["pixel_values"].shape[0]:
                yield (batch["pixel_values"].clamp(0, 1) * 255).round().to(torch.uint8)


# ============================================================================================
# pictures
# ============================================================================================
def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _plotted_metrics(result: EvaluationResult) -> list[tuple[str, list[str], str]]:
    """(file stem, row keys drawn on one plot, y label)."""
    plots = []
    for key in ("rmse", "psnr", "ssim", "lpips"):
        if key in result.metrics:
            plots.append((key, [key], METRIC_LABELS[key]))
    if "rqpr" in result.metrics:
        plots.append(("rqpr", [rqpr_key(t) for t in result.thresholds], "rQPR"))
    if "reward" in result.metrics:
        plots.append(("reward", ["reward_continuous", "reward_structured"], "mean reward"))
    for key in FD_METRICS:
        if key in result.metrics:
            plots.append((key, [key], METRIC_LABELS[key]))
    return plots


def plot_metric_vs_tokens(result: EvaluationResult, keys: list[str], ylabel: str, path: Path,
                          threshold: float | None = None) -> Path:
    """Fixed lengths as a line (per key), adaptive modes as labelled points at their mean token count."""
    import matplotlib.pyplot as plt

    from .visualize import save_figure   # also selects the Agg backend

    fixed = sorted((r for r in result.rows if r["mode"] == "fixed"), key=lambda r: r["mean_tokens"])
    adaptive = [r for r in result.rows if r["mode"] != "fixed"]
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, key in enumerate(keys):
        color = colors[i % len(colors)]
        name = METRIC_LABELS.get(key, key.replace("rqpr@", "rQPR @ "))
        if fixed:
            ax.plot([r["mean_tokens"] for r in fixed], [r[key] for r in fixed], marker="o", color=color,
                    linewidth=2, label=f"{name}, fixed length" if len(keys) > 1 or adaptive else name)
        for j, row in enumerate(adaptive):
            ax.scatter([row["mean_tokens"]], [row[key]], marker="D*^sPX"[j % 6], s=60, color=color,
                       edgecolor="black", zorder=3, label=f"{row['label']}" if i == 0 else None)
            ax.annotate(row["label"], (row["mean_tokens"], row[key]), textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["mean_tokens"] for r in fixed})
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel("tokens per image (adaptive modes: mean)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} vs tokens ({result.num_images} images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def modes_grid(result: EvaluationResult, path: Path, max_images: int = 8) -> Path:
    """Rows: images; columns: each length mode, then the original. Adaptive cells show their token count."""
    from PIL import ImageDraw

    from .visualize import HEADER_HEIGHT, column_grid

    labels = [r["label"] for r in result.rows]
    original = result.samples["original"][:max_images]
    columns = [result.samples[label][:max_images] for label in labels] + [original]
    b, _, _, w = original.shape
    pad = 2
    scale = max(1, math.ceil(96 / w))
    full, cell_w, cell_h = column_grid(columns, labels + ["GT"], scale, pad)
    draw = ImageDraw.Draw(full)
    for j, row in enumerate(result.rows):
        if row["mode"] == "fixed":
            continue
        tokens = result.per_image[row["label"]]["tokens"][:b].tolist()
        for i, count in enumerate(tokens):
            x, y = pad * scale + j * cell_w + 2, HEADER_HEIGHT + pad * scale + i * cell_h + 1
            draw.rectangle((x - 1, y, x + 6 * len(str(count)) + 1, y + 10), fill="white")
            draw.text((x, y - 1), str(count), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    full.save(path)
    return path


def write_pictures(result: EvaluationResult, model, out: Path, grid_images: int) -> list[Path]:
    from .visualize import length_histogram

    paths = []
    for stem, keys, ylabel in _plotted_metrics(result):
        threshold = result.thresholds[0] if stem == "rmse" else None
        paths.append(plot_metric_vs_tokens(result, keys, ylabel, out / f"{stem}_vs_tokens.png", threshold))
    for row in result.rows:
        if row["mode"] != "fixed":
            paths.append(length_histogram(result.per_image[row["label"]]["tokens"], model.num_latent_tokens,
                                          out / f"lengths_hist_{_file_label(row['label'])}.png",
                                          f"tokens per image: {row['label']} (mean {row['mean_tokens']:.2f})"))
    if grid_images > 0:
        paths.append(modes_grid(result, out / "reconstructions.png", grid_images))
    return paths


# ============================================================================================
# main
# ============================================================================================
def _parse_lengths(text: str | None, model) -> list:
    if text is None:
        specs = list(default_lengths(model.num_latent_tokens))
        return specs + ["auto"] if model.has_policy else specs
    specs = [parse_length_spec(t) for t in _split_list(text)]
    if not specs:
        raise ValueError("--lengths: expected at least one length mode")
    return specs


def _length_counts(tokens: torch.Tensor) -> dict[str, int]:
    values, counts = torch.unique(tokens, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def run_linear_probe(args: argparse.Namespace, model_dir: Path, model, test_pixels: torch.Tensor,
                     test_labels: torch.Tensor) -> dict:
    """Linear probes fitted on ``--probe_train_split`` and scored on the evaluated images."""
    from .linear_probe import ProbeConfig, linear_probe

    if test_labels is None or int(test_labels.min()) < 0:
        raise ValueError(f"--linear_probe needs labelled images; {args.data}/{args.split} has none")
    if args.probe_train_limit is not None and args.probe_train_limit < 1:
        raise ValueError(f"--probe_train_limit must be positive, got {args.probe_train_limit}")
    train_pixels, train_labels = load_pixels(model_dir, model, args.data, args.probe_train_split,
                                             args.probe_train_limit, args.resize_mode, with_labels=True)
    lengths = [int(v) for v in _split_list(args.probe_lengths)] if args.probe_lengths else None
    config = ProbeConfig(pooling=args.probe_pooling, tail_drop=args.probe_tail_drop, seed=args.seed)
    return linear_probe(model, train_pixels, train_labels, test_pixels, test_labels, lengths=lengths,
                        config=config, batch_size=args.batch_size, progress=not args.no_progress)


def probe_table(probe: dict) -> str:
    head = "| tokens | " + " | ".join(probe["per_length"]) + " |"
    rule = "| --- |" + " --- |" * len(probe["per_length"])
    row = "| top-1 | " + " | ".join(f"{v:.3f}" for v in probe["per_length"].values()) + " |"
    return (f"Linear probe ({probe['config']['pooling']} pooling, {probe['num_train']} training images, "
            f"chance {probe['chance']:.3f}):\n\n{head}\n{rule}\n{row}\n")


def plot_probe(probe: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .visualize import save_figure

    lengths = [int(k) for k in probe["per_length"]]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(lengths, list(probe["per_length"].values()), marker="o", label="test")
    ax.plot(lengths, list(probe["train_accuracy"].values()), marker=".", linestyle="--", label="train")
    ax.axhline(probe["chance"], color="grey", linewidth=0.8, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("linear-probe top-1")
    ax.legend()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    with _thread_limit(args.num_threads), _process_group(args.device) as device:
        return run(args, device)


@contextlib.contextmanager
def _process_group(device_name: str):
    """Under ``torchrun`` (``WORLD_SIZE`` > 1) a process group for the run (NCCL on GPUs, one GPU per
    ``LOCAL_RANK``; gloo on CPUs), destroyed afterwards; yields the device this rank computes on."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield _resolve_device(device_name)
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = _resolve_device(device_name)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _check_metrics(args: argparse.Namespace) -> list[str]:
    text = args.metrics or (DEFAULT_METRICS if args.model else DEFAULT_GENERATION_METRICS)
    metrics = _split_list(text)
    unknown = [m for m in metrics if m not in METRICS + GENERATION_ONLY]
    if unknown or not metrics:
        raise ValueError(f"--metrics: unknown {unknown or '(none given)'}; choose from "
                         f"{','.join(METRICS + GENERATION_ONLY)}")
    if args.model is None:
        if not (args.samples and args.reference):
            raise ValueError("adatok evaluate: give --model and --data (reconstruction metrics), or --samples and "
                             "--reference (gFID of generated samples), or all of them")
        wrong = [m for m in metrics if m not in FD_METRICS + GENERATION_ONLY]
        if wrong:
            raise ValueError(f"--metrics {','.join(wrong)}: reconstruction metrics need --model and --data")
    elif args.data is None or args.out is None:
        raise ValueError("--model needs --data (the split to reconstruct) and --out (where the report goes)")
    generation_only = [m for m in metrics if m in GENERATION_ONLY]
    if generation_only and not args.samples:
        raise ValueError(f"--metrics {','.join(generation_only)}: Inception Score and precision / recall measure "
                         "generated samples; give --samples (and --reference)")
    if (args.samples or generation_only) and not any(m in FD_METRICS for m in metrics):
        raise ValueError("--samples needs a feature network in --metrics: fid (InceptionV3, with --inception_weights) "
                         "and/or fd_vgg16 (the offline VGG16 stand-in)")
    if "is" in metrics and "fid" not in metrics:
        raise ValueError("--metrics is: the Inception Score needs the FID Inception; add fid (and --inception_weights)")
    if args.reference and not args.samples:
        raise ValueError("--reference is the gFID reference of --samples; give --samples too")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError(f"--batch_size and --limit must be positive, got {args.batch_size} and {args.limit}")
    return metrics


def evaluate_samples(args: argparse.Namespace, extractors: dict, metrics: list[str], reference, reference_name: str,
                     ) -> dict:
    """gFID (per network), IS and precision / recall of ``--samples`` against ``reference``."""
    from .fid import evaluate_generation

    generation = {"samples": str(args.samples), "reference": reference_name, "details": {}}
    for key, extractor in extractors.items():
        wanted = ["fd"] + [m for m in ("is", "pr") if m in metrics and (m != "is" or extractor.num_classes)]
        details = evaluate_generation(args.samples, reference(key) if callable(reference) else reference, extractor,
                                      metrics=wanted, batch_size=args.batch_size, k=args.pr_k, splits=args.is_splits,
                                      progress=not args.no_progress)
        generation[key] = details[key]
        generation["details"][key] = details
    return generation


def generation_text(generation: dict) -> str:
    from .fid import generation_report_lines

    text = f"Generated samples ({generation['samples']}) vs {generation['reference']}:\n"
    for details in generation["details"].values():
        text += "\n".join(f"- {line}" for line in generation_report_lines(details)) + "\n"
    return text


def _build_extractors(args: argparse.Namespace, metrics: list[str], device) -> dict:
    from .fid import build_feature_extractor

    vgg_resize = None if str(args.vgg_resize).lower() == "none" else int(args.vgg_resize)
    return {key: build_feature_extractor(key, inception_weights=args.inception_weights, vgg_resize=vgg_resize,
                                         device=device)
            for key in FD_METRICS if key in metrics}


def _describe_extractors(extractors: dict) -> dict:
    return {k: {"label": e.label, "network": e.name, "description": e.description,
                **({"resize": e.resize} if hasattr(e, "resize") else {}),
                **({"weights": str(e.weights_path)} if hasattr(e, "weights_path") else {})}
            for k, e in extractors.items()}


def run_generation(args: argparse.Namespace, metrics: list[str], device, rank: int) -> dict:
    """``--samples`` against ``--reference`` alone: no model, no data split."""
    started = time.time()
    extractors = _build_extractors(args, metrics, device)
    generation = evaluate_samples(args, extractors, metrics, args.reference, str(args.reference))
    report = {"mode": "generation", "device": str(device), "feature_extractors": _describe_extractors(extractors),
              "generation": generation, "wall_s": time.time() - started}
    text = generation_text(generation)
    if rank == 0:
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            report["files"] = ["metrics.json", "metrics.md"]
            (out / "metrics.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
            (out / "metrics.md").write_text(f"# Generated samples: {args.samples}\n\n{text}", encoding="utf-8")
        print(text, end="")
    return report


def _tri_state(text: str) -> bool | None:
    return {"auto": None, "true": True, "false": False}[text]


def run(args: argparse.Namespace, device: torch.device | None = None) -> dict:
    from transformers import AutoModel

    import adatok_vlm  # noqa: F401  (registers AdaTok with the Auto classes)

    from .data_sources import DEFAULT_PRELOAD_MAX_GB, decide_preload
    from .fid import process_world, shard_bounds

    started = time.time()
    metrics = _check_metrics(args)
    device = _resolve_device(args.device) if device is None else device
    rank, world = process_world()
    torch.manual_seed(args.seed)
    if args.model is None:
        return run_generation(args, metrics, device, rank)
    thresholds = [float(t) for t in _split_list(args.rqpr_thresholds)] if args.rqpr_thresholds else None
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json; expected an AdaTok saved with save_pretrained")

    # Feature extractors first: a missing Inception file should fail before minutes of work.
    extractors = _build_extractors(args, metrics, device)
    model = AutoModel.from_pretrained(model_dir).to(device).eval()
    specs = _parse_lengths(args.lengths, model)
    dataset = open_split(args.data, args.split, args.limit, streaming=True if args.streaming else None)
    import datasets

    size = len(dataset) if isinstance(dataset, datasets.Dataset) else None
    preload = decide_preload(size, model.config.image_size,
                             preload=True if args.linear_probe else _tri_state(args.preload),
                             preload_max_gb=DEFAULT_PRELOAD_MAX_GB if args.preload_max_gb is None
                             else args.preload_max_gb)
    labels, streamed = None, None
    if preload:
        pixels, labels = load_pixels(model_dir, model, args.data, args.split, args.limit, args.resize_mode,
                                     with_labels=True)
        start, stop = shard_bounds(pixels.shape[0], rank, world)
        source, count = pixels[start:stop], f"{pixels.shape[0]} preloaded"
    else:
        streamed = StreamedPixels(dataset, model_processor(model_dir, model, args.resize_mode), args.batch_size,
                                  rank, world, args.num_workers)
        source, count = streamed, f"{size if size is not None else 'a stream of'} streamed"
    if rank == 0:
        print(f"adatok evaluate: {count} images of {args.data}/{args.split}, {len(specs)} length modes, "
              f"metrics {','.join(metrics)}, device {device}" + (f", {world} ranks" if world > 1 else ""))

    recon_metrics = [m for m in metrics if m in METRICS]
    result = evaluate_reconstructions(model, source, specs, recon_metrics, thresholds=thresholds,
                                      batch_size=args.batch_size, lpips_net=args.lpips_net, extractors=extractors,
                                      keep_samples=max(0, args.grid_images), progress=not args.no_progress and rank == 0)
    for row in result.rows:
        if row["mode"] != "fixed":
            row["length_counts"] = _length_counts(result.per_image[row["label"]]["tokens"])
    if streamed is not None and streamed.num_skipped:
        result.notes.append(f"{streamed.num_skipped} unreadable images skipped on rank {rank}")

    generation = None
    if args.samples:
        if args.reference:
            generation = evaluate_samples(args, extractors, metrics, args.reference, str(args.reference))
        else:                     # against the split: the originals' statistics, measured already
            generation = evaluate_samples(args, extractors, metrics, result.reference_statistics.get,
                                          f"the evaluated split ({args.data}/{args.split})")

    probe = run_linear_probe(args, model_dir, model, pixels, labels) if args.linear_probe and rank == 0 else None

    report = {
        "model": str(model_dir), "data": args.data, "split": args.split, "limit": args.limit,
        "image_size": model.config.image_size, "num_latent_tokens": model.num_latent_tokens,
        "has_policy": model.has_policy, "device": str(device), "world_size": world, "preloaded": bool(preload),
        "lpips_net": args.lpips_net if "lpips" in metrics else None,
        "feature_extractors": _describe_extractors(extractors),
        **result.to_dict(),
        "generation": generation,
        "linear_probe": probe,
    }
    if rank != 0:
        return report
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pictures = write_pictures(result, model, out, args.grid_images)
    if probe is not None:
        pictures.append(plot_probe(probe, out / "linear_probe_vs_tokens.png"))
    report["files"] = files = ["metrics.json", "metrics.md", *[p.name for p in pictures]]
    report["wall_s"] = time.time() - started
    table = markdown_table(result)
    if generation:
        table += "\n" + generation_text(generation)
    if probe is not None:
        table += "\n" + probe_table(probe)
    (out / "metrics.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "metrics.md").write_text(f"# AdaTok evaluation: {model_dir} on {args.data}/{args.split}\n\n{table}",
                                    encoding="utf-8")
    print(table)
    for name in files:
        print(f"  wrote {out / name}")
    return report


if __name__ == "__main__":
    main()
