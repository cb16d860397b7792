"""The paper's Figures 3, 5 and 6 for a trained AdaTok, as PNGs plus the numbers behind them.

* ``fig3_rmse_vs_tokens.png``   per-image rMSE against the token count (faint lines) and the mean;
* ``fig5_rqpr_vs_tokens.png``   the share of images within the quality target (rQPR) against L;
* ``fig6_reward_landscape.png`` the mean continuous and structured rewards against L, with the
  policy's length histogram overlaid (needs a model with a policy; without one, the landscape only);
* ``lengths_hist.png``          the policy's lengths on their own.

    python benchmarks/curves.py --model outputs/demo/model --out outputs/demo/curves --limit 2000

``curves.json`` holds, per grid length, the mean rMSE, rQPR and both mean rewards, and the policy's
length counts; ``curves.md`` is the same as a table.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModel

import adatok_vlm  # noqa: F401  (registers AdaTok with the Auto classes)
from adatok_vlm.tokenizer.rewards import continuous_reward, structured_reward
from adatok_vlm.training.ablation import error_curves, plot_figures
from adatok_vlm.training.batches import preload_images
from adatok_vlm.training.data import load_image_dataset
from adatok_vlm.training.flags import FlagParser
from adatok_vlm.training.results import write_results


def summarise(model, grid: torch.Tensor, errors: torch.Tensor, ata_lengths: torch.Tensor | None) -> dict:
    c, m = model.config, model.num_latent_tokens
    g = grid[None, :].float().expand_as(errors)
    rows = [{"tokens": int(length), "rmse": float(errors[:, k].mean()),
             "rqpr": float((errors[:, k] <= c.reward_rl_base).float().mean()),
             "reward_continuous": float(continuous_reward(errors[:, k], g[:, k], m, c.reward_alpha,
                                                          c.reward_beta).mean()),
             "reward_structured": float(structured_reward(errors[:, k], g[:, k], m, c.reward_rl_base,
                                                          c.reward_gamma).mean())}
            for k, length in enumerate(grid.tolist())]
    result = {"num_images": int(errors.shape[0]), "rl_base": c.reward_rl_base, "rows": rows}
    if ata_lengths is not None:
        values, counts = ata_lengths.unique(return_counts=True)
        result["policy_length_counts"] = {str(int(v)): int(n) for v, n in zip(values, counts)}
        result["policy_mean_tokens"] = float(ata_lengths.float().mean())
    return result


def markdown(result: dict) -> str:
    lines = [f"# rMSE, rQPR@{result['rl_base']} and rewards per token count ({result['num_images']} images)", "",
             "| tokens | rMSE | rQPR | R_continuous | R_structured |", "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['tokens']} | {r['rmse']:.4f} | {r['rqpr']:.3f} | {r['reward_continuous']:.3f} | "
              f"{r['reward_structured']:.3f} |" for r in result["rows"]]
    if "policy_mean_tokens" in result:
        lines += ["", f"Policy (`num_tokens=\"auto\"`): mean {result['policy_mean_tokens']:.2f} tokens."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an AdaTok folder written by save_pretrained")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    model = AutoModel.from_pretrained(args.model).to(args.device).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    pixels = preload_images(load_image_dataset(args.data, split=args.split, limit=args.limit), processor).pixels
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ata_lengths = None
    if model.has_policy:
        with torch.no_grad():
            ata_lengths = torch.cat([model.encode(pixels[i : i + args.batch_size].float().div(255).to(model.device),
                                                  num_tokens="auto").lengths.cpu()
                                     for i in range(0, pixels.shape[0], args.batch_size)])
    grid, errors = error_curves(model, pixels, args.batch_size)
    paths = plot_figures(model, pixels, out, args.batch_size, ata_lengths=ata_lengths, curves=(grid, errors))
    result = summarise(model, grid, errors, ata_lengths)
    result["files"] = [p.name for p in paths]
    write_results(out / "curves", result, markdown(result))
    print(markdown(result))
    for path in paths:
        print(f"  wrote {path}")
    return result


if __name__ == "__main__":
    main()
