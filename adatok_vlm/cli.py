"""The `adatok` console command: the user-facing verbs.

    adatok demo [--output_dir outputs/demo] [--train.time_budget_s 600 ...]
    adatok train-tokenizer --config configs/tokenizer/adatok-tiny.yaml [overrides]
    adatok train-policy --tokenizer DIR [overrides]
    adatok ablation --model DIR --out FILE.json
    adatok evaluate --model DIR --data SPEC --split test --lengths 1,2,4,auto --metrics rmse,psnr,ssim --out DIR
    adatok sample-c2i --dit DIR --tokenizer DIR --classes all --per-class 8 --out DIR

Each verb forwards its remaining arguments to the module that implements it.
"""

from __future__ import annotations

import sys


def _demo(argv):
    from .training.demo import main

    return main(argv)


def _train_tokenizer(argv):
    from .training.train_tokenizer import main

    return main(argv)


def _train_policy(argv):
    from .training.train_policy import main

    return main(argv)


def _sample_c2i(argv):
    from .generator.sample_c2i import main

    return main(argv)


def _evaluate(argv):
    from .training.evaluate import main

    return main(argv)


def _ablation(argv):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"
    if not script.is_file():
        raise SystemExit("adatok ablation needs the repository's benchmarks/ablation.py (run from a source checkout)")
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


VERBS = {"demo": _demo, "train-tokenizer": _train_tokenizer, "train-policy": _train_policy, "ablation": _ablation,
         "sample-c2i": _sample_c2i, "evaluate": _evaluate}


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
