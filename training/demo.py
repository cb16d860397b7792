"""`make demo`: train AdaTok on natural colour photos on a CPU, evaluate it, and write pictures.

    python -m adatok_vlm.training.demo --output_dir outputs/demo            # natural photos (`make demo`)
    python -m adatok_vlm.training.demo --demo fmnist --output_dir outputs/demo-fmnist   # `make demo-fmnist`
    python -m adatok_vlm.training.demo --config my_demo.yaml --train.max_steps 500

Both stages run a fixed number of steps (``train.max_steps``, ``policy.train.max_steps``): the same seed
gives the same model on any machine, and the progress bars' totals are true. Wall-time budgets are
refused here for that reason. The natural demo (``configs/tokenizer/adatok-natural.yaml`` and
``configs/policy/adatok-natural.yaml``) trains on :func:`~adatok_vlm.training.natural_images.natural_images_dir`'s
crops, whose test split holds photos never seen in training. Stage 1 trains the tokenizer with Nested Tail
Masking; stage 2 trains the Adaptive Token Allocation policy on the frozen tokenizer. Writes to
``outputs/demo/``: ``model/`` (tokenizer + policy; loads with ``AutoModel.from_pretrained``),
``reconstructions.png`` (test images from 1, 2, 4, ..., m tokens beside the original),
``rmse_vs_tokens.png``, ``rqpr_vs_tokens.png``, ``metrics.json``, and from stage 2
``ablation.json`` / ``ablation.md`` (the paper's Table 2), ``lengths_hist.png`` and the Figure 3/5/6
plots, and on natural photos also ``lengths_ordered.png`` (paper Fig. 1: test images sorted by the
policy's length) and ``length_correlations.json`` (Spearman of the policy's lengths with the oracle's and
with PNG size). ``--skip_policy true`` stops after stage 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from .config import (build_model_config, configs_dir, deep_merge, exit_if_help, fill_dataclass, load_yaml,
                     parse_overrides)
from .data_setup import build_image_processor, load_split
from .evaluation import default_lengths, is_monotone_decreasing, per_image_mse, summarize
from .train_tokenizer import TokenizerTrainingConfig, train

CONFIGS = configs_dir()
# The demos `--demo NAME` selects: (stage-1 YAML, stage-2 YAML or None when the stage-1 file names its
# own `policy:` section, overrides applied before the command line's).
DEMOS = {
    "natural": (CONFIGS / "tokenizer" / "adatok-natural.yaml", "policy/adatok-natural.yaml", {}),
    "fmnist": (CONFIGS / "demo.yaml", None, {}),
}
REPO_CONFIG = DEMOS["natural"][0]
RQPR_THRESHOLD = 0.02
NATURAL_DATASETS = ("natural_images", "natural-images")


def resolve_dataset(data, image_size: int):
    """``data.dataset: natural_images`` -> the cached held-out-photo crop set at the model's size."""
    if data.dataset in NATURAL_DATASETS:
        from .natural_images import natural_images_dir

        data.dataset = str(natural_images_dir(crop_size=image_size))
    return data


def check_step_budget(raw: dict, raw_policy: dict) -> None:
    """Refuse wall-time budgets: a demo must train the same number of steps on every machine."""
    for where, section in (("train", raw.get("train", {})), ("policy.train", raw_policy.get("train", {}))):
        if section.get("time_budget_s") is not None:
            raise ValueError(f"{where}.time_budget_s: the demo is step-budgeted (set {where}.max_steps); "
                             f"expected null, got {section['time_budget_s']!r}")


def evaluate_and_plot(model_dir: Path, cfg: TokenizerTrainingConfig, out_dir: Path, limit: int | None = None) -> dict:
    """Per-length rMSE/PSNR/rQPR on the held-out split, plus the figures."""
    from transformers import AutoModel

    from .batches import preload_images
    from .visualize import metric_curve, reconstruction_grid

    model = AutoModel.from_pretrained(model_dir).eval()
    test = eval_subset(load_split(cfg.data, cfg.data.eval_split, cfg.train.seed), limit, _is_natural(cfg))
    pixels = preload_images(test, build_image_processor(model.config, cfg.data, train=False)).pixels
    lengths = default_lengths(model.config.num_latent_tokens)
    start = time.time()
    mse = per_image_mse(model, pixels, lengths)
    eval_s = time.time() - start
    per_length = summarize(mse, lengths, RQPR_THRESHOLD)
    reconstruction_grid(model, pixels[:10].float() / 255.0, lengths, out_dir / "reconstructions.png", scale=3)
    rmse = [per_length[str(k)]["rmse"] for k in lengths]
    name = "natural test photos" if _is_natural(cfg) else "Fashion-MNIST test"
    metric_curve(lengths, mse, rmse, "rMSE", out_dir / "rmse_vs_tokens.png",
                 f"rMSE vs tokens ({name}; thin: images)", threshold=RQPR_THRESHOLD)
    metric_curve(lengths, None, [per_length[str(k)]["rqpr"] for k in lengths], f"rQPR (rMSE <= {RQPR_THRESHOLD})",
                 out_dir / "rqpr_vs_tokens.png", f"rQPR vs tokens ({name})")
    m = model.config.num_latent_tokens
    full, eighth = per_length[str(m)]["rmse"], per_length[str(max(1, m // 8))]["rmse"]
    checks = {"rmse_monotone": is_monotone_decreasing(rmse)}
    if _is_natural(cfg):   # issue 16's target: a real hierarchy over the whole range of lengths
        checks["rmse_full_le_0.5x_m_over_8"] = full <= 0.5 * eighth
    else:
        checks.update({"rmse_full_le_0.015": full <= 0.015, "rmse_full_le_0.6x_m_over_8": full <= 0.6 * eighth})
    return {"num_latent_tokens": m, "per_length": per_length, "num_test_images": int(pixels.shape[0]),
            "eval_s": eval_s, "quality_checks": checks}


def run_policy_stage(raw_policy: dict, cfg: TokenizerTrainingConfig, model_dir: Path, out_dir: Path,
                     eval_limit: int | None) -> dict:
    """Stage 2 on the demo tokenizer, then Table 2 and the figures on the held-out split."""
    import shutil

    from transformers import AutoModel

    from .ablation import error_curves, markdown_table, plot_figures, run_ablation
    from .batches import preload_images
    from .train_policy import PolicyTrainingConfig
    from .train_policy import train as train_policy

    raw = deep_merge({"tokenizer": str(model_dir), "data": dataclasses.asdict(cfg.data),
                      "train": {"output_dir": str(out_dir / "policy"), "seed": cfg.train.seed}}, raw_policy)
    policy_cfg = fill_dataclass(PolicyTrainingConfig, raw)
    resolve_dataset(policy_cfg.data, build_model_config(cfg.model).image_size)
    summary = train_policy(policy_cfg)
    shutil.rmtree(model_dir)
    shutil.copytree(summary["model_dir"], model_dir)          # outputs/demo/model now carries the policy
    model = AutoModel.from_pretrained(model_dir).eval()
    test = eval_subset(load_split(cfg.data, cfg.data.eval_split, cfg.train.seed), eval_limit or 2000,
                       _is_natural(cfg))
    pixels = preload_images(test, build_image_processor(model.config, cfg.data, train=False)).pixels
    curves = error_curves(model, pixels)   # every length of every image, decoded once for Table 2 and the figures
    result = run_ablation(model, pixels, curves=curves)
    ata_lengths, oracle_lengths = torch.tensor(result.pop("ata_lengths")), torch.tensor(result.pop("oracle_lengths"))
    plot_figures(model, pixels, out_dir, ata_lengths=ata_lengths, curves=curves)
    if _is_natural(cfg):
        result["length_correlations"] = content_figures(pixels, ata_lengths, oracle_lengths, out_dir)
    (out_dir / "ablation.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out_dir / "ablation.md").write_text(markdown_table(result), encoding="utf-8")
    return result


def _is_natural(cfg: TokenizerTrainingConfig) -> bool:
    return "natural" in Path(cfg.data.dataset).name


def eval_subset(test, limit: int | None, shuffle: bool):
    """The first ``limit`` test images; natural crops are stored photo by photo, so they are shuffled
    (fixed seed 0) first, making a limited subset cover every held-out photo and scale."""
    if shuffle:
        test = test.shuffle(seed=0)
    return test if not limit else test.select(range(min(limit, len(test))))


@torch.no_grad()
def content_figures(pixels: torch.Tensor, ata_lengths: torch.Tensor, oracle_lengths: torch.Tensor, out_dir: Path,
                    num_shown: int = 32) -> dict:
    """Fig. 1 (test images ordered by the policy's length) and the correlations of the policy's lengths with
    the oracle's (Table 2's ``oracle`` row, per image) and with PNG size."""
    from .visualize import length_correlations, length_ordered_grid

    images = pixels.float() / 255.0
    correlations = length_correlations(ata_lengths, oracle_lengths, images)
    shown = torch.linspace(0, images.shape[0] - 1, min(num_shown, images.shape[0])).round().long()
    length_ordered_grid(images[shown], ata_lengths[shown], out_dir / "lengths_ordered.png", columns=8, scale=3)
    (out_dir / "length_correlations.json").write_text(json.dumps(correlations, indent=2), encoding="utf-8")
    return correlations


def _select_demo(argv: list[str]) -> tuple[list[str], str | None, dict]:
    """Pop ``--demo NAME``; return the remaining argv, the stage-2 YAML and the demo's own overrides."""
    name = "natural"
    for i, arg in enumerate(argv):
        if arg == "--demo" or arg.startswith("--demo="):
            name = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            argv = argv[:i] + argv[i + (1 if "=" in arg else 2):]
            break
    if name not in DEMOS:
        raise ValueError(f"--demo: expected one of {sorted(DEMOS)}, got {name!r}")
    path, policy_yaml, preset = DEMOS[name]
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(path), *argv]
    return argv, policy_yaml, preset


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    exit_if_help(argv, __doc__ + "\n--demo natural|fmnist picks the demo (default natural); the stage-1 "
                 "fields follow (the stage-2 ones are train-policy's: adatok train-policy --help).",
                 TokenizerTrainingConfig)
    started, load_before = time.time(), os.getloadavg()
    argv, policy_yaml, preset = _select_demo(argv)
    config_path, overrides = parse_overrides(argv)
    raw = deep_merge(deep_merge(load_yaml(config_path), preset), overrides)
    eval_limit = raw.pop("eval_limit", None)
    raw_policy = raw.pop("policy", {})
    if policy_yaml and "config" not in raw_policy:
        raw_policy = {"config": policy_yaml, **raw_policy}
    if "config" in raw_policy:   # policy: {config: policy/adatok-tiny.yaml, <overrides>}, relative to the demo YAML
        base = load_yaml(CONFIGS / raw_policy.pop("config") if policy_yaml else
                         Path(config_path).parent / raw_policy.pop("config"))
        base.pop("tokenizer", None)                        # the demo's own stage-1 model ...
        base.get("train", {}).pop("output_dir", None)      # ... and <output_dir>/policy
        raw_policy = deep_merge(base, raw_policy)
    skip_policy = bool(raw.pop("skip_policy", False))
    check_step_budget(raw, raw_policy)
    cfg = fill_dataclass(TokenizerTrainingConfig, raw)
    resolve_dataset(cfg.data, build_model_config(cfg.model).image_size)
    out_dir = Path(cfg.train.output_dir)
    summary = train(cfg)
    metrics = evaluate_and_plot(Path(summary["model_dir"]), cfg, out_dir, eval_limit)
    metrics.update(images_per_s=summary["images_per_s"], wall_s=summary["wall_s"], train_steps=summary["steps"],
                   num_parameters=summary["num_parameters"])
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    print(f"\nAdaTok demo, stage 1 ({'natural photos' if _is_natural(cfg) else 'Fashion-MNIST'}, test split):")
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
        if "length_correlations" in ablation:
            metrics["length_correlations"] = ablation["length_correlations"]
            (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
            print(f"length correlations: {ablation['length_correlations']}")
            written += ["lengths_ordered.png", "length_correlations.json"]
    # The whole demo as it ran here (both stages, evaluation and figures), with the machine's load around it.
    metrics["demo"] = {"wall_s": time.time() - started, "load_average_before": list(load_before),
                       "load_average_after": list(os.getloadavg()), "cpu_count": os.cpu_count(),
                       "torch_threads": torch.get_num_threads()}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    print(f"the demo took {metrics['demo']['wall_s'] / 60:.1f} minutes (load average "
          f"{load_before[0]:.1f} before, {metrics['demo']['load_average_after'][0]:.1f} after)")
    for name in written:
        print(f"  wrote {out_dir / name}")
    return metrics


def markdown_table_text(out_dir: Path) -> str:
    return (out_dir / "ablation.md").read_text(encoding="utf-8")


if __name__ == "__main__":
    main()
