"""Class-conditional generation demo: a tiny DiT over AdaTok tokens of Fashion-MNIST, on a CPU.

    python -m adatok_vlm.training.demo --demo fmnist --output_dir outputs/demo-fmnist   # first: tokenizer + policy
    python -m adatok_vlm.training.demo_dit --tokenizer outputs/demo-fmnist/model --output_dir outputs/demo_dit

Three steps, each an entry point of its own:

1. ``extract_tokens``: encode Fashion-MNIST train once with the tokenizer's policy choosing each
   image's length (``num_tokens: auto``) -> ``<output_dir>/tokens``;
2. ``train_dit`` with ``configs/dit/dit-tiny.yaml`` (its wall-time budget, a few minutes)
   -> ``<output_dir>/model`` (the EMA DiT) and ``<output_dir>/samples/step-*.png``;
3. ``sample_c2i``: 8 samples of every class -> ``<output_dir>/samples.png`` (rows = the 10 classes,
   named), ``<output_dir>/lengths_hist.png`` (generated token counts against the training ones) and,
   under ``<output_dir>/c2i/``, the PNGs, the ADM ``.npz`` and ``summary.json``.

Overrides: any ``train_dit`` field (``--train.time_budget_s 120``, ``--model.depth 4``), the
extraction under ``extract`` / ``images`` / ``num_tokens`` (``--images.limit 20000``,
``--num_tokens 16``) and the final sampling under ``final`` (``--final.cfg_scale 3``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .config import configs_dir, deep_merge, exit_if_help, fill_dataclass, load_yaml, parse_overrides

REPO_CONFIG = configs_dir() / "dit" / "dit-tiny.yaml"
DEMO_DEFAULTS = {
    "tokenizer": "outputs/demo-fmnist/model",
    "train": {"output_dir": "outputs/demo_dit"},
    "num_tokens": "auto",
    "images": {"dataset": "fashion_mnist", "train_split": "train", "resize_mode": "pad", "preload": True},
    "extract": {},
    "final": {"per_class": 8, "cfg_scale": 4.0, "num_steps": 50, "seed": 0},
}


def main(argv: list[str] | None = None) -> dict:
    from ..sample_c2i import build_parser, sample
    from .extract_tokens import TokenExtractionConfig, extract
    from .train_dit import DiTTrainingConfig, train

    exit_if_help(sys.argv[1:] if argv is None else list(argv), __doc__, DiTTrainingConfig)
    argv = sys.argv[1:] if argv is None else list(argv)
    config_path, overrides = parse_overrides(argv)
    raw = deep_merge(deep_merge(load_yaml(config_path or REPO_CONFIG), DEMO_DEFAULTS), overrides)
    tokenizer = Path(raw["tokenizer"])
    if not (tokenizer / "config.json").is_file():
        raise FileNotFoundError(f"--tokenizer: no trained AdaTok in {tokenizer}; train the demo tokenizer and its "
                                "length policy first: make demo-fmnist (outputs/demo-fmnist/model)")
    out_dir = Path(raw["train"]["output_dir"])
    tokens_dir = out_dir / "tokens"
    final = raw.pop("final")

    # 1. the token cache (resumable; a finished one is reused)
    extraction = fill_dataclass(TokenExtractionConfig, {
        "tokenizer": str(tokenizer), "num_tokens": raw.pop("num_tokens"), "data": raw.pop("images"),
        "extract": deep_merge({"output_dir": str(tokens_dir), "num_threads": raw["train"].get("num_threads")},
                              raw.pop("extract"))})
    extract(extraction)

    # 2. the DiT
    raw = deep_merge(raw, {"data": {"tokens": str(tokens_dir)}})
    summary = train(fill_dataclass(DiTTrainingConfig, raw))

    # 3. samples of every class, with names, and the length histogram
    c2i_dir = out_dir / "c2i"
    args = build_parser().parse_args([
        "--dit", summary["model_dir"], "--tokenizer", str(tokenizer), "--classes", "all",
        "--per-class", str(final["per_class"]), "--cfg-scale", str(final["cfg_scale"]),
        "--num-steps", str(final["num_steps"]), "--seed", str(final["seed"]), "--out", str(c2i_dir)])
    sampled = sample(args)
    shutil.copyfile(c2i_dir / "grid.png", out_dir / "samples.png")
    shutil.copyfile(c2i_dir / "lengths_hist.png", out_dir / "lengths_hist.png")

    meta = json.loads((tokens_dir / "tokens.json").read_text(encoding="utf-8"))
    data_hist = meta["length_histograms"]
    print(f"\nAdaTok DiT demo ({summary['steps']} steps in {summary['wall_s']:.0f}s, "
          f"{summary['num_parameters'] / 1e6:.2f}M parameters):")
    print(" class              tokens (data)  tokens (generated)")
    for c, row in sampled["by_class"].items():
        counts = data_hist[int(c)]
        data_mean = sum((i + 1) * n for i, n in enumerate(counts)) / max(sum(counts), 1)
        print(f" {c}: {str(row['name'])[:14]:14s}  {data_mean:12.2f}  {row['mean_length']:18.2f}")
    result = {"train": summary, "sample": sampled, "samples_png": str(out_dir / "samples.png"),
              "lengths_hist_png": str(out_dir / "lengths_hist.png")}
    (out_dir / "demo_dit.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    for name in ("samples.png", "lengths_hist.png", "model", "tokens", "c2i", "demo_dit.json"):
        print(f"  wrote {out_dir / name}")
    return result


if __name__ == "__main__":
    main()
