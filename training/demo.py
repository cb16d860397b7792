"""`make demo`: train AdaTok-tiny on Fashion-MNIST on a CPU, evaluate it, and write pictures.

    python -m adatok_vlm.training.demo --output_dir outputs/demo [--train.time_budget_s 600]

Writes to ``outputs/demo/``: ``model/`` (loads with ``AutoModel.from_pretrained``),
``reconstructions.png`` (test images from 1, 2, 4, ..., m tokens beside the original),
``rmse_vs_tokens.png``, ``rqpr_vs_tokens.png`` and ``metrics.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from .config import deep_merge, fill_dataclass, load_yaml, parse_overrides
from .evaluation import default_lengths, is_monotone_decreasing, per_image_mse, summarize
from .train_tokenizer import TokenizerTrainingConfig, build_image_processor, load_split, train

REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
RQPR_THRESHOLD = 0.02


def evaluate_and_plot(model_dir: Path, cfg: TokenizerTrainingConfig, out_dir: Path, limit: int | None = None) -> dict:
    """Per-length rMSE/PSNR/rQPR on the held-out split, plus the figures."""
    from transformers import AutoModel

    from .batches import preload_images
    from .visualize import metric_curve, reconstruction_grid

    model = AutoModel.from_pretrained(model_dir).eval()
    test = load_split(cfg.data, cfg.data.eval_split, cfg.train.seed)
    if limit:
        test = test.select(range(min(limit, len(test))))
    pixels = preload_images(test, build_image_processor(model.config, cfg.data, train=False)).pixels
    lengths = default_lengths(model.config.num_latent_tokens)
    start = time.time()
    mse = per_image_mse(model, pixels, lengths)
    eval_s = time.time() - start
    per_length = summarize(mse, lengths, RQPR_THRESHOLD)
    reconstruction_grid(model, pixels[:10].float() / 255.0, lengths, out_dir / "reconstructions.png", scale=3)
    rmse = [per_length[str(k)]["rmse"] for k in lengths]
    metric_curve(lengths, mse, rmse, "rMSE", out_dir / "rmse_vs_tokens.png",
                 "rMSE vs tokens (Fashion-MNIST test; thin: images)", threshold=RQPR_THRESHOLD)
    metric_curve(lengths, None, [per_length[str(k)]["rqpr"] for k in lengths], f"rQPR (rMSE <= {RQPR_THRESHOLD})",
                 out_dir / "rqpr_vs_tokens.png", "rQPR vs tokens (Fashion-MNIST test)")
    m = model.config.num_latent_tokens
    checks = {
        "rmse_monotone": is_monotone_decreasing(rmse),
        "rmse_full_le_0.015": per_length[str(m)]["rmse"] <= 0.015,
        "rmse_full_le_0.6x_m_over_8": per_length[str(m)]["rmse"] <= 0.6 * per_length[str(max(1, m // 8))]["rmse"],
    }
    return {"num_latent_tokens": m, "per_length": per_length, "num_test_images": int(pixels.shape[0]),
            "eval_s": eval_s, "quality_checks": checks}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    config_path, overrides = parse_overrides(argv)
    raw = deep_merge(load_yaml(config_path or REPO_CONFIG), overrides)
    eval_limit = raw.pop("eval_limit", None)
    cfg = fill_dataclass(TokenizerTrainingConfig, raw)
    out_dir = Path(cfg.train.output_dir)
    summary = train(cfg)
    metrics = evaluate_and_plot(Path(summary["model_dir"]), cfg, out_dir, eval_limit)
    metrics.update(images_per_s=summary["images_per_s"], wall_s=summary["wall_s"], train_steps=summary["steps"],
                   num_parameters=summary["num_parameters"])
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    print("\nAdaTok demo results (Fashion-MNIST test split):")
    print(" tokens   rMSE     PSNR    rQPR@0.02")
    for length, row in metrics["per_length"].items():
        print(f" {int(length):6d}   {row['rmse']:.4f}  {row['psnr']:6.2f}  {row['rqpr']:.3f}")
    print(f"quality checks: {metrics['quality_checks']}")
    for name in ("model", "reconstructions.png", "rmse_vs_tokens.png", "rqpr_vs_tokens.png", "metrics.json"):
        print(f"  wrote {out_dir / name}")
    return metrics


if __name__ == "__main__":
    main()
