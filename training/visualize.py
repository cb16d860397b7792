"""Pictures a person would rather look at than read: reconstruction grids, class grids, metric curves,
histograms. The one home of the project's picture helpers (trainers, evaluation, demos and the
sampling entry points draw with these)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# The one float -> uint8 rounding lives with the image processor; re-exported here for the picture helpers' callers.
from ..tokenizer.image_processing_adatok import to_uint8  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


HEADER_HEIGHT = 14    # pixels above a column grid for its column names


def column_grid(columns: list[torch.Tensor], headers: list[str], scale: int = 2, pad: int = 2):
    """Rows: images; columns: ``columns`` (each float ``[B, C, H, W]`` in [0, 1]), a name above each.

    Returns ``(picture, cell_w, cell_h)``: the PIL image (``HEADER_HEIGHT`` pixels of names on top)
    and one cell's size in its pixels, so a caller can write into the cells (token counts).
    """
    from PIL import ImageDraw

    b, c, h, w = columns[0].shape
    canvas = torch.ones(c, b * (h + pad) + pad, len(columns) * (w + pad) + pad)
    for j, column in enumerate(columns):
        for i in range(b):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, top : top + h, left : left + w] = column[i].detach().float().cpu()
    cells = to_uint8(canvas)
    img = Image.fromarray(cells.squeeze(-1) if c == 1 else cells).convert("RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    full = Image.new("RGB", (img.width, img.height + HEADER_HEIGHT), "white")
    full.paste(img, (0, HEADER_HEIGHT))
    draw = ImageDraw.Draw(full)
    cell_w, cell_h = (w + pad) * scale, (h + pad) * scale
    for j, text in enumerate(headers):
        draw.text((pad * scale + j * cell_w + 2, 1), text[: max(3, cell_w // 6)], fill="black")
    return full, cell_w, cell_h


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
    full, _, _ = column_grid(columns, [str(length) for length in lengths] + ["GT"], scale)
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


def length_histogram(lengths, max_tokens: int, path: str | Path, title: str = "chosen lengths",
                     reference=None) -> Path:
    """Bars: the token counts ``lengths`` (a tensor or array) over ``1..max_tokens``.

    With ``reference`` (counts ``[max_tokens]``, e.g. a DiT's training histogram) both are drawn as
    fractions of images, the reference as a line, so generated and training lengths compare.
    """
    lengths = np.asarray(lengths.cpu() if isinstance(lengths, torch.Tensor) else lengths)
    ref = None if reference is None else np.asarray(reference, dtype=np.float64)
    density = ref is not None
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.hist(lengths, bins=np.arange(1, max_tokens + 2), density=density, color="tab:green", edgecolor="white",
            align="left", label="generated")
    if ref is not None and ref.sum() > 0:
        ax.step(np.arange(1, max_tokens + 1), ref / ref.sum(), where="mid", color="black", linewidth=1.5,
                label="training data")
        ax.legend()
    ax.set_xlabel("tokens")
    ax.set_ylabel("fraction of images" if density else "images")
    ax.set_title(title)
    return save_figure(fig, path)


def class_grid(images: np.ndarray, labels, path: str | Path, class_names: list[str] | None = None,
               max_classes: int = 16, max_per_class: int = 16, scale: int = 3, pad: int = 2) -> Path:
    """One row per class (in order of first appearance), its images left to right, its name at the left.

    ``images``: uint8 NHWC ``[N, H, W, 3]`` (:func:`to_uint8`); ``labels``: ``N`` class ids.
    """
    from PIL import ImageDraw

    labels = [int(v) for v in labels]
    rows: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        if y in rows or len(rows) < max_classes:
            row = rows.setdefault(y, [])
            if len(row) < max_per_class:
                row.append(i)
    h, w = images.shape[1] * scale, images.shape[2] * scale
    names = {y: (class_names[y] if class_names and y < len(class_names) else f"class {y}") for y in rows}
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font_w = int(max(measure.textlength(f"{y}: {n}") for y, n in names.items())) + 10
    cols = max(len(r) for r in rows.values())
    canvas = Image.new("RGB", (font_w + cols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (y, members) in enumerate(rows.items()):
        top = pad + r * (h + pad)
        draw.text((4, top + h // 2 - 5), f"{y}: {names[y]}", fill="black")
        for c, i in enumerate(members):
            tile = Image.fromarray(images[i]).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (font_w + pad + c * (w + pad), top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


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


# ==============================================================================================
# Lengths against image content (paper Fig. 1; the policy's lengths vs the oracle's and vs complexity)
# ==============================================================================================

def _check_images_and_lengths(images: torch.Tensor, lengths: torch.Tensor | list[int]) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a [N, 1 or 3, H, W] tensor, got {got}")
    lengths = torch.as_tensor(lengths).reshape(-1).long().cpu()
    if lengths.numel() != images.shape[0]:
        raise ValueError(f"lengths: expected one length per image ({images.shape[0]}), got {lengths.numel()}")
    return lengths


def order_by_length(lengths: torch.Tensor | list[int]) -> torch.Tensor:
    """Indices that sort images by their token length, shortest first (stable: ties keep their order)."""
    return torch.sort(torch.as_tensor(lengths).reshape(-1).long().cpu(), stable=True).indices


def length_ordered_grid(images: torch.Tensor, lengths: torch.Tensor | list[int], path: str | Path,
                        columns: int = 8, scale: int = 2) -> dict:
    """Paper Fig. 1: images sorted by the policy's token length, each with its length written under it.

    ``images`` float ``[N, C, H, W]`` in [0, 1]; ``lengths`` one int per image. Writes a PNG and returns
    ``{"path", "order", "labels"}``: the image indices in drawing order (row-major) and the label drawn
    under each cell, so a caller (or a test) can check what was drawn.
    """
    from PIL import ImageDraw

    lengths = _check_images_and_lengths(images, lengths)
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns: expected a positive int, got {columns!r}")
    order = order_by_length(lengths)
    labels = [f"{int(lengths[i])} tok" for i in order]
    cells = to_uint8(images[order])
    n, h, w = cells.shape[0], cells.shape[1] * scale, cells.shape[2] * scale
    label_h, pad = 12, 4
    rows = (n + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for k in range(n):
        cell = Image.fromarray(cells[k].squeeze(-1) if cells.shape[-1] == 1 else cells[k]).convert("RGB")
        left, top = pad + (k % columns) * (w + pad), pad + (k // columns) * (h + label_h + pad)
        canvas.paste(cell.resize((w, h), Image.NEAREST), (left, top))
        draw.text((left + 1, top + h), labels[k], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return {"path": path, "order": order.tolist(), "labels": labels}


def png_sizes(images: torch.Tensor) -> torch.Tensor:
    """Bytes of each image saved as an 8-bit PNG (zlib level 9): a content-complexity measure."""
    import io

    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a [N, C, H, W] tensor, got {got}")
    sizes = []
    for cell in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(cell.squeeze(-1) if cell.shape[-1] == 1 else cell).save(buffer, format="PNG", compress_level=9)
        sizes.append(len(buffer.getvalue()))
    return torch.tensor(sizes, dtype=torch.long)


def length_correlations(policy_lengths: torch.Tensor | list[int], oracle_lengths: torch.Tensor | list[int],
                        images: torch.Tensor) -> dict:
    """Spearman rank correlation of the policy's lengths with the oracle's and with PNG size.

    The paper's claim in two numbers: complex images (big PNGs; long best lengths) should get more
    tokens. Returns ``{"spearman_oracle", "spearman_png_size", "num_images"}``; a constant input (no
    ranking) gives ``nan``.
    """
    from scipy.stats import spearmanr

    policy = _check_images_and_lengths(images, policy_lengths)
    oracle = _check_images_and_lengths(images, oracle_lengths)
    sizes = png_sizes(images)

    def rho(a, b) -> float:
        if len(set(a.tolist())) < 2 or len(set(b.tolist())) < 2:
            return float("nan")
        return float(spearmanr(a.numpy(), b.numpy()).statistic)

    return {"spearman_oracle": rho(policy, oracle), "spearman_png_size": rho(policy, sizes),
            "num_images": int(policy.numel())}
