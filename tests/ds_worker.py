"""Runs several training scenarios one after another inside ONE multi-process launch.

    torchrun --nproc_per_node 2 tests/ds_worker.py PLAN.json
    accelerate launch --config_file configs/accelerate/cpu_2proc_zero2.yaml tests/ds_worker.py PLAN.json

``PLAN.json`` holds ``[{"name": ..., "trainer": "train_tokenizer" | "train_policy" | "train_dit" |
"train_vlm" | "vlm_generate_zero3", "argv": [...]}, ...]``. Each scenario calls the trainer's
``main(argv)`` (or ``vlm_generate_zero3`` below); the Accelerate singletons are
reset in between so the next one brings its own DeepSpeed plugin. Rank 0 appends one JSON line per
finished scenario to ``PLAN.json.results`` (summary and wall time). Launches cost ~10 s each on CPU
(imports, process group), so the DeepSpeed tests amortise them this way.
"""

import importlib
import json
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from adatok_vlm.training.launch import reset_accelerator_state  # noqa: E402


def vlm_generate_zero3(model_dir: str, out_prefix: str) -> dict:
    """Shard an exported VLM with ZeRO-3 and generate one image per rank, rank r writing 1 + 3r tokens,
    with ``synced_gpus=True``; each rank saves its tokens to ``<out_prefix>.rank<r>.json``."""
    import deepspeed
    import torch.distributed as dist

    from adatok_vlm.sample_t2i import load_for_sampling

    vlm, processor, _ = load_for_sampling(model_dir)
    engine, *_ = deepspeed.initialize(model=vlm.eval(), config={"train_micro_batch_size_per_gpu": 1,
                                                                "zero_optimization": {"stage": 3}})
    rank = dist.get_rank()
    ids = processor.tokenizer(["a blue disc"], return_tensors="pt").input_ids
    enc = engine.module.generate_images(ids, num_image_tokens=1 + 3 * rank, seed=0, synced_gpus=True)
    with open(f"{out_prefix}.rank{rank}.json", "w", encoding="utf-8") as f:
        json.dump({"lengths": enc.lengths.tolist(), "tokens": enc.tokens.tolist()}, f)
    dist.barrier()
    return {"length": int(enc.lengths[0])}


def main(plan_path: str) -> int:
    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    rank = int(os.environ.get("RANK", "0"))
    for scenario in plan:
        started = time.time()
        try:
            if scenario["trainer"] == "vlm_generate_zero3":
                summary = vlm_generate_zero3(*scenario["argv"])
            else:
                module = importlib.import_module(f"adatok_vlm.training.{scenario['trainer']}")
                summary = module.main(list(scenario["argv"]))
        except Exception:
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)   # the other rank may sit in a collective: do not wait for it
        reset_accelerator_state()
        if rank == 0:
            record = {"name": scenario["name"], "wall_s": time.time() - started,
                      "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str, type(None)))}}
            with open(plan_path + ".results", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            print(f"[ds_worker] {scenario['name']} done in {record['wall_s']:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
