"""Eq. 8 as written, taken apart: which ingredient makes the paper's REINFORCE collapse (issue #17 item 1).

    .venv/bin/python benchmarks/eq8_ablation.py --model /work/exp/demo-natural/policy/model \\
        --table_dir /work/exp/demo-natural/policy/reward_table --out benchmarks/results/eq8_ablation.json

Trains the ATA policy on a stage-2 reward table (``train.reward_table``: every training image's loss at
every length, measured once by ``train_policy``) with eq. 8 + eq. 9, one row per setting: the reading of
"R(L_mean) computed on a batch basis" (``rewards.BASELINE_READINGS``), mu, the reward's scale and
shift, the entropy schedule, learning rate, batch size and steps; plus the exact-objective policy
(``train.objective expected``, the current default) as the reference row. Every run is seeded and
budgeted by steps; each uses the trainer's own step functions (``reward_table.table_policy_loss``) and learning-rate schedule.

Each policy is scored on the held-out photos (the demo's Table 2 images: ``--test_limit`` crops of the
test split, shuffled with seed 0) by its most probable length (``num_tokens="auto"``): length
distribution (mean, std, distinct lengths, the most common length's share), both rewards. The test
images' losses at every length are measured once (``reward_table.measure_reward_table``, a few minutes
here) and cached (``--test_cache``). Writes FILE.json and FILE.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

import adatok_vlm  # noqa: F401  (registers AdaTok with AutoModel)
from adatok_vlm.tokenizer.policy import TokenLengthPolicy
from adatok_vlm.tokenizer.rewards import RewardSpec, entropy_weight
from adatok_vlm.training.engine import lr_at, set_lr
from adatok_vlm.training.flags import FlagParser
from adatok_vlm.training.results import write_results
from adatok_vlm.training.reward_table import RewardTable, head_outputs, table_policy_loss, table_rewards

COLLAPSE_SHARE = 0.9   # a policy whose most common length takes >= 90% of the held-out images has collapsed


@dataclass(frozen=True)
class Setting:
    """One stage-2 run on the table; the defaults are configs/policy/adatok-natural.yaml's recipe with
    eq. 8 as written (``objective reinforce``, ``advantage relative``, mu = 0.1, per-image baseline)."""

    name: str
    reward: str = "structured"        # the reward trained on (eq. 7 / eq. 6)
    objective: str = "reinforce"      # reinforce (eq. 8/9) | expected (exact gradient)
    advantage: str = "relative"       # relative (eq. 8) | baseline (A = R - R(L_mean))
    mu: float = 0.1
    reading: str = "image"            # rewards.BASELINE_READINGS
    reward_scale: float = 1.0         # R -> scale * R + shift before the advantage (not in the paper)
    reward_shift: float = 0.0
    lr: float = 2e-3
    batch_size: int = 256
    steps: int = 1500
    entropy_start: float = 0.05
    entropy_schedule: str = "linear"
    warmup_steps: int = 20            # train_policy's defaults
    min_lr_ratio: float = 0.1
    weight_decay: float = 4e-5
    grad_clip: float = 1.0
    dropout: float = 0.2

    def describe(self) -> str:
        if self.objective == "expected":
            return "exact expected reward (reference)"
        adv = (f"eq. 8, mu={self.mu:g}" if self.advantage == "relative" else "A = R - R(L_mean)")
        return f"{adv}, R(L_mean) per {self.reading}"


def grid_settings(steps: int) -> list[Setting]:
    """The ablation grid: eq. 8 as written, then one ingredient changed at a time."""
    s = Setting("eq8_as_written", steps=steps)
    return [
        replace(s, name="reference_expected", objective="expected"),
        s,
        replace(s, name="reading_batch_length", reading="batch_length"),
        replace(s, name="reading_batch_reward", reading="batch_reward"),
        replace(s, name="mu_1", mu=1.0),
        replace(s, name="mu_10", mu=10.0),
        replace(s, name="mu_100", mu=100.0),
        replace(s, name="mu_10_entropy_x11", mu=10.0, entropy_start=0.55),
        replace(s, name="mu_100_entropy_x101", mu=100.0, entropy_start=5.05),
        replace(s, name="mu_10_entropy_x11_steps_x4", mu=10.0, entropy_start=0.55, steps=4 * steps),
        replace(s, name="plain_baseline", advantage="baseline"),
        replace(s, name="reward_shift_centred", reward_shift=-1.5),
        replace(s, name="reward_scale_0.1", reward_scale=0.1),
        replace(s, name="reward_scale_10", reward_scale=10.0),
        replace(s, name="lr_2e-4", lr=2e-4),
        replace(s, name="batch_1024", batch_size=1024),
        replace(s, name="entropy_0.5", entropy_start=0.5),
        replace(s, name="entropy_constant", entropy_schedule="constant"),
        replace(s, name="steps_x4", steps=4 * steps),
        replace(s, name="continuous_reference", reward="continuous", objective="expected"),
        replace(s, name="continuous_eq8", reward="continuous"),
        replace(s, name="continuous_mu_10", reward="continuous", mu=10.0),
        replace(s, name="continuous_baseline", reward="continuous", advantage="baseline"),
        replace(s, name="continuous_mu_10_entropy_x11", reward="continuous", mu=10.0, entropy_start=0.55),
    ]


def reward_specs(config) -> dict[str, RewardSpec]:
    """Both rewards with the model's hyper-parameters (eq. 6, eq. 7)."""
    return {kind: RewardSpec(kind=kind, alpha=config.reward_alpha, beta=config.reward_beta,
                             gamma=config.reward_gamma, rl_base=config.reward_rl_base)
            for kind in ("structured", "continuous")}


def train_setting(setting: Setting, features: torch.Tensor, rewards: torch.Tensor, grid: torch.Tensor,
                  hidden: int, layers: int, seed: int) -> tuple[TokenLengthPolicy, list[dict]]:
    """A fresh policy trained on table rows ``features [N, F]``, ``rewards [N, K]`` (that setting's reward);
    returns it (in eval mode) and its history (entropy, sampled-length spread) every 10% of the steps."""
    torch.manual_seed(seed)
    policy = TokenLengthPolicy(features.shape[1], grid, hidden, layers, setting.dropout)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=setting.lr, weight_decay=setting.weight_decay)
    batches = torch.Generator().manual_seed(seed)
    rewards = setting.reward_scale * rewards + setting.reward_shift
    history, order, at = [], torch.empty(0, dtype=torch.long), 0
    for step in range(setting.steps):
        if at + setting.batch_size > order.numel():
            order, at = torch.randperm(features.shape[0], generator=batches), 0
        rows = order[at:at + setting.batch_size]
        at += setting.batch_size
        lam = entropy_weight(step, setting.steps, setting.entropy_start, 0.0, setting.entropy_schedule)
        set_lr(optimizer, lr_at(step / setting.steps, step, setting.lr, setting.warmup_steps, "cosine",
                                setting.min_lr_ratio))
        loss, _, drawn = table_policy_loss(policy, features[rows], rewards[rows], setting.objective, setting.mu,
                                           setting.advantage, lam, setting.reading)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if setting.grad_clip:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), setting.grad_clip)
        optimizer.step()
        if (step + 1) % max(1, setting.steps // 10) == 0:
            history.append({"step": step + 1, "entropy": float(drawn["entropy"].detach().mean()),
                            "length_mean": float(drawn["lengths"].float().mean()),
                            "length_std": float(drawn["lengths"].float().std())})
    return policy.eval(), history


@torch.no_grad()
def score(policy: TokenLengthPolicy, table: RewardTable, rewards: dict[str, torch.Tensor]) -> dict:
    """The policy's most probable length per held-out image, its distribution and both rewards."""
    choice = head_outputs(policy, table.features).argmax(-1)
    lengths = policy.grid.cpu()[choice].float()
    rows = torch.arange(len(table))
    counts = torch.bincount(choice, minlength=policy.num_lengths)
    top_share = float(counts.max()) / len(table)
    return {"length_mean": float(lengths.mean()), "length_std": float(lengths.std()),
            "distinct_lengths": int((counts > 0).sum()), "top_length": int(policy.grid[counts.argmax()]),
            "top_share": top_share, "collapsed": top_share >= COLLAPSE_SHARE,
            **{f"reward_{kind}": float(r[rows, choice].mean()) for kind, r in rewards.items()}}


def baselines(table: RewardTable, rewards: dict[str, torch.Tensor], grid: torch.Tensor, threshold: float) -> dict:
    """The held-out images' best fixed length, binary search (at ``threshold``) and oracle, per reward."""
    from adatok_vlm.tokenizer.policy import first_at_or_below

    rows = torch.arange(len(table))
    search = first_at_or_below(table.rl, threshold)
    out = {"search_length_mean": float(grid.cpu()[search].float().mean())}
    for kind, r in rewards.items():
        out[kind] = {"best_fixed": float(r.mean(0).max()), "best_fixed_length": int(grid[r.mean(0).argmax()]),
                     "search": float(r[rows, search].mean()), "oracle": float(r.max(1).values.mean())}
    return out


def test_table(model, cache: Path, limit: int) -> RewardTable:
    """The held-out photos' features and losses at every grid length (the demo's Table 2 images)."""
    from adatok_vlm.tokenizer.loading import model_fingerprint
    from adatok_vlm.training.batches import preload_images
    from adatok_vlm.training.config import configs_dir, fill_dataclass, load_yaml
    from adatok_vlm.training.demo import eval_subset, resolve_dataset
    from adatok_vlm.training.reward_table import measure_reward_table
    from adatok_vlm.training.config import build_model_config
    from adatok_vlm.training.data_setup import build_image_processor, load_split
    from adatok_vlm.training.train_tokenizer import TokenizerTrainingConfig

    meta = {"model": model_fingerprint(model.name_or_path), "limit": limit, "grid": model.length_grid.tolist()}
    cached = RewardTable.load(cache, meta)
    if cached is not None:
        return cached
    cfg = fill_dataclass(TokenizerTrainingConfig, load_yaml(configs_dir() / "tokenizer" / "adatok-natural.yaml"))
    resolve_dataset(cfg.data, build_model_config(cfg.model).image_size)
    test = eval_subset(load_split(cfg.data, cfg.data.eval_split, cfg.train.seed), limit, True)
    pixels = preload_images(test, build_image_processor(model.config, cfg.data, train=False)).pixels
    batches = (pixels[s:s + 256].float() / 255.0 for s in range(0, pixels.shape[0], 256))
    table = measure_reward_table(model, batches, model.length_grid)
    table.save(cache, meta)
    return table


def markdown(result: dict) -> str:
    b = result["held_out_baselines"]
    lines = [f"# Eq. 8 ablation: {result['num_train']} table images, scored on {result['num_test']} held-out photos",
             "", "FINDING", "",
             "| setting | what ran | trained on | steps | batch | lr | entropy | mean L | std L | distinct L | "
             "top L (share) | collapsed | R structured | R continuous |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
    for r in result["rows"]:
        s = r["setting"]
        lines.append(
            f"| {s['name']} | {r['what_ran']} | {s['reward']}"
            + (f" (x{s['reward_scale']:g}{s['reward_shift']:+g})" if s["reward_scale"] != 1 or s["reward_shift"] else "")
            + f" | {s['steps']} | {s['batch_size']} | {s['lr']:g} | {s['entropy_start']:g} {s['entropy_schedule']} | "
            f"{r['length_mean']:.2f} | {r['length_std']:.2f} | {r['distinct_lengths']} | {r['top_length']} "
            f"({r['top_share']:.2f}) | {'yes' if r['collapsed'] else 'no'} | {r['reward_structured']:.4f} | "
            f"{r['reward_continuous']:.4f} |")
    lines += ["", "Held-out baselines on the same images (structured / continuous): best fixed length "
              f"{b['structured']['best_fixed']:.4f} (L={b['structured']['best_fixed_length']}) / "
              f"{b['continuous']['best_fixed']:.4f} (L={b['continuous']['best_fixed_length']}); binary search at "
              f"{result['search_threshold']:g} {b['structured']['search']:.4f} / {b['continuous']['search']:.4f} "
              f"({b['search_length_mean']:.2f} tokens); oracle {b['structured']['oracle']:.4f} / "
              f"{b['continuous']['oracle']:.4f}.",
              "", f"A policy counts as collapsed when one length takes >= {COLLAPSE_SHARE:.0%} of the held-out images. "
              f"Seed {result['seed']}; written by " + " then ".join(f"`{c}`" for c in result["commands"])
              + f" ({result['wall_s']:.0f} s in all, {result['machine']})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import os

    from transformers import AutoModel

    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a stage-2 model folder (its config gives rewards and policy size)")
    parser.add_argument("--table_dir", default=None, help="its train_policy reward_table folder (train.safetensors)")
    parser.add_argument("--out", required=True, help="JSON file to write; the markdown goes beside it")
    parser.add_argument("--test_limit", type=int, default=2000)
    parser.add_argument("--test_cache", default=None,
                        help="cache of the held-out table (default: eq8_test_table.safetensors in the project's cache)")
    parser.add_argument("--steps", type=int, default=1500, help="steps of every setting (steps_x4: 4x)")
    parser.add_argument("--only", default=None, help="comma-separated setting names (default: the whole grid)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finding", default="", help="the finding, written at the top of the markdown")
    parser.add_argument("--append", action="store_true",
                        help="keep --out's rows of the settings not run now (same table, seed and steps)")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="only merge these result files (runs of disjoint --only lists) into --out")
    args = parser.parse_args(argv)
    if args.merge:
        result = merge_results([json.loads(Path(f).read_text(encoding="utf-8")) for f in args.merge], args.steps)
        result["commands"].append(_command(argv))
        write(result, Path(args.out), args.finding)
        return result
    if not args.model or not args.table_dir:
        parser.error("--model and --table_dir are required (unless --merge)")
    torch.set_num_threads(1)
    started = time.time()
    model = AutoModel.from_pretrained(args.model).eval()
    out = Path(args.out)
    train = load_file(str(Path(args.table_dir) / "train.safetensors"))
    table = RewardTable(train["features"], train["rl"], train.get("rows"))
    from adatok_vlm.training.data_common import default_cache_dir

    held_out = test_table(model, Path(args.test_cache or Path(default_cache_dir()) / "eq8_test_table.safetensors"),
                          args.test_limit)
    grid, m, specs = model.length_grid, model.num_latent_tokens, reward_specs(model.config)
    train_rewards = {k: table_rewards(spec, table, grid, m) for k, spec in specs.items()}
    test_rewards = {k: table_rewards(spec, held_out, grid, m) for k, spec in specs.items()}
    settings = grid_settings(args.steps)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {s.name for s in settings})
        if unknown:
            raise ValueError(f"--only: unknown setting(s) {unknown}; known: {[s.name for s in settings]}")
        settings = [s for s in settings if s.name in wanted]
    c = model.config
    previous = _previous_rows(out, args, len(table), len(held_out)) if args.append else {"rows": [], "commands": [],
                                                                                             "wall_s": 0.0}
    command = _command(argv)
    base = {"num_train": len(table), "num_test": len(held_out), "seed": args.seed,
            "search_threshold": c.search_threshold,
            "held_out_baselines": baselines(held_out, test_rewards, grid, c.search_threshold)}
    rows = []
    for setting in settings:
        t0 = time.time()
        policy, history = train_setting(setting, table.features, train_rewards[setting.reward], grid,
                                        c.policy_hidden_size, c.policy_num_layers, args.seed)
        row = {"setting": asdict(setting), "what_ran": setting.describe(), **score(policy, held_out, test_rewards),
               "history": history, "train_s": time.time() - t0}
        rows.append(row)
        print(f"{setting.name:24s} mean {row['length_mean']:.2f} std {row['length_std']:.2f} distinct "
              f"{row['distinct_lengths']:2d} top {row['top_length']} ({row['top_share']:.2f}) "
              f"S {row['reward_structured']:.4f} C {row['reward_continuous']:.4f} [{row['train_s']:.0f} s]", flush=True)
        result = merge_results([previous, dict(base, rows=rows, commands=[command], wall_s=time.time() - started,
                                               machine=f"{os.cpu_count()} CPUs, 1 thread, load "
                                                       f"{os.getloadavg()[0]:.1f}")], args.steps)
        write(result, out, args.finding)   # after every setting: an interrupted grid keeps its rows
    return result


def _command(argv: list[str] | None) -> str:
    """This run's command line, for the results file (the --finding text is the markdown's own first line)."""
    import sys

    words = list(sys.argv[1:] if argv is None else argv)
    if "--finding" in words:
        at = words.index("--finding")
        words[at:at + 2] = ["--finding", "TEXT"]
    return "benchmarks/eq8_ablation.py " + " ".join(words)


def _previous_rows(out: Path, args, num_train: int, num_test: int) -> dict:
    if not out.is_file():
        return {"rows": [], "commands": [], "wall_s": 0.0}
    previous = json.loads(out.read_text(encoding="utf-8"))
    if (previous["num_train"], previous["num_test"], previous["seed"]) != (num_train, num_test, args.seed):
        raise ValueError(f"--append: {out} was measured on other tables or another seed")
    return previous


def merge_results(parts: list[dict], steps: int) -> dict:
    """One result from several runs of the grid (``--append``, ``--merge``): a setting's latest row wins,
    rows in the grid's order, the commands and wall times of all."""
    order = [s.name for s in grid_settings(steps)]
    rows = {}
    for part in parts:
        rows.update({r["setting"]["name"]: r for r in part["rows"]})
    last = next(p for p in reversed(parts) if "num_train" in p)
    merged = {k: v for k, v in last.items() if k not in ("rows", "commands", "wall_s")}
    merged["rows"] = sorted(rows.values(), key=lambda r: order.index(r["setting"]["name"])
                            if r["setting"]["name"] in order else len(order))
    merged["commands"] = [c for p in parts for c in p.get("commands", [])]
    merged["wall_s"] = sum(p.get("wall_s", 0.0) for p in parts)
    return merged


def write(result: dict, out: Path, finding: str) -> None:
    write_results(out, result, markdown(result).replace("FINDING", finding or "(finding: see README)"))


if __name__ == "__main__":
    main()
