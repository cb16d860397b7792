"""One step-budgeted stage-1 recipe experiment on the natural-image data set: train, then rMSE per length
on 768 shuffled held-out test crops. The runs of ``benchmarks/results/natural_recipe_search.md`` are
this script with the overrides in their rows, e.g.

    python benchmarks/natural_recipe.py D2 train.max_steps=800 train.batch_size=32 train.lr=3e-3

Each ``section.field=value`` overrides the base recipe (adatok-tiny, lr 2e-3, one CPU thread, seed 0);
values are JSON where they parse. One JSON line per run is appended to ``--out``.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> dict:
    from adatok_vlm.training.flags import FlagParser

    p = FlagParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="the run's name (its output folder under --root)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--root", default="outputs/recipe", help="where runs and the data cache go")
    p.add_argument("--out", default="outputs/recipe/results.jsonl", help="JSON lines, one per run")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModel

    from adatok_vlm.training.batches import preload_images
    from adatok_vlm.training.config import deep_merge, fill_dataclass
    from adatok_vlm.training.evaluation import default_lengths, per_image_mse
    from adatok_vlm.training.natural_images import natural_images_dir
    from adatok_vlm.training.data_setup import build_image_processor, load_split
    from adatok_vlm.training.train_tokenizer import TokenizerTrainingConfig, train

    torch.set_num_threads(1)
    raw = {"model": {"preset": "adatok-tiny"},
           "data": {"dataset": str(natural_images_dir(crop_size=32, cache_dir=f"{args.root}/cache")),
                    "resize_mode": "shortest_edge", "preload": True},
           "train": {"output_dir": f"{args.root}/runs/{args.name}", "max_steps": 600, "batch_size": 64, "lr": 2e-3,
                     "warmup_steps": 50, "log_every": 50, "sample_every": 0, "save_every": 0, "num_threads": 1,
                     "seed": 0}}
    for item in args.overrides:
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        try:
            value = json.loads(value)
        except ValueError:
            pass
        raw = deep_merge(raw, {section: {field: value}})
    cfg = fill_dataclass(TokenizerTrainingConfig, raw)
    wall, cpu = time.time(), time.process_time()
    summary = train(cfg)
    wall, cpu = time.time() - wall, time.process_time() - cpu
    model = AutoModel.from_pretrained(summary["model_dir"]).eval()
    test = load_split(cfg.data, "test", 0).shuffle(seed=0).select(range(768))
    pixels = preload_images(test, build_image_processor(model.config, cfg.data, train=False), cache=False).pixels
    m = model.config.num_latent_tokens
    lengths = default_lengths(m)
    mse = per_image_mse(model, pixels, lengths)
    rmse = {k: float(mse[:, i].mean()) for i, k in enumerate(lengths)}
    out = {"name": args.name, "args": args.overrides, "steps": summary["steps"], "train_s": wall,
           "cpu_s_per_step": cpu / summary["steps"], "rmse": rmse, "ratio_m_over_m8": rmse[m] / rmse[max(1, m // 8)],
           "worst_ratio_k_over_k8": max(rmse[k] / rmse[max(1, k // 8)] for k in lengths if k >= 8)}
    print(json.dumps(out))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main()
