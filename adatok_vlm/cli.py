"""The `adatok` console command: the user-facing verbs.

    adatok demo [--demo natural|fmnist] [--output_dir outputs/demo] [--train.max_steps N ...]
    adatok train-tokenizer --config configs/tokenizer/adatok-tiny.yaml [overrides]
    adatok train-policy --tokenizer DIR [overrides]
    adatok ablation --model DIR --out FILE.json
    adatok evaluate --model DIR --data SPEC --split test --lengths 1,2,4,auto --metrics rmse,psnr,ssim --out DIR
    adatok extract-tokens --tokenizer DIR --data.dataset fashion_mnist --output_dir DIR [--num_tokens auto]
    adatok train-dit --config configs/dit/dit-tiny.yaml --data.tokens DIR [overrides]
    adatok sample-c2i --dit DIR --tokenizer DIR --classes all --per_class 8 --out DIR
    adatok sample-c2i --generator ar --model VLM_DIR --classes all --per_class 8 --out DIR
    adatok train-vlm --config configs/vlm/tiny.yaml [overrides]
    adatok sample-t2i --model VLM_DIR --prompt "a sneaker" --num_images 8 --out DIR
    adatok export --checkpoint OUTPUT_DIR/checkpoints/step-N --out DIR   (consolidate a ZeRO checkpoint)
    adatok convert-vae --checkpoint vavae-imagenet256-f16d32-dinov2.pt --arch va-vae-f16d32 --out DIR
    adatok latent-stats --model.vae_path DIR --data.dataset /data/imagenet/train --limit 10000
    adatok cache-latents --model.vae_path DIR --data.dataset DIR --output_dir CACHE
    adatok rehearse --output_dir outputs/rehearse --preset adatok-s --steps 3   (every stage, a few steps each)

Each verb forwards its remaining arguments to the module that implements it; `adatok VERB --help`
lists them. Options are spelt with underscores (`--per_class`, `--output_dir`, `--train.lr`); the old
hyphenated spellings work for one more release and print a deprecation line. tests/test_readme.py parses every line above through its verb.
"""

from __future__ import annotations

import importlib
import sys


def _forward(module: str):
    """A verb that hands its arguments to ``adatok_vlm.<module>.main`` (imported only when the verb runs)."""
    def run(argv):
        return importlib.import_module(f".{module}", __package__).main(argv)

    return run


def _option(argv, name, default):
    """The value of ``name`` in ``argv`` (``--name V`` or ``--name=V``), else ``default``."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def _drop_option(argv, name):
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def _sample_c2i(argv):
    """``--generator ar`` samples with an autoregressive VLM; otherwise (``dit``, the default) with a DiT."""
    generator = _option(argv, "--generator", "dit")
    if generator == "ar":
        from .sample_t2i import c2i_main

        return c2i_main(argv)
    if generator != "dit":
        raise SystemExit(f"adatok sample-c2i: --generator must be 'dit' or 'ar', not {generator!r}")
    from .sample_c2i import main

    return main(_drop_option(argv, "--generator"))


def _latent_stats(argv):
    """Per-channel VAE latent statistics (``training.convert_vae.latent_stats_main``)."""
    from .training.convert_vae import latent_stats_main

    return latent_stats_main(argv)


def _ablation(argv):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"
    if not script.is_file():
        raise SystemExit("adatok ablation needs the repository's benchmarks/ablation.py (run from a source checkout)")
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


VERBS = {"demo": _forward("training.demo"), "train-tokenizer": _forward("training.train_tokenizer"),
         "train-policy": _forward("training.train_policy"), "ablation": _ablation,
         "extract-tokens": _forward("training.extract_tokens"), "train-dit": _forward("training.train_dit"),
         "sample-c2i": _sample_c2i, "train-vlm": _forward("training.train_vlm"),
         "sample-t2i": _forward("sample_t2i"), "export": _forward("training.export"),
         "evaluate": _forward("training.evaluate"), "cache-latents": _forward("training.cache_latents"),
         "convert-vae": _forward("training.convert_vae"), "latent-stats": _latent_stats,
         "rehearse": _forward("training.rehearse")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nverbs: " + ", ".join(sorted(VERBS)))
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"adatok: unknown verb {verb!r}; choose one of {sorted(VERBS)}", file=sys.stderr)
        return 2
    VERBS[verb](rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
