"""The paper's Table 2 and Figures 3/5/6 on any trained AdaTok with a policy.

Rows (all on the same images, same batch size, timed in the same process after a warm-up):

* ``fixed``: all ``m`` tokens (the baseline);
* ``truncate_mean``: every image truncated to the policy's mean length (NTM without allocation);
* ``search``: NTM + binary search for the smallest length with MSE <= ``search_threshold``;
* ``ata``: NTM + the policy (``num_tokens="auto"``: one encoder pass, no decoder call);
* ``oracle``: the best-reward length per image, found by decoding every length (upper bound).

``ms_per_image`` times what each method needs to produce its tokens and lengths (``encode``).
Quality columns come from decoding at the chosen lengths afterwards (not timed).
"""

from __future__ import annotations

import time

import torch

from ..tokenizer.rewards import continuous_reward, structured_reward
from .evaluation import mse_per_image

METHODS = ("fixed", "truncate_mean", "search", "ata", "oracle")


def _batches(pixels: torch.Tensor, batch_size: int, device):
    for start in range(0, pixels.shape[0], batch_size):
        x = pixels[start : start + batch_size]
        yield (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).to(device)


@torch.no_grad()
def _time_lengths(model, pixels: torch.Tensor, num_tokens, batch_size: int) -> tuple[torch.Tensor, float]:
    """Run ``encode(num_tokens)`` over all images; return lengths and ms per image (after a warm-up)."""
    first = next(_batches(pixels, batch_size, model.device))
    model.encode(first, num_tokens=num_tokens)                      # warm-up
    lengths, elapsed = [], 0.0
    for x in _batches(pixels, batch_size, model.device):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        enc = model.encode(x, num_tokens=num_tokens)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        lengths.append(enc.lengths.cpu())
    return torch.cat(lengths), 1000.0 * elapsed / pixels.shape[0]


@torch.no_grad()
def errors_at(model, pixels: torch.Tensor, lengths: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-image pixel MSE ``[N]`` of reconstructions from per-image ``lengths``."""
    out, start = [], 0
    for x in _batches(pixels, batch_size, model.device):
        lens = lengths[start : start + x.shape[0]].to(model.device)
        enc = model.encode(x, num_tokens=lens)
        recon = model.decode(enc.tokens, enc.lengths)
        out.append(mse_per_image(recon, x).cpu())
        start += x.shape[0]
    return torch.cat(out)


def _row(method: str, model, lengths: torch.Tensor, rl: torch.Tensor, ms: float) -> dict:
    c, m = model.config, model.num_latent_tokens
    return {
        "method": method,
        "mean_tokens": float(lengths.float().mean()),
        "reward_continuous": float(continuous_reward(rl, lengths, m, c.reward_alpha, c.reward_beta).mean()),
        "reward_structured": float(structured_reward(rl, lengths, m, c.reward_rl_base, c.reward_gamma).mean()),
        "rmse": float(rl.mean()),
        "rqpr": float((rl <= c.reward_rl_base).float().mean()),
        "ms_per_image": ms,
    }


def run_ablation(model, pixels: torch.Tensor, batch_size: int = 256) -> dict:
    """Table 2 rows plus the target checks of the ATA issue."""
    if not model.has_policy:
        raise ValueError("run_ablation needs an AdaTok with a trained policy (adatok_vlm.training.train_policy)")
    model.eval()
    m = model.num_latent_tokens
    rows = {}
    ata_lengths, ata_ms = _time_lengths(model, pixels, "auto", batch_size)
    fixed_lengths, fixed_ms = _time_lengths(model, pixels, m, batch_size)
    mean_len = int(round(float(ata_lengths.float().mean())))
    trunc_lengths, trunc_ms = _time_lengths(model, pixels, mean_len, batch_size)
    search_lengths, search_ms = _time_lengths(model, pixels, "search", batch_size)
    oracle_lengths, oracle_ms = _time_lengths(model, pixels, "oracle", batch_size)
    for method, lengths, ms in (("fixed", fixed_lengths, fixed_ms), ("truncate_mean", trunc_lengths, trunc_ms),
                                ("search", search_lengths, search_ms), ("ata", ata_lengths, ata_ms),
                                ("oracle", oracle_lengths, oracle_ms)):
        rows[method] = _row(method, model, lengths, errors_at(model, pixels, lengths, batch_size), ms)
    key = f"reward_{model.config.reward_kind}"
    ata = rows["ata"]
    checks = {
        "reward": key,
        "ata_beats_fixed": ata[key] > rows["fixed"][key],
        "ata_beats_truncate_mean": ata[key] > rows["truncate_mean"][key],
        "ata_within_0.02_of_search": abs(ata[key] - rows["search"][key]) <= 0.02 or ata[key] > rows["search"][key],
        "ata_cost_vs_fixed": ata["ms_per_image"] / rows["fixed"]["ms_per_image"],
        "search_cost_vs_ata": rows["search"]["ms_per_image"] / ata["ms_per_image"],
    }
    checks["ata_at_most_1.3x_fixed"] = checks["ata_cost_vs_fixed"] <= 1.3
    checks["ata_at_least_10x_faster_than_search"] = checks["search_cost_vs_ata"] >= 10.0
    return {"rows": [rows[k] for k in METHODS], "checks": checks, "num_images": int(pixels.shape[0]),
            "batch_size": batch_size, "num_latent_tokens": m, "ata_lengths": ata_lengths.tolist(),
            "dial": dial_report(model, pixels, batch_size, budget=float(ata_lengths.float().mean()))}


def dial_report(model, pixels: torch.Tensor, batch_size: int, budget: float,
                targets: tuple[float, ...] = (0.01, 0.015, 0.02, 0.03)) -> dict:
    """How often ``{"max_mse": x}`` keeps its promise on held-out images, and the budget mode's quality."""
    report = {"max_mse": []}
    for target in targets:
        lengths, _ = _time_lengths(model, pixels, {"max_mse": target}, batch_size)
        rl = errors_at(model, pixels, lengths, batch_size)
        full = errors_at(model, pixels, torch.full_like(lengths, model.num_latent_tokens), batch_size)
        reachable = full <= target
        report["max_mse"].append({
            "target": target, "mean_tokens": float(lengths.float().mean()),
            "kept": float((rl <= target).float().mean()),
            "kept_where_reachable": float((rl[reachable] <= target).float().mean()) if reachable.any() else None,
            "reachable": float(reachable.float().mean()),
        })
    lo, hi = float(model.length_grid[0]), float(model.length_grid[-1])
    budget = min(max(budget, lo), hi)
    lengths, _ = _time_lengths(model, pixels, {"mean_budget": budget}, batch_size)
    report["mean_budget"] = _row("mean_budget", model, lengths, errors_at(model, pixels, lengths, batch_size), 0.0)
    report["mean_budget"]["budget"] = budget
    return report


def markdown_table(result: dict) -> str:
    lines = ["| method | mean tokens | reward (continuous) | reward (structured) | rMSE | rQPR | ms / image |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['mean_tokens']:.2f} | {r['reward_continuous']:.4f} | "
                     f"{r['reward_structured']:.4f} | {r['rmse']:.4f} | {r['rqpr']:.3f} | {r['ms_per_image']:.3f} |")
    c = result["checks"]
    lines += ["", f"{result['num_images']} images, batch {result['batch_size']}, m = {result['num_latent_tokens']}. "
              f"ATA costs {c['ata_cost_vs_fixed']:.2f}x the fixed-length encode; search costs "
              f"{c['search_cost_vs_ata']:.1f}x ATA."]
    dial = result.get("dial")
    if dial:
        lines += ["", "Quality dial (`num_tokens={\"max_mse\": x}`), held-out images:", "",
                  "| max_mse | mean tokens | promise kept | kept where reachable at m | reachable at m |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for r in dial["max_mse"]:
            kw = "-" if r["kept_where_reachable"] is None else f"{r['kept_where_reachable']:.3f}"
            lines.append(f"| {r['target']} | {r['mean_tokens']:.2f} | {r['kept']:.3f} | {kw} | {r['reachable']:.3f} |")
        b = dial["mean_budget"]
        lines += ["", f"Budget mode (`num_tokens={{\"mean_budget\": {b['budget']:.2f}}}`): {b['mean_tokens']:.2f} tokens, "
                  f"rMSE {b['rmse']:.4f}, reward (continuous) {b['reward_continuous']:.4f}, "
                  f"reward (structured) {b['reward_structured']:.4f}."]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def error_curves(model, pixels: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image MSE at every grid length: ``(grid [K], errors [N, K])`` (Figures 3, 5, 6)."""
    from .evaluation import per_image_mse

    grid = model.length_grid
    return grid, per_image_mse(model, pixels, grid.tolist(), batch_size, progress=False)


def plot_figures(model, pixels: torch.Tensor, out_dir, batch_size: int = 256, ata_lengths: torch.Tensor | None = None,
                 curves: tuple[torch.Tensor, torch.Tensor] | None = None) -> list:
    """Write Figures 3 (rMSE vs L per image), 5 (rQPR vs L), 6 (reward landscape + policy) and a histogram.

    ``curves``: ``error_curves``'s result when the caller has it already. The policy's lengths
    (``ata_lengths``, computed when None) are overlaid on Fig. 6 and get their own histogram; a model
    without a policy gets the landscape alone.
    """
    from pathlib import Path

    import matplotlib.pyplot as plt

    from .visualize import length_histogram, metric_curve, save_figure

    out_dir = Path(out_dir)
    c, m = model.config, model.num_latent_tokens
    grid, errors = curves if curves is not None else error_curves(model, pixels, batch_size)
    lengths = grid.tolist()
    paths = [metric_curve(lengths, errors, errors.mean(0).tolist(), "rMSE", out_dir / "fig3_rmse_vs_tokens.png",
                          "rMSE vs tokens per image (Fig. 3)", threshold=c.reward_rl_base, log_x=False),
             metric_curve(lengths, None, (errors <= c.reward_rl_base).float().mean(0).tolist(),
                          f"rQPR (rMSE <= {c.reward_rl_base})", out_dir / "fig5_rqpr_vs_tokens.png",
                          "rQPR vs tokens (Fig. 5)", log_x=False)]
    if ata_lengths is None and model.has_policy:
        ata_lengths = torch.cat([model.encode(x, num_tokens="auto").lengths.cpu()
                                 for x in _batches(pixels, batch_size, model.device)])
    g = grid[None, :].float().expand_as(errors)
    cont = continuous_reward(errors, g, m, c.reward_alpha, c.reward_beta).mean(0)
    struct = structured_reward(errors, g, m, c.reward_rl_base, c.reward_gamma).mean(0)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, cont.tolist(), label="R_continuous (eq. 6)", color="tab:blue", linewidth=2)
    ax.plot(lengths, struct.tolist(), label="R_structured (eq. 7)", color="tab:orange", linewidth=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("mean reward over images")
    ax.grid(alpha=0.3)
    if ata_lengths is not None:
        twin = ax.twinx()
        twin.hist(ata_lengths.numpy(), bins=range(int(grid[0]), int(grid[-1]) + 2), align="left", alpha=0.3,
                  color="tab:green", label="policy's lengths")
        twin.set_ylabel("images (policy)")
    ax.legend(loc="lower right")
    ax.set_title("Reward landscape and the learned policy (Fig. 6)" if ata_lengths is not None
                 else "Reward landscape (Fig. 6; no policy)")
    paths.append(save_figure(fig, out_dir / "fig6_reward_landscape.png"))
    if ata_lengths is not None:
        paths.append(length_histogram(ata_lengths, m, out_dir / "lengths_hist.png", "lengths chosen by the policy"))
    return paths
