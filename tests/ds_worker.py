"""Runs several training scenarios one after another inside ONE multi-process launch.

    torchrun --nproc_per_node 2 tests/ds_worker.py PLAN.json
    accelerate launch --config_file configs/accelerate/cpu_2proc_zero2.yaml tests/ds_worker.py PLAN.json

``PLAN.json`` holds ``[{"name": ..., "trainer": "train_tokenizer" | "train_policy" | "train_dit",
"argv": [...]}, ...]``. Each scenario calls the trainer's ``main(argv)``; the Accelerate singletons are
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


def main(plan_path: str) -> int:
    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    rank = int(os.environ.get("RANK", "0"))
    for scenario in plan:
        started = time.time()
        module = importlib.import_module(f"adatok_vlm.training.{scenario['trainer']}")
        try:
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
