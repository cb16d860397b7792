"""`adatok evaluate`: reconstruction metrics of a trained AdaTok on a data split, with pictures.

    adatok evaluate --model outputs/demo/model --data fashion_mnist --split test --limit 1000 \
        --lengths 1,2,4,8,16,32,auto,search --metrics rmse,psnr,ssim,lpips,rqpr,reward,fd_vgg16 \
        --out outputs/eval --batch-size 128 --device cpu
    adatok evaluate ... --metrics rmse,fid --inception-weights pt_inception-2015-12-05-6726825d.pth
    adatok evaluate ... --samples samples.npz        # + gFID / gFD-VGG16 of generated samples vs the split
    adatok evaluate ... --linear-probe --probe-train-limit 10000   # + linear-probe top-1 per token count

Length modes (``--lengths``): token counts, ``auto`` (the policy), ``sample``, ``search``, ``oracle``,
``max_mse=X`` and ``mean_budget=N`` (the quality / budget dials). Default: 1, 2, 4, ..., m, plus
``auto`` when the model has a policy.

Writes to ``--out``: ``metrics.json`` (every number, one row per length mode), ``metrics.md`` (the
same as a table), ``<metric>_vs_tokens.png`` (each metric against the token count; adaptive modes
are points at their mean count), ``lengths_hist_<mode>.png`` for every adaptive mode and
``reconstructions.png`` (the first images at every mode beside the original); with ``--linear-probe``
also ``linear_probe_vs_tokens.png`` and a ``linear_probe`` entry in ``metrics.json`` (probes fitted on
``--probe-train-split``, scored on the evaluated images; Appendix B.5).

``fd_vgg16`` is the Frechet distance on VGG16 features (offline weights); ``fid`` is FID proper and
needs the pytorch-fid Inception weights (``--inception-weights``); they are never interchangeable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
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

DEFAULT_METRICS = "rmse,psnr,ssim,lpips,rqpr,reward"


# ============================================================================================
# arguments
# ============================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adatok evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an AdaTok folder (save_pretrained)")
    p.add_argument("--data", required=True,
                   help="fashion_mnist | natural_crops | an image folder | a save_to_disk folder | a cached hub name")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    p.add_argument("--lengths", default=None,
                   help="comma-separated: ints, auto, sample, search, oracle, max_mse=X, mean_budget=N")
    p.add_argument("--metrics", default=DEFAULT_METRICS, help=f"comma-separated, from {','.join(METRICS)}")
    p.add_argument("--rqpr-thresholds", default=None,
                   help="comma-separated rMSE thresholds for rQPR (default: the model's reward_rl_base)")
    p.add_argument("--lpips-net", default="alex", choices=("alex", "vgg"))
    p.add_argument("--inception-weights", default=None,
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (needed for fid)")
    p.add_argument("--vgg-resize", default="224", help="side the FD-VGG16 features see (an int, or 'none')")
    p.add_argument("--samples", default=None,
                   help="generated samples (.npz with arr_0, or an image folder): adds gFID / gFD-VGG16 vs the split")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--resize-mode", default=None, choices=("shortest_edge", "pad"),
                   help="override the image processor's resize mode")
    p.add_argument("--grid-images", type=int, default=8, help="images in reconstructions.png")
    p.add_argument("--num-threads", type=int, default=None, help="CPU threads (torch and BLAS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    probe = p.add_argument_group("linear probe (Appendix B.5): top-1 accuracy of a linear classifier on frozen tokens")
    probe.add_argument("--linear-probe", action="store_true", help="also fit and score linear probes (needs labels)")
    probe.add_argument("--probe-train-split", default="train", help="split the probes are fitted on")
    probe.add_argument("--probe-train-limit", type=int, default=10000, help="first N images of that split")
    probe.add_argument("--probe-lengths", default=None, help="comma-separated token counts (default 1, 2, 4, ..., m)")
    probe.add_argument("--probe-pooling", default="mean", choices=("mean", "flatten"))
    probe.add_argument("--probe-tail-drop", action="store_true",
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
def load_pixels(model_dir: Path, model, data: str, split: str, limit: int | None,
                resize_mode: str | None, with_labels: bool = False):
    """The split's images as uint8 ``[N, 3, S, S]`` through the model's own image processor
    (and their labels ``[N]``, -1 where unknown, with ``with_labels``)."""
    from transformers import AutoImageProcessor

    from ..image_processing_adatok import AdaTokImageProcessor
    from .batches import preload_images
    from .data import load_image_dataset

    if (model_dir / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(model_dir)
    else:
        processor = AdaTokImageProcessor(size=model.config.image_size)
    if resize_mode is not None:
        processor.resize_mode = resize_mode
    if processor.size != model.config.image_size:
        raise ValueError(f"the image processor in {model_dir} makes {processor.size}px images but the model takes "
                         f"{model.config.image_size}px")
    kwargs = {"num_crops": limit} if data in ("natural_crops", "natural-crops") and limit else {}
    dataset = load_image_dataset(data, split=split, limit=limit, **kwargs)
    preloaded = preload_images(dataset, processor)
    if getattr(preloaded, "num_skipped", 0):
        print(f"skipped {preloaded.num_skipped} unreadable images")
    return (preloaded.pixels, preloaded.labels) if with_labels else preloaded.pixels


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


def reconstruction_grid(result: EvaluationResult, path: Path, max_images: int = 8) -> Path:
    """Rows: images; columns: each length mode, then the original. Adaptive cells show their token count."""
    from PIL import Image, ImageDraw

    labels = [r["label"] for r in result.rows]
    original = result.samples["original"][:max_images]
    columns = [result.samples[label][:max_images] for label in labels] + [original]
    headers = labels + ["GT"]
    b, _, h, w = original.shape
    k, pad = len(columns), 2
    scale = max(1, math.ceil(96 / w))
    canvas = torch.ones(3, b * (h + pad) + pad, k * (w + pad) + pad)
    for j, column in enumerate(columns):
        for i in range(b):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, top : top + h, left : left + w] = column[i].float().clamp(0, 1)
    image = Image.fromarray((canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    header = 14
    full = Image.new("RGB", (image.width, image.height + header), "white")
    full.paste(image, (0, header))
    draw = ImageDraw.Draw(full)
    cell_w, cell_h = (w + pad) * scale, (h + pad) * scale
    for j, text in enumerate(headers):
        draw.text((pad * scale + j * cell_w + 2, 1), text[: max(3, cell_w // 6)], fill="black")
    for j, row in enumerate(result.rows):
        if row["mode"] == "fixed":
            continue
        tokens = result.per_image[row["label"]]["tokens"][:b].tolist()
        for i, count in enumerate(tokens):
            x, y = pad * scale + j * cell_w + 2, header + pad * scale + i * cell_h + 1
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
        paths.append(reconstruction_grid(result, out / "reconstructions.png", grid_images))
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
    """Linear probes fitted on ``--probe-train-split`` and scored on the evaluated images."""
    from .linear_probe import ProbeConfig, linear_probe

    if test_labels is None or int(test_labels.min()) < 0:
        raise ValueError(f"--linear-probe needs labelled images; {args.data}/{args.split} has none")
    if args.probe_train_limit is not None and args.probe_train_limit < 1:
        raise ValueError(f"--probe-train-limit must be positive, got {args.probe_train_limit}")
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
    with _thread_limit(args.num_threads):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoModel

    import adatok_vlm  # noqa: F401  (registers AdaTok with the Auto classes)

    from .fid import build_feature_extractor, generation_fd

    started = time.time()
    metrics = _split_list(args.metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"--metrics: unknown {unknown or '(none given)'}; choose from {','.join(METRICS)}")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError(f"--batch-size and --limit must be positive, got {args.batch_size} and {args.limit}")
    thresholds = [float(t) for t in _split_list(args.rqpr_thresholds)] if args.rqpr_thresholds else None
    vgg_resize = None if str(args.vgg_resize).lower() == "none" else int(args.vgg_resize)
    device = _resolve_device(args.device)
    torch.manual_seed(args.seed)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json; expected an AdaTok saved with save_pretrained")

    # Feature extractors first: a missing Inception file should fail before minutes of work.
    extractors = {}
    for key in FD_METRICS:
        if key in metrics:
            extractors[key] = build_feature_extractor(key, inception_weights=args.inception_weights,
                                                      vgg_resize=vgg_resize, device=device)
    model = AutoModel.from_pretrained(model_dir).to(device).eval()
    specs = _parse_lengths(args.lengths, model)
    pixels, labels = load_pixels(model_dir, model, args.data, args.split, args.limit, args.resize_mode,
                                 with_labels=True)
    print(f"adatok evaluate: {pixels.shape[0]} images of {args.data}/{args.split}, {len(specs)} length modes, "
          f"metrics {','.join(metrics)}, device {device}")

    result = evaluate_reconstructions(model, pixels, specs, metrics, thresholds=thresholds,
                                      batch_size=args.batch_size, lpips_net=args.lpips_net, extractors=extractors,
                                      keep_samples=max(0, args.grid_images), progress=not args.no_progress)
    for row in result.rows:
        if row["mode"] != "fixed":
            row["length_counts"] = _length_counts(result.per_image[row["label"]]["tokens"])

    generation = None
    if args.samples:
        if not extractors:
            raise ValueError("--samples needs a Frechet metric in --metrics (fd_vgg16 and/or fid)")
        generation = {"samples": str(args.samples)}
        for key, extractor in extractors.items():
            generation[key] = generation_fd(args.samples, pixels, extractor, args.batch_size,
                                            progress=not args.no_progress)

    probe = run_linear_probe(args, model_dir, model, pixels, labels) if args.linear_probe else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pictures = write_pictures(result, model, out, args.grid_images)
    if probe is not None:
        pictures.append(plot_probe(probe, out / "linear_probe_vs_tokens.png"))
    files = ["metrics.json", "metrics.md", *[p.name for p in pictures]]
    report = {
        "model": str(model_dir), "data": args.data, "split": args.split, "limit": args.limit,
        "image_size": model.config.image_size, "num_latent_tokens": model.num_latent_tokens,
        "has_policy": model.has_policy, "device": str(device),
        "lpips_net": args.lpips_net if "lpips" in metrics else None,
        "feature_extractors": {k: {"label": e.label, "network": e.name,
                                   **({"resize": e.resize} if hasattr(e, "resize") else {}),
                                   **({"weights": str(e.weights_path)} if hasattr(e, "weights_path") else {})}
                               for k, e in extractors.items()},
        **result.to_dict(),
        "generation": generation,
        "linear_probe": probe,
        "files": files,
        "wall_s": time.time() - started,
    }
    table = markdown_table(result)
    if generation:
        table += "\nGenerated samples (" + generation["samples"] + ") vs the split: " + ", ".join(
            f"g{extractors[k].label} {generation[k]:.3f}" for k in extractors) + "\n"
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
