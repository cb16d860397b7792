"""Class-conditional generation demo: a tiny DiT over AdaTok tokens of Fashion-MNIST, on a CPU.

    python -m adatok_vlm.training.demo --demo fmnist --output_dir outputs/demo-fmnist   # first: tokenizer + policy
    python -m adatok_vlm.training.demo_dit --tokenizer outputs/demo-fmnist/model --output_dir outputs/demo_dit

Three steps, each an entry point of its own:

1. ``extract_tokens``: encode Fashion-MNIST train once with the tokenizer's policy choosing each
   image's length (``num_tokens: auto``) -> ``<output_dir>/tokens``;
2. ``train_dit`` with ``configs/dit/dit-tiny.yaml`` (a fixed number of steps, a few minutes on a CPU)
   -> ``<output_dir>/model`` (the EMA DiT) and ``<output_dir>/samples/step-*.png``;
3. ``sample_c2i``: 8 samples of every class -> ``<output_dir>/samples.png`` (rows = the 10 classes,
   named), ``<output_dir>/lengths_hist.png`` (generated token counts against the training ones) and,
   under ``<output_dir>/c2i/``, the PNGs, the ADM ``.npz`` and ``summary.json``.

The demo's settings are one config file, ``configs/dit/demo-fmnist.yaml`` (``base: dit-tiny.yaml`` plus the
demo's own sections); ``--config FILE`` is merged over it. Overrides: any ``train_dit`` field
(``--max_steps 2000``, ``--model.depth 4``), the extraction under ``extract`` / ``images`` / ``num_tokens``
(``--images.limit 20000``, ``--num_tokens 16``) and the final sampling under ``final``, whose fields are
``sample-c2i``'s options (``--final.cfg_scale 3``, ``--final.per_class 4``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .config import configs_dir, deep_merge, exit_if_help, fill_dataclass, load_yaml, parse_overrides

REPO_CONFIG = configs_dir() / "dit" / "demo-fmnist.yaml"


def _demo_sections_help(sampler_parser) -> str:
    """The demo's own options (its sections beyond train_dit's), listed for ``--help``."""
    import dataclasses

    from .extract_tokens import TokenExtractionConfig

    ext = TokenExtractionConfig()
    images = ", ".join(f"--images.{f.name}" for f in dataclasses.fields(ext.data))
    extract = ", ".join(f"--extract.{f.name}" for f in dataclasses.fields(ext.extract))
    final = ", ".join(f"--final.{a.dest}" for a in sampler_parser._actions
                      if a.option_strings and a.dest not in ("help", "generator", "dit", "tokenizer", "out"))
    return (f"\nThe demo's sections (defaults in {REPO_CONFIG.name} and the dataclasses):\n  --num_tokens\n  {images}\n"
            f"  {extract}\n  {final}\n")


def main(argv: list[str] | None = None) -> dict:
    from ..sample_c2i import build_parser, sample
    from .extract_tokens import TokenExtractionConfig, extract
    from .train_dit import DiTTrainingConfig, train

    exit_if_help(sys.argv[1:] if argv is None else list(argv), __doc__ + _demo_sections_help(build_parser()),
                 DiTTrainingConfig)
    argv = sys.argv[1:] if argv is None else list(argv)
    config_path, overrides = parse_overrides(argv)
    raw = load_yaml(REPO_CONFIG)
    if config_path:
        raw = deep_merge(raw, load_yaml(config_path))
    raw = deep_merge(raw, overrides)
    tokenizer = Path(raw["tokenizer"])
    if not (tokenizer / "config.json").is_file():
        raise FileNotFoundError(f"--tokenizer: no trained AdaTok in {tokenizer}; train the demo tokenizer and its "
                                "length policy first: make demo-fmnist (outputs/demo-fmnist/model)")
    out_dir = Path(raw["train"]["output_dir"])
    tokens_dir = out_dir / "tokens"
    final = raw.pop("final", {})
    # the sampler's options as a namespace first, so a misspelt --final.field fails before any work
    parser = build_parser()
    args = parser.parse_args(["--dit", "(set below)", "--tokenizer", str(tokenizer), "--classes", "all",
                              "--out", str(out_dir / "c2i")])
    settable = {a.dest: a for a in parser._actions if a.dest not in ("help", "generator", "dit", "tokenizer", "out")}
    for key, value in final.items():
        if key not in settable:
            raise ValueError(f"final.{key}: not a sample-c2i option the demo lets you set; expected one of "
                             f"{sorted(settable)}")
        action = settable[key]
        if value is not None and action.type is not None:
            value = action.type(value)
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"final.{key}: expected one of {list(action.choices)}, got {value!r}")
        setattr(args, key, value)

    # 1. the token cache (resumable; a finished one is reused)
    extraction = {"tokenizer": str(tokenizer), "data": raw.pop("images", {}),
                  "extract": deep_merge({"output_dir": str(tokens_dir), "num_threads": raw["train"].get("num_threads")},
                                        raw.pop("extract", {}))}
    if "num_tokens" in raw:
        extraction["num_tokens"] = raw.pop("num_tokens")
    extract(fill_dataclass(TokenExtractionConfig, extraction))
    # 2. the DiT
    raw = deep_merge(raw, {"data": {"tokens": str(tokens_dir)}})
    summary = train(fill_dataclass(DiTTrainingConfig, raw))

    # 3. samples of every class, with names, and the length histogram
    c2i_dir = out_dir / "c2i"
    args.dit = summary["model_dir"]
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
