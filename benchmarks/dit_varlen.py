"""DiT over variable-length tokens: what length-grouped batching buys, and sampling cost vs length.

On one synthetic data set whose token counts follow a policy-like skewed histogram (most images
short, a long tail up to ``m``), in one process and after warm-up, the script measures

* the padding fraction (wasted slots / total slots) of a whole epoch batched three ways:
  length-grouped (``LengthGroupedBatchSampler``), random, and always padded to ``m``;
* training-step throughput (valid tokens/s; forward + backward + AdamW) on batches drawn from each
  strategy, measured round-robin so that load on the machine hits all of them alike;
* the "ideal packed" reference: for each measured batch, a batch of the same size whose every
  sequence has the batch's mean length (no padding at all). ``step / ideal`` is the overhead of
  padding; the target for grouped batches is <= 1.2 with < 10 % wasted slots. On a CPU the times
  are this process's CPU time (``--clock``), which other jobs on a shared machine barely disturb;
* sampling time per image against the token count (Euler, classifier-free guidance).

Usage::

    python benchmarks/dit_varlen.py --out outputs/bench/dit_varlen.json      # ~1-2 min on 2 CPU cores

writes the JSON and a markdown table beside it (``dit_varlen.md``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from adatok_vlm.generator import (
    AdaTokDiT,
    AdaTokDiTConfig,
    LengthGroupedBatchSampler,
    flow_matching_loss,
    padding_fraction,
)
from adatok_vlm.training.flags import FlagParser
from adatok_vlm.training.results import write_results

TARGET_WASTE, TARGET_RATIO = 0.10, 1.2


def policy_like_lengths(n: int, m: int, seed: int) -> torch.Tensor:
    """Token counts like an ATA policy's choices: log-normal around ~m/4, clipped to [m/16, m]."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.randn(n, generator=g) * 0.55 + torch.log(torch.tensor(m / 4.0)))
    return raw.round().long().clamp(max(1, m // 16), m)


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/bench/dit_varlen.json", help="JSON file; the .md table goes beside it")
    p.add_argument("--preset", default="dit-tiny")
    p.add_argument("--hidden_size", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--token_dim", type=int, default=16)
    p.add_argument("--max_tokens", type=int, default=256)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--num_items", type=int, default=8192, help="items in the synthetic epoch")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--measured_batches", type=int, default=6, help="batches timed per strategy")
    p.add_argument("--sample_lengths", default="32,64,128,256")
    p.add_argument("--sample_batch", type=int, default=8)
    p.add_argument("--sample_steps", type=int, default=10)
    p.add_argument("--cfg_scale", type=float, default=4.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="auto: process CPU time on CPU (robust on shared machines), wall time on CUDA")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_clock(kind: str, device: torch.device):
    """``"wall"``: elapsed time (CUDA synchronised). ``"cpu"``: CPU time of this process, which other
    jobs on a shared machine barely disturb (on an idle machine ~ threads x wall time)."""
    if kind == "auto":
        kind = "wall" if device.type == "cuda" else "cpu"

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.process_time() if kind == "cpu" else time.perf_counter()

    return kind, now


def make_step(model: AdaTokDiT, optimizer: torch.optim.Optimizer, dim: int, device: torch.device, now):
    g = torch.Generator(device=device).manual_seed(0)

    def step(lengths: torch.Tensor) -> float:
        """One training step on a batch with these lengths, padded to its longest; returns seconds."""
        tokens = torch.randn(lengths.shape[0], int(lengths.max()), dim, device=device, generator=g)
        labels = torch.randint(0, model.config.num_classes, lengths.shape, device=device, generator=g)
        lengths = lengths.to(device)
        start = now()
        out = flow_matching_loss(model, tokens, lengths, labels, null_class=model.null_class, generator=g)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return now() - start

    return step


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    m, bs = args.max_tokens, args.batch_size
    config = AdaTokDiTConfig.from_preset(args.preset, token_dim=args.token_dim, max_tokens=m,
                                         num_classes=args.num_classes, hidden_size=args.hidden_size,
                                         depth=args.depth, num_heads=args.num_heads)
    model = AdaTokDiT(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clock, now = make_clock(args.clock, device)
    step = make_step(model, optimizer, args.token_dim, device, now)

    # ---- one epoch batched three ways ---------------------------------------------------------
    lengths = policy_like_lengths(args.num_items, m, args.seed)
    grouped = list(LengthGroupedBatchSampler(lengths, bs, seed=args.seed))
    perm = torch.randperm(args.num_items, generator=torch.Generator().manual_seed(args.seed)).tolist()
    random = [perm[i : i + bs] for i in range(0, args.num_items, bs)]
    waste = {"grouped": padding_fraction(grouped, lengths), "random": padding_fraction(random, lengths),
             "pad_to_m": 1.0 - lengths.float().mean().item() / m}

    # ---- timed batches: the same count from each strategy, drawn at random from the epoch ----
    pick = torch.Generator().manual_seed(args.seed + 1)
    chosen = {
        "grouped": [grouped[i] for i in torch.randperm(len(grouped), generator=pick)[: args.measured_batches].tolist()],
        "random": [random[i] for i in torch.randperm(len(random), generator=pick)[: args.measured_batches].tolist()],
    }
    # Every pad-to-m batch costs the same ([B, m] slots): three of them are enough.
    chosen["pad_to_m"] = chosen["random"][:3]
    jobs = []   # (strategy, batch index, lengths computed, real lengths)
    for name, batches in chosen.items():
        for k, idx in enumerate(batches):
            ls = lengths[idx]
            if name == "pad_to_m":
                # fixed-length baseline: every sequence occupies all m slots (as a model that
                # cannot cut at the batch's longest length would compute)
                jobs.append((name, k, torch.full_like(ls, m), ls))
            else:
                jobs.append((name, k, ls, ls))
            if name != "pad_to_m":
                ideal = torch.full_like(ls, max(1, round(ls.float().mean().item())))
                jobs.append((f"{name}_ideal", k, ideal, ls))
    for _, _, ls, _ in jobs[:6]:                      # warm-up (allocator, kernels, AdamW state)
        step(ls)
    times: dict[str, list[float]] = {}
    valid: dict[str, int] = {}
    for repeat in range(2):                           # round-robin, best of two per batch
        for name, k, ls, real in jobs:
            t = step(ls)
            key = f"{name}/{k}"
            times[key] = [*times.get(key, []), t]
            valid[key] = int(real.sum())
    per_strategy = {}
    for name in ("grouped", "random", "pad_to_m", "grouped_ideal", "random_ideal"):
        keys = [k for k in times if k.split("/")[0] == name]
        total_time = sum(min(times[k]) for k in keys)
        tokens = sum(valid[k] for k in keys)
        per_strategy[name] = {"seconds": total_time, "valid_tokens": tokens,
                              "valid_tokens_per_s": tokens / total_time,
                              "median_step_ms": 1e3 * statistics.median(min(times[k]) for k in keys)}

    def vs_ideal(name: str, ideal: str) -> float:
        """Time of a strategy's batches over the time of the same batches packed to their mean length."""
        ks = [k.split("/")[1] for k in times if k.split("/")[0] == name]
        return sum(min(times[f"{name}/{k}"]) for k in ks) / sum(min(times[f"{ideal}/{k}"]) for k in ks)

    ratio = {"grouped": vs_ideal("grouped", "grouped_ideal"), "random": vs_ideal("random", "random_ideal"),
             "pad_to_m": vs_ideal("pad_to_m", "random_ideal")}

    # ---- sampling time per image vs token count ------------------------------------------------
    model.eval()
    sampling = []
    labels = torch.arange(args.sample_batch, device=device) % args.num_classes
    for length in (int(v) for v in args.sample_lengths.split(",")):
        length = min(length, m)
        model.generate(labels[:2], num_tokens=length, num_steps=1, cfg_scale=args.cfg_scale)   # warm-up
        start = now()
        model.generate(labels, num_tokens=length, num_steps=args.sample_steps, cfg_scale=args.cfg_scale)
        sampling.append({"tokens": length, "ms_per_image": 1e3 * (now() - start) / args.sample_batch})

    result = {
        "benchmark": "dit_varlen",
        "config": {k: getattr(args, k) for k in vars(args) if k != "out"},
        "clock": clock,
        "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "lengths": {"mean": lengths.float().mean().item(), "median": lengths.median().item(),
                    "min": int(lengths.min()), "max": int(lengths.max())},
        "padding_fraction": waste,
        "train_step": per_strategy,
        "step_time_vs_ideal_packed": ratio,
        "sampling": sampling,
        "targets": {"grouped_waste_below": TARGET_WASTE, "grouped_step_ratio_below": TARGET_RATIO,
                    "grouped_waste_met": waste["grouped"] < TARGET_WASTE,
                    "grouped_ratio_met": ratio["grouped"] <= TARGET_RATIO},
        "environment": {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }
    table = markdown(result)
    write_results(args.out, result, table)
    print(table)
    return result


def markdown(r: dict) -> str:
    c, s, w, q = r["config"], r["train_step"], r["padding_fraction"], r["step_time_vs_ideal_packed"]
    lines = [
        f"## DiT over variable-length tokens ({r['parameters_M']:.2f}M params, {r['environment']['device']}, "
        f"{r['environment']['threads']} threads, {r['clock']} time)",
        "",
        f"{c['num_items']} synthetic items, token counts {r['lengths']['min']}..{r['lengths']['max']} "
        f"(mean {r['lengths']['mean']:.1f}, m = {c['max_tokens']}), batch {c['batch_size']}, "
        f"{c['measured_batches']} timed batches per strategy (3 for pad to m: all cost the same; best of 2, "
        "round-robin, after warm-up). Ideal packed: the same batches with every sequence at the batch's mean length.",
        "",
        f"| batching | wasted slots | median step (ms, {r['clock']}) | valid tokens / {r['clock']} s "
        "| step time / ideal packed |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (("grouped", "length-grouped"), ("random", "random"), ("pad_to_m", "pad to m")):
        lines.append(f"| {label} | {100 * w[name]:.1f} % | {s[name]['median_step_ms']:.1f} | "
                     f"{s[name]['valid_tokens_per_s']:,.0f} | {q[name]:.2f}x |")
    lines.append(f"| ideal packed (grouped batches) | 0.0 % | {s['grouped_ideal']['median_step_ms']:.1f} | "
                 f"{s['grouped_ideal']['valid_tokens_per_s']:,.0f} | 1.00x |")
    t = r["targets"]
    lines += ["", f"Targets: grouped waste < {100 * t['grouped_waste_below']:.0f} %: "
                  f"{'met' if t['grouped_waste_met'] else 'MISSED'}; grouped step <= {t['grouped_step_ratio_below']}x "
                  f"ideal packed: {'met' if t['grouped_ratio_met'] else 'MISSED'}.", "",
              f"Sampling ({c['sample_steps']} Euler steps, cfg {c['cfg_scale']}, batch {c['sample_batch']}):", "",
              "| tokens | ms / image |", "| ---: | ---: |"]
    lines += [f"| {row['tokens']} | {row['ms_per_image']:.1f} |" for row in r["sampling"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
