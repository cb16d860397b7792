"""The paper's Table 2 on a trained AdaTok with a policy: fixed / truncated / search / ATA / oracle.

    python benchmarks/ablation.py --model outputs/demo/model --out outputs/demo/ablation.json

Writes FILE.json ({"rows": [...], "checks": {...}}) and FILE.md (a markdown table) beside it.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModel

import adatok_vlm  # noqa: F401  (registers AdaTok with AutoModel)
from adatok_vlm.training.ablation import markdown_table, run_ablation
from adatok_vlm.training.batches import preload_images
from adatok_vlm.training.data import load_image_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder written by save_pretrained (with a policy)")
    parser.add_argument("--out", required=True, help="JSON file to write; the markdown table goes beside it")
    parser.add_argument("--data", default="fashion_mnist", help="data set spec (see load_image_dataset)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=2000, help="number of held-out images")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from transformers import AutoImageProcessor

    model = AutoModel.from_pretrained(args.model).to(args.device).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    dataset = load_image_dataset(args.data, split=args.split, limit=args.limit)
    pixels = preload_images(dataset, processor).pixels
    result = run_ablation(model, pixels, args.batch_size)
    result.pop("ata_lengths")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown_table(result))
    print(markdown_table(result))
    print(json.dumps(result["checks"], indent=2))


if __name__ == "__main__":
    main()
