"""Train Table 2's first row: the natural demo's tokenizer without Nested Tail Masking, step-matched.

    python benchmarks/train_fixed_baseline.py --output_dir outputs/demo-fixed          # 2,400 steps
    python benchmarks/ablation.py --model outputs/demo/model --baseline_model outputs/demo-fixed/model \
        --data natural_images --out benchmarks/results/natural_demo_ablation.json

The paper's baseline (Sec. 5.2, Table 2, "Baseline": 256 tokens, no NTM) is a fixed-length tokenizer
trained for the same steps. ``configs/tokenizer/adatok-natural-fixed.yaml`` is
``configs/tokenizer/adatok-natural.yaml`` with ``ntm_min_tokens = m``: every training sample keeps all m
tokens. Before training, this script checks that the two resolved configs differ in nothing but the NTM
range and the output folder (same data, crops, seed, steps, batch, learning rate and schedule), then runs
the demo's stage 1 on it (``python -m adatok_vlm.training.demo --skip_policy true``), which also writes its
per-length rMSE table (``metrics.json``) on the same held-out photos. Extra arguments go to the demo
(``--train.resume auto`` continues an interrupted run). The NTM model's stage 1 (the demo's) took 869 s on
the 2 idle cores here (benchmarks/results/natural_demo_metrics.json); under load a step took 1.5-2.1 s.
"""

import subprocess
import sys

from adatok_vlm.training.config import configs_dir, load_yaml
from adatok_vlm.training.flags import FlagParser

NTM_FIELDS = ("ntm_min_tokens", "ntm_max_tokens", "ntm_full_prob", "ntm_distribution")


def differences(ntm: dict, fixed: dict) -> list[str]:
    """Dotted keys where two resolved stage-1 configs differ, leaving out the NTM range and the output folder."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(ntm), flat(fixed)
    ignored = {f"model.{f}" for f in NTM_FIELDS} | {"train.output_dir"}
    return sorted(k for k in set(a) | set(b) if k not in ignored and a.get(k) != b.get(k))


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="where the run goes; the tokenizer lands in DIR/model")
    parser.add_argument("--config", default=str(configs_dir() / "tokenizer" / "adatok-natural-fixed.yaml"),
                        help="the fixed-length stage-1 config")
    parser.add_argument("--ntm_config", default=str(configs_dir() / "tokenizer" / "adatok-natural.yaml"),
                        help="the NTM model's stage-1 config it must match step for step")
    args, rest = parser.parse_known_args(argv)
    fixed, ntm = load_yaml(args.config), load_yaml(args.ntm_config)
    diff = differences(ntm, fixed)
    if diff:
        raise ValueError(f"--config: {args.config} must be {args.ntm_config} with only the NTM range changed, "
                         f"but it also differs in {diff}")
    from adatok_vlm.training.config import build_model_config

    m = build_model_config(fixed["model"]).num_latent_tokens
    if build_model_config(fixed["model"]).ntm_min_tokens != m:
        raise ValueError(f"--config: {args.config} must set model.ntm_min_tokens to m = {m} (no NTM), got "
                         f"{build_model_config(fixed['model']).ntm_min_tokens}")
    command = [sys.executable, "-m", "adatok_vlm.training.demo", "--config", args.config, "--skip_policy", "true",
               "--output_dir", args.output_dir, *rest]
    print(" ".join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
