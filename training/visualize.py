"""Pictures a person would rather look at than read: reconstruction grids, metric curves, histograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@torch.no_grad()
def reconstruction_grid(model, images: torch.Tensor, lengths: list[int], path: str | Path, scale: int = 2) -> Path:
    """Rows: images; columns: reconstructions from each length, then the original (paper Fig. 11)."""
    model.eval()
    x = images.to(model.device).float()
    enc = model.encode(x)
    columns = []
    for length in lengths:
        lens = torch.full((x.shape[0],), length, dtype=torch.long, device=x.device)
        columns.append(model.decode(enc.tokens[:, :length], lens))
    columns.append(x)
    grid = torch.stack(columns, dim=1)                                 # [B, K+1, 3, H, W]
    b, k, c, h, w = grid.shape
    pad = 2
    canvas = torch.ones(c, b * (h + pad) + pad, k * (w + pad) + pad)
    for i in range(b):
        for j in range(k):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, top : top + h, left : left + w] = grid[i, j]
    img = Image.fromarray(_to_uint8(canvas).permute(1, 2, 0).numpy())
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    header_h = 14
    full = Image.new("RGB", (img.width, img.height + header_h), "white")
    full.paste(img, (0, header_h))
    from PIL import ImageDraw

    draw = ImageDraw.Draw(full)
    cell = (w + pad) * scale
    for j, label in enumerate([str(length) for length in lengths] + ["GT"]):
        draw.text((pad * scale + j * cell + 2, 1), label, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full.save(path)
    return path


def metric_curve(lengths: list[int], per_image: torch.Tensor | None, mean: list[float], ylabel: str,
                 path: str | Path, title: str, threshold: float | None = None, log_x: bool = True,
                 max_lines: int = 40) -> Path:
    """Per-image curves (thin) and the mean (thick) of a metric against token count."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if per_image is not None:
        for row in per_image[:max_lines]:
            ax.plot(lengths, row.tolist(), color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(lengths, mean, color="black", linewidth=2.2, marker="o", label="mean")
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {threshold}")
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(v) for v in lengths])
    ax.set_xlabel("tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def length_histogram(lengths: torch.Tensor, max_tokens: int, path: str | Path, title: str = "chosen lengths") -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.hist(lengths.cpu().numpy(), bins=range(1, max_tokens + 2), color="tab:green", edgecolor="white", align="left")
    ax.set_xlabel("tokens")
    ax.set_ylabel("images")
    ax.set_title(title)
    return save_figure(fig, path)


def training_curves(history: list[dict], out_dir: str | Path) -> list[Path]:
    """Stage-2 curves: entropy (paper Fig. 9), log-probability (Fig. 10), reward and mean length."""
    if not history:
        return []
    steps = [h["step"] for h in history]
    paths = []
    for key, title, name in (("entropy", "policy entropy (Fig. 9)", "policy_entropy.png"),
                             ("log_prob", "log-probability of the chosen length (Fig. 10)", "policy_log_prob.png"),
                             ("reward", "mean reward", "policy_reward.png"),
                             ("length_mean", "mean chosen length", "policy_length.png")):
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        values = [h[key] for h in history]
        ax.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=0.8)
        window = max(1, len(values) // 50)
        if window > 1:
            smooth = torch.tensor(values).unfold(0, window, 1).mean(1).tolist()
            ax.plot(steps[window - 1 :], smooth, color="tab:blue", linewidth=2)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        paths.append(save_figure(fig, Path(out_dir) / name))
    held_out = [h for h in history if "val_reward" in h]
    if held_out:   # train.val_size: the policy's `auto` lengths on held-out images against Table 2's baselines
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.plot([h["step"] for h in held_out], [h["val_reward"] for h in held_out], color="tab:blue",
                linewidth=2, label="policy (auto)")
        for key, label, color in (("val_oracle_reward", "oracle", "tab:green"),
                                  ("val_search_reward", "binary search", "tab:orange"),
                                  ("val_best_fixed_reward", "best fixed length", "tab:gray")):
            ax.axhline(held_out[-1][key], color=color, linestyle="--", linewidth=1.2, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("mean reward")
        ax.set_title("held-out reward")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        paths.append(save_figure(fig, Path(out_dir) / "policy_val_reward.png"))
    return paths
