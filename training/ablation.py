"""The paper's Table 2 and Figures 3/5/6 on any trained AdaTok with a policy.

Rows (all on the same images, same batch size, timed in the same process after a warm-up); the
paper's four rows (Sec. 5.2, Table 2: Baseline 256 / NTM 143 / NTM + Heur 100 / NTM + ATA 177 tokens,
m = 256) are marked in ``paper_row``:

* ``baseline_fixed`` (paper: "Baseline"): a tokenizer trained *without* Nested Tail Masking, at its
  fixed m tokens; only with ``baseline=`` (``benchmarks/train_fixed_baseline.py`` trains it, step-matched);
* ``fixed``: the NTM model at all m tokens (ours: what NTM costs at full length);
* ``truncate_fixed`` (paper: "NTM", 143 of 256 tokens): every image truncated to one fixed length,
  by default the paper's share of m, ``round(m * 143 / 256)``;
* ``truncate_mean`` (ours; the paper's Sec. 5.3 comparison): every image truncated to the policy's mean
  length on these images, rounded;
* ``search``: NTM + binary search for the smallest length with MSE <= ``search_threshold`` (default
  the structured reward's ``rl_base``: then it is nearly the structured reward's oracle);
* ``search_paper`` (paper: "NTM + Heur"): the same search at the threshold the paper's row implies. The
  paper's search ends at 100 tokens where ATA ends at 177, with a lower reward (0.750 vs 0.819): a looser
  threshold than rl_base. We take the threshold at which our search's mean length is 100/177 of ATA's
  on these images (:func:`threshold_for_mean_length`, solved on the measured error curves);
* ``ata`` (paper: "NTM + ATA"): the policy (``num_tokens="auto"``: one encoder pass, no decoder call);
* ``oracle``: the best-reward length per image for the model's ``reward_kind``, found by decoding every
  length (upper bound); ``oracle_<other kind>``: the same for the other reward, from the same error curves
  (its ms are the oracle's: the same procedure).

``ms_per_image`` times what each method needs to produce its tokens and lengths (``encode``).
Quality columns come from decoding at the chosen lengths afterwards (not timed), through
:func:`~.evaluation.errors_at_lengths`, the one "error at every length".
"""

from __future__ import annotations

import contextlib
import time

import torch

from ..tokenizer.allocation import binary_search_lengths
from ..tokenizer.rewards import continuous_reward, structured_reward
from .evaluation import errors_at_lengths, unit_pixels

METHODS = ("baseline_fixed", "fixed", "truncate_fixed", "truncate_mean", "search", "search_paper", "ata", "oracle")
# The paper's Table 2 (m = 256): method -> (its row's name, mean tokens, reward, runtime in ms).
PAPER_TABLE2 = {"baseline_fixed": ("Baseline", 256, 0.726, 1.8), "truncate_fixed": ("NTM", 143, 0.579, 4.2),
                "search_paper": ("NTM + Heur", 100, 0.750, 70.2), "ata": ("NTM + ATA", 177, 0.819, 4.3)}
PAPER_M = 256


def _batches(pixels: torch.Tensor, batch_size: int, device):
    for start in range(0, pixels.shape[0], batch_size):
        yield unit_pixels(pixels[start : start + batch_size], device)


@contextlib.contextmanager
def search_threshold(model, threshold: float):
    """``encode(num_tokens="search")`` with ``threshold`` instead of ``config.search_threshold`` (restored after)."""
    saved = model.config.search_threshold
    model.config.search_threshold = float(threshold)
    try:
        yield
    finally:
        model.config.search_threshold = saved


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
    """Per-image pixel MSE ``[N]`` of reconstructions from per-image ``lengths`` (:func:`errors_at_lengths`)."""
    return torch.cat([errors_at_lengths(model, pixels[s : s + batch_size], lengths[s : s + batch_size])[:, 0]
                      for s in range(0, pixels.shape[0], batch_size)])


def searched_lengths(errors: torch.Tensor, grid: torch.Tensor, threshold: float) -> torch.Tensor:
    """What ``encode(num_tokens="search")`` at ``threshold`` returns, replayed on measured error curves
    ``errors [N, K]`` at ``grid [K]`` (the same probes of :func:`binary_search_lengths`, no decoder)."""
    index = {int(length): k for k, length in enumerate(grid.tolist())}
    rows = torch.arange(errors.shape[0])

    def error_fn(lengths: torch.Tensor) -> torch.Tensor:
        return errors[rows, torch.tensor([index[int(v)] for v in lengths.tolist()])]

    return binary_search_lengths(error_fn, grid.cpu(), threshold, errors.shape[0])


def threshold_for_mean_length(errors: torch.Tensor, grid: torch.Tensor, target_mean: float,
                              iterations: int = 60) -> float:
    """The search threshold whose mean length on curves ``errors [N, K]`` is closest to ``target_mean``
    (bisection in log space: a looser threshold never gives a longer length)."""
    lo, hi = float(errors.min().clamp_min(1e-12)), float(errors.max()) * 1.0001
    if not float(grid[0]) <= target_mean <= float(grid[-1]):
        raise ValueError(f"target_mean: expected a mean length in [{int(grid[0])}, {int(grid[-1])}], got {target_mean}")
    for _ in range(iterations):
        mid = (lo * hi) ** 0.5
        if float(searched_lengths(errors, grid, mid).float().mean()) > target_mean:
            lo = mid                                      # too long: loosen
        else:
            hi = mid
    candidates = (lo, hi)
    means = [abs(float(searched_lengths(errors, grid, t).float().mean()) - target_mean) for t in candidates]
    return candidates[means.index(min(means))]


def _row(method: str, config, m: int, lengths: torch.Tensor, rl: torch.Tensor, ms: float, **extra) -> dict:
    c = config
    row = {
        "method": method,
        "mean_tokens": float(lengths.float().mean()),
        "reward_continuous": float(continuous_reward(rl, lengths, m, c.reward_alpha, c.reward_beta).mean()),
        "reward_structured": float(structured_reward(rl, lengths, m, c.reward_rl_base, c.reward_gamma).mean()),
        "rmse": float(rl.mean()),
        "rqpr": float((rl <= c.reward_rl_base).float().mean()),
        "ms_per_image": ms,
    }
    if method in PAPER_TABLE2:
        name, tokens, reward, rt = PAPER_TABLE2[method]
        row["paper_row"] = {"name": name, "tokens": tokens, "reward": reward, "ms": rt, "m": PAPER_M}
    row.update(extra)
    return row


def run_ablation(model, pixels: torch.Tensor, batch_size: int = 256, *, baseline=None,
                 search_threshold_value: float | None = None, truncate_length: int | None = None,
                 curves: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Table 2 rows plus the target checks of the ATA issue.

    Args:
        model: an AdaTok with a trained policy (NTM + ATA).
        pixels: held-out images, uint8 ``[N, 3, H, W]`` or float in [0, 1].
        baseline: the fixed-length tokenizer trained without NTM (same m, image size) for the paper's
            first row; None leaves that row out.
        search_threshold_value: the ``search`` row's threshold (default the model's ``reward_rl_base``).
        truncate_length: the ``truncate_fixed`` row's length (default ``round(m * 143 / 256)``).
        curves: :func:`error_curves` of ``model`` on ``pixels`` when the caller has them (the demo shares one
            measurement with :func:`plot_figures`); measured here otherwise.

    The result's ``ata_lengths`` and ``oracle_lengths`` are the per-image lengths of those two rows (callers
    pop them before writing the table).
    """
    if not model.has_policy:
        raise ValueError("run_ablation needs an AdaTok with a trained policy (adatok_vlm.training.train_policy)")
    model.eval()
    c, m = model.config, model.num_latent_tokens
    threshold = float(c.reward_rl_base if search_threshold_value is None else search_threshold_value)
    if not threshold > 0:
        raise ValueError(f"search_threshold_value: expected an MSE > 0, got {search_threshold_value!r}")
    truncate_length = round(m * PAPER_TABLE2["truncate_fixed"][1] / PAPER_M) if truncate_length is None \
        else truncate_length
    if isinstance(truncate_length, bool) or not isinstance(truncate_length, int) or not 1 <= truncate_length <= m:
        raise ValueError(f"truncate_length: expected an int in 1..{m}, got {truncate_length!r}")
    if baseline is not None:
        if baseline.num_latent_tokens != m or baseline.config.image_size != c.image_size:
            raise ValueError(f"baseline: expected a tokenizer with m = {m} tokens at {c.image_size}px like the model, "
                             f"got m = {baseline.num_latent_tokens} at {baseline.config.image_size}px")
        baseline.eval()
    timed = {"ata": _time_lengths(model, pixels, "auto", batch_size),
             "fixed": _time_lengths(model, pixels, m, batch_size),
             "truncate_fixed": _time_lengths(model, pixels, truncate_length, batch_size)}
    mean_len = int(round(float(timed["ata"][0].float().mean())))
    timed["truncate_mean"] = _time_lengths(model, pixels, mean_len, batch_size)
    with search_threshold(model, threshold):
        timed["search"] = _time_lengths(model, pixels, "search", batch_size)
    grid, curves = curves if curves is not None else error_curves(model, pixels, batch_size)
    paper_ratio = PAPER_TABLE2["search_paper"][1] / PAPER_TABLE2["ata"][1]
    target = min(max(paper_ratio * float(timed["ata"][0].float().mean()), float(grid[0])), float(grid[-1]))
    paper_threshold = threshold_for_mean_length(curves, grid, target)
    with search_threshold(model, paper_threshold):
        timed["search_paper"] = _time_lengths(model, pixels, "search", batch_size)
    timed["oracle"] = _time_lengths(model, pixels, "oracle", batch_size)
    rows = {}
    if baseline is not None:
        lengths, ms = _time_lengths(baseline, pixels, m, batch_size)
        rows["baseline_fixed"] = _row("baseline_fixed", c, m, lengths, errors_at(baseline, pixels, lengths, batch_size),
                                      ms)
    extra = {"truncate_fixed": {"length": truncate_length}, "truncate_mean": {"length": mean_len},
             "search": {"threshold": threshold},
             "search_paper": {"threshold": paper_threshold, "target_mean_tokens": target}}
    for method in METHODS[1:]:
        lengths, ms = timed[method]
        rows[method] = _row(method, c, m, lengths, errors_at(model, pixels, lengths, batch_size), ms,
                            **extra.get(method, {}))
    other = "continuous" if c.reward_kind == "structured" else "structured"
    g = grid[None, :].to(curves.dtype).expand_as(curves)
    reward = (continuous_reward(curves, g, m, c.reward_alpha, c.reward_beta) if other == "continuous"
              else structured_reward(curves, g, m, c.reward_rl_base, c.reward_gamma))
    best = reward.argmax(1)
    rows[f"oracle_{other}"] = _row(f"oracle_{other}", c, m, grid[best], curves[torch.arange(len(best)), best],
                                   timed["oracle"][1])
    key = f"reward_{c.reward_kind}"
    ata = rows["ata"]
    checks = {
        "reward": key,
        "ata_beats_fixed": ata[key] > rows["fixed"][key],
        "ata_beats_truncate_mean": ata[key] > rows["truncate_mean"][key],
        "ata_within_0.02_of_search": abs(ata[key] - rows["search"][key]) <= 0.02 or ata[key] > rows["search"][key],
        "ata_beats_search_paper": ata[key] > rows["search_paper"][key],
        "ata_cost_vs_fixed": ata["ms_per_image"] / rows["fixed"]["ms_per_image"],
        "search_cost_vs_ata": rows["search"]["ms_per_image"] / ata["ms_per_image"],
    }
    if baseline is not None:
        checks["ata_beats_baseline"] = ata[key] > rows["baseline_fixed"][key]
    checks["ata_at_most_1.3x_fixed"] = checks["ata_cost_vs_fixed"] <= 1.3
    checks["ata_at_least_10x_faster_than_search"] = checks["search_cost_vs_ata"] >= 10.0
    order = [k for k in METHODS if k in rows] + [f"oracle_{other}"]
    return {"rows": [rows[k] for k in order], "checks": checks, "num_images": int(pixels.shape[0]),
            "batch_size": batch_size, "num_latent_tokens": m, "reward_kind": c.reward_kind,
            "search_threshold": threshold, "search_threshold_paper": paper_threshold,
            "truncate_length": truncate_length, "ata_lengths": timed["ata"][0].tolist(),
            "oracle_lengths": timed["oracle"][0].tolist(),
            "dial": dial_report(model, pixels, batch_size, budget=float(timed["ata"][0].float().mean()))}


def dial_report(model, pixels: torch.Tensor, batch_size: int, budget: float,
                targets: tuple[float, ...] = (0.01, 0.015, 0.02, 0.03)) -> dict:
    """How often ``{"max_mse": x}`` keeps its promise on held-out images, and the budget mode's quality."""
    report = {"max_mse": []}
    full = errors_at(model, pixels, torch.full((pixels.shape[0],), model.num_latent_tokens), batch_size)
    for target in targets:
        lengths, _ = _time_lengths(model, pixels, {"max_mse": target}, batch_size)
        rl = errors_at(model, pixels, lengths, batch_size)
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
    report["mean_budget"] = _row("mean_budget", model.config, model.num_latent_tokens, lengths,
                                 errors_at(model, pixels, lengths, batch_size), 0.0)
    report["mean_budget"]["budget"] = budget
    return report


ROW_NOTES = {
    "baseline_fixed": "tokenizer trained without NTM, all m tokens",
    "fixed": "NTM tokenizer, all m tokens",
    "truncate_fixed": "every image at one fixed length ({length})",
    "truncate_mean": "every image at the policy's mean length ({length}; Sec. 5.3's comparison)",
    "search": "binary search, threshold {threshold:.4g} (rl_base unless set)",
    "search_paper": "binary search, threshold {threshold:.4g} (the paper's search/ATA length ratio 100/177)",
    "ata": "the policy, one encoder pass",
    "oracle": "best {kind} reward per image, every length decoded",
    "oracle_continuous": "best continuous reward per image, from the same curves",
    "oracle_structured": "best structured reward per image, from the same curves",
}


def markdown_table(result: dict) -> str:
    """Table 2 as markdown: our rows, which of them is the paper's (with the paper's figures at m = 256),
    and what each row measures."""
    lines = ["| method | paper's row (m = 256: tokens, reward, ms) | what it is | mean tokens | reward (continuous) | "
             "reward (structured) | rMSE | rQPR | ms / image |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    kind = result.get("reward_kind", "structured")
    for r in result["rows"]:
        p = r.get("paper_row")
        paper = f"{p['name']}: {p['tokens']}, {p['reward']}, {p['ms']}" if p else "-"
        note = ROW_NOTES.get(r["method"], "").format(kind=kind, **{k: v for k, v in r.items() if k != "method"})
        lines.append(f"| {r['method']} | {paper} | {note} | {r['mean_tokens']:.2f} | {r['reward_continuous']:.4f} | "
                     f"{r['reward_structured']:.4f} | {r['rmse']:.4f} | {r['rqpr']:.3f} | {r['ms_per_image']:.3f} |")
    c = result["checks"]
    lines += ["", f"{result['num_images']} images, batch {result['batch_size']}, m = {result['num_latent_tokens']}. "
              f"ATA costs {c['ata_cost_vs_fixed']:.2f}x the fixed-length encode; search costs "
              f"{c['search_cost_vs_ata']:.1f}x ATA."]
    lines += ["", "What differs from the paper's Table 2: its reward column is one reward (the values fit the "
              "structured one) at m = 256 on ImageNet; here both rewards at this model's m. Its \"NTM\" row "
              "truncates to a length that is neither its ATA mean nor its search mean (143 of 256): "
              "`truncate_fixed` uses the same share of m; `truncate_mean` is ours. Its \"+Heur\" threshold is "
              "not given: `search_paper` takes the one at which the search ends at 100/177 of ATA's mean length, "
              "as the paper's did; `search` at rl_base is nearly the structured oracle. `fixed` and the oracles "
              "are not in the paper." + ("" if any(r["method"] == "baseline_fixed" for r in result["rows"]) else
                                         " No baseline tokenizer was given (`--baseline_model`): the paper's first "
                                         "row is missing.")]
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
