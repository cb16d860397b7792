"""The paper's Table 2 on a trained AdaTok with a policy: baseline / fixed / truncated / search / ATA / oracle.

    python benchmarks/ablation.py --model outputs/demo/model --out outputs/demo/ablation.json
    python benchmarks/ablation.py --model outputs/demo/model --baseline_model outputs/demo-fixed/model \
        --data natural_images --out benchmarks/results/natural_demo_ablation.json

``--baseline_model`` (the paper's first row): a tokenizer trained without Nested Tail Masking, step-matched
to the model's stage 1 (``benchmarks/train_fixed_baseline.py``). ``--search_threshold`` sets the ``search``
row's threshold (default the structured reward's rl_base); the ``search_paper`` row's threshold is derived
from the paper's Table 2 (see ``adatok_vlm.training.ablation``). ``--data natural_images`` reads the natural
demo's held-out photos (shuffled with seed 0, as the demo does, so a limit covers every photo and scale).

Writes FILE.json ({"rows": [...], "checks": {...}}) and FILE.md (a markdown table) beside it.
"""

import json
import os
import platform

import torch
from transformers import AutoModel

import adatok_vlm  # noqa: F401  (registers AdaTok with AutoModel)
from adatok_vlm.training.ablation import markdown_table, run_ablation
from adatok_vlm.training.batches import preload_images
from adatok_vlm.training.data import load_image_dataset
from adatok_vlm.training.flags import FlagParser
from adatok_vlm.training.results import write_results


def held_out(data: str, split: str, limit: int):
    """The evaluation images: ``natural_images`` shuffled (seed 0) before the limit, as the demo's Table 2."""
    if data in ("natural_images", "natural-images"):
        dataset = load_image_dataset(data, split=split)
        dataset = dataset.shuffle(seed=0)
        return dataset.select(range(min(limit, len(dataset)))) if limit else dataset
    return load_image_dataset(data, split=split, limit=limit)


def main(argv: list[str] | None = None) -> dict:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder written by save_pretrained (with a policy)")
    parser.add_argument("--out", required=True, help="JSON file to write; the markdown table goes beside it")
    parser.add_argument("--data", default="fashion_mnist", help="data set spec (see load_image_dataset)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=2000, help="number of held-out images")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--baseline_model", default=None,
                        help="a fixed-length tokenizer trained without NTM (the paper's first row)")
    parser.add_argument("--search_threshold", type=float, default=None,
                        help="the search row's MSE threshold (default: the model's reward_rl_base)")
    parser.add_argument("--truncate_length", type=int, default=None,
                        help="the truncate_fixed row's length (default: round(m * 143 / 256), the paper's share)")
    args = parser.parse_args(argv)
    from transformers import AutoImageProcessor

    model = AutoModel.from_pretrained(args.model).to(args.device).eval()
    baseline = AutoModel.from_pretrained(args.baseline_model).to(args.device).eval() if args.baseline_model else None
    processor = AutoImageProcessor.from_pretrained(args.model)
    pixels = preload_images(held_out(args.data, args.split, args.limit), processor).pixels
    load_before = os.getloadavg()
    result = run_ablation(model, pixels, args.batch_size, baseline=baseline,
                          search_threshold_value=args.search_threshold, truncate_length=args.truncate_length)
    for per_image in ("ata_lengths", "oracle_lengths"):   # per-image lists, not table rows
        result.pop(per_image)
    result["model"], result["baseline_model"], result["data"] = args.model, args.baseline_model, args.data
    # the ms columns depend on the machine and on what else ran: say both
    result["machine"] = {"device": args.device, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                         "processor": platform.processor() or platform.machine(),
                         "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}
    mc = result["machine"]
    machine = (f"\nTimed on {mc['device']} ({mc['cpu_count']} cores, {mc['threads']} torch threads), load average "
               f"{mc['load_average_1min_before_after'][0]} before and {mc['load_average_1min_before_after'][1]} "
               "after the run.\n")
    write_results(args.out, result, markdown_table(result) + machine)
    print(markdown_table(result))
    print(json.dumps(result["checks"], indent=2))
    return result


if __name__ == "__main__":
    main()
