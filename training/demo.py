"""`make demo`: train AdaTok-tiny on Fashion-MNIST on a CPU, evaluate it, and write pictures.

    python -m adatok_vlm.training.demo --output_dir outputs/demo [--train.time_budget_s 600]

Stage 1 trains the tokenizer with Nested Tail Masking under a wall-time budget; stage 2 trains the
Adaptive Token Allocation policy on the frozen tokenizer (a few minutes). Writes to
``outputs/demo/``: ``model/`` (tokenizer + policy; loads with ``AutoModel.from_pretrained``),
``reconstructions.png`` (test images from 1, 2, 4, ..., m tokens beside the original),
``rmse_vs_tokens.png``, ``rqpr_vs_tokens.png``, ``metrics.json``, and from stage 2
``ablation.json`` / ``ablation.md`` (the paper's Table 2), ``lengths_hist.png`` and the Figure 3/5/6
plots. ``--skip_policy true`` stops after stage 1.
"""

from __future__ import annotations

import dataclasses
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


def run_policy_stage(raw_policy: dict, cfg: TokenizerTrainingConfig, model_dir: Path, out_dir: Path,
                     eval_limit: int | None) -> dict:
    """Stage 2 on the demo tokenizer, then Table 2 and the figures on the held-out split."""
    import shutil

    from transformers import AutoModel

    from .ablation import markdown_table, plot_figures, run_ablation
    from .batches import preload_images
    from .train_policy import PolicyTrainingConfig
    from .train_policy import train as train_policy

    raw = deep_merge({"tokenizer": str(model_dir), "data": dataclasses.asdict(cfg.data),
                      "train": {"output_dir": str(out_dir / "policy"), "seed": cfg.train.seed}}, raw_policy)
    summary = train_policy(fill_dataclass(PolicyTrainingConfig, raw))
    shutil.rmtree(model_dir)
    shutil.copytree(summary["model_dir"], model_dir)          # outputs/demo/model now carries the policy
    model = AutoModel.from_pretrained(model_dir).eval()
    test = load_split(cfg.data, cfg.data.eval_split, cfg.train.seed)
    test = test.select(range(min(eval_limit or 2000, len(test))))
    pixels = preload_images(test, build_image_processor(model.config, cfg.data, train=False)).pixels
    result = run_ablation(model, pixels)
    plot_figures(model, pixels, out_dir, ata_lengths=torch.tensor(result.pop("ata_lengths")))
    (out_dir / "ablation.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out_dir / "ablation.md").write_text(markdown_table(result), encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    config_path, overrides = parse_overrides(argv)
    raw = deep_merge(load_yaml(config_path or REPO_CONFIG), overrides)
    eval_limit = raw.pop("eval_limit", None)
    raw_policy = raw.pop("policy", {})
    if "config" in raw_policy:   # policy: {config: policy/adatok-tiny.yaml, <overrides>}, relative to the demo YAML
        base = load_yaml(Path(config_path or REPO_CONFIG).parent / raw_policy.pop("config"))
        base.pop("tokenizer", None)                        # the demo's own stage-1 model ...
        base.get("train", {}).pop("output_dir", None)      # ... and <output_dir>/policy
        raw_policy = deep_merge(base, raw_policy)
    skip_policy = bool(raw.pop("skip_policy", False))
    cfg = fill_dataclass(TokenizerTrainingConfig, raw)
    out_dir = Path(cfg.train.output_dir)
    summary = train(cfg)
    metrics = evaluate_and_plot(Path(summary["model_dir"]), cfg, out_dir, eval_limit)
    metrics.update(images_per_s=summary["images_per_s"], wall_s=summary["wall_s"], train_steps=summary["steps"],
                   num_parameters=summary["num_parameters"])
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    print("\nAdaTok demo, stage 1 (Fashion-MNIST test split):")
    print(" tokens   rMSE     PSNR    rQPR@0.02")
    for length, row in metrics["per_length"].items():
        print(f" {int(length):6d}   {row['rmse']:.4f}  {row['psnr']:6.2f}  {row['rqpr']:.3f}")
    print(f"quality checks: {metrics['quality_checks']}")
    written = ["model", "reconstructions.png", "rmse_vs_tokens.png", "rqpr_vs_tokens.png", "metrics.json"]
    if not skip_policy:
        ablation = run_policy_stage(raw_policy, cfg, Path(summary["model_dir"]), out_dir, eval_limit)
        metrics["ablation_checks"] = ablation["checks"]
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        print("\nAdaTok demo, stage 2 (Table 2 on the test split):")
        print(markdown_table_text(out_dir))
        written += ["ablation.json", "ablation.md", "lengths_hist.png", "fig3_rmse_vs_tokens.png",
                    "fig5_rqpr_vs_tokens.png", "fig6_reward_landscape.png", "policy/policy_entropy.png"]
        written += ["policy/policy_val_reward.png"] if (out_dir / "policy" / "policy_val_reward.png").is_file() else []
    for name in written:
        print(f"  wrote {out_dir / name}")
    return metrics


def markdown_table_text(out_dir: Path) -> str:
    return (out_dir / "ablation.md").read_text(encoding="utf-8")


if __name__ == "__main__":
    main()
