"""Per-rank memory of parameters + gradients + optimizer state without ZeRO, with ZeRO-2 and ZeRO-3.

    python benchmarks/zero_memory.py --out benchmarks/results/zero_memory.json
    python benchmarks/zero_memory.py --precision fp32 --out benchmarks/results/zero_memory_fp32.json
    python benchmarks/zero_memory.py --render benchmarks/results/zero_memory.json   # re-derive table + checks
    python benchmarks/zero_memory.py --modes none,zero0,zero2,zero3 --out /tmp/zm_bf16.json   # bf16 like for like

Launches one 2-process job (``torchrun``, gloo on CPU, NCCL on GPUs) that trains two steps of each
model in each mode, with the same AdamW the trainers use:

* ``adatok-s``: the AdaTok preset (ViT encoder/decoder, VA-VAE latent space randomly initialised:
  nothing is downloaded), one 256x256 image per rank;
* ``lm-135m``: a causal LM with SmolLM2-135M's shape (``LlamaConfig``, random init), 32 tokens per rank.

Modes: ``none`` (plain DDP through Accelerate: every rank holds everything), ``zero0`` (a DeepSpeed
engine that shards nothing: the unsharded baseline with DeepSpeed's own weight precision; not in the
default ``--modes``, and not yet run on the 2-core machine), ``zero2`` and ``zero3`` (``configs/deepspeed/zero2.json`` / ``zero3.json`` through the same ``make_accelerator``
the trainers use). Memory is *measured*, not estimated: just before and just after the inner optimizer's
``step`` (when gradients, parameters and optimizer state are all alive) each rank walks the
module's parameters (their ZeRO-3 shards), their ``.grad`` and every tensor reachable from the
optimizer wrapper (DeepSpeed's flat fp32 partitions, gradient partitions, Adam moments), counting
each storage once. Activations and communication buckets held only in C++ (DDP's reducer) are not
counted. The peak over both steps, the larger of the two ranks, is reported.

``--precision bf16`` (the default; what the GPU configs run with ``bf16: auto``) keeps DeepSpeed's
weights in bf16 with fp32 master partitions; the DDP baseline runs fp32 weights under autocast, as
Accelerate does. Ratios are like for like: each row is compared with the unsharded row of the same
model whose weights have the same dtype (fp32 ZeRO against fp32 DDP, bf16 ZeRO against the bf16
``zero0`` engine); a row without such a baseline shows no ratio, and the ``zero3 <= 0.6x`` checks
use only like-for-like ratios. Writes FILE.json and FILE.md (a markdown table) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODES = ("none", "zero0", "zero2", "zero3")
DEFAULT_MODES = ("none", "zero2", "zero3")   # zero0 on request: it has not been run on the 2-core machine yet
UNSHARDED = ("none", "zero0")
ZERO3_MAX_RATIO = 0.6      # the check: ZeRO-3 keeps at most 0.6x of the unsharded per-rank state (2 ranks)
ZERO0 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
         "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True}
MODELS = ("adatok-s", "lm-135m")


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def build_model(name: str):
    """``(model, make_batch, loss_fn)`` for a named benchmark model, randomly initialised."""
    import torch

    if name == "adatok-s":
        from adatok_vlm import AdaTokConfig, AdaTokModel

        model = AdaTokModel(AdaTokConfig.from_preset("adatok-s", vae_random_init=True))
        size = model.config.image_size
        return model, lambda: torch.rand(1, 3, size, size), lambda m, x: m(x, return_reconstruction=False).loss
    if name == "lm-135m":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                             tie_word_embeddings=True, rms_norm_eps=1e-5)
        model = LlamaForCausalLM(config)
        ids = lambda: torch.randint(0, config.vocab_size, (1, 32))   # noqa: E731
        return model, ids, lambda m, x: m(input_ids=x, labels=x).loss
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


# ---------------------------------------------------------------------------------------------
# counting tensors
# ---------------------------------------------------------------------------------------------
def _storage(t):
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def model_bytes(module) -> dict[str, int]:
    """Bytes of the parameters (their local shard under ZeRO-3) and their ``.grad``, per storage."""
    params, grads = {}, {}
    for p in module.parameters():
        shard = getattr(p, "ds_tensor", None)
        for t in (p, shard):
            if t is not None and t.numel():
                key, n = _storage(t)
                params[key] = n
        if p.grad is not None and p.grad.numel():
            key, n = _storage(p.grad)
            grads[key] = n
    return {"params": params, "grads": grads}


def reachable_tensors(root, skip: set[int], max_depth: int = 8) -> dict[int, int]:
    """Every tensor storage reachable from ``root`` through attributes, containers and optimizer
    states, not descending into modules (their parameters are counted by ``model_bytes``)."""
    import torch

    found, seen = {}, set()

    def visit(obj, depth):
        if depth > max_depth or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.numel():
                key, n = _storage(obj)
                if key not in skip:
                    found[key] = n
            if obj.grad is not None:
                visit(obj.grad, depth + 1)
            return
        if isinstance(obj, torch.nn.Module):
            return
        if isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                visit(v, depth + 1)
        elif isinstance(obj, torch.optim.Optimizer):
            visit(obj.state, depth + 1)
            visit(obj.param_groups, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "accelerate", "torch"):
            visit(vars(obj), depth + 1)

    visit(root, 0)
    return found


def measure(module, optimizer) -> dict[str, int]:
    m = model_bytes(module)
    skip = set(m["params"]) | set(m["grads"])
    opt = reachable_tensors(optimizer, skip)
    out = {"params": sum(m["params"].values()), "grads": sum(m["grads"].values()), "optimizer": sum(opt.values())}
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


# ---------------------------------------------------------------------------------------------
# the launched worker
# ---------------------------------------------------------------------------------------------
def inner_optimizer(optimizer):
    """The torch optimizer that finally steps (inside Accelerate's and DeepSpeed's wrappers)."""
    inner = optimizer
    while getattr(inner, "optimizer", None) is not None:
        inner = inner.optimizer
    return inner


def run_one(model_name: str, mode: str, precision: str, steps: int = 2) -> dict:
    import torch

    from adatok_vlm.training.distributed import build_deepspeed_plugin
    from adatok_vlm.training.launch import make_accelerator, reset_accelerator_state

    reset_accelerator_state()
    ds_config = {"none": None, "zero0": ZERO0}.get(mode, mode)
    plugin = None if ds_config is None else build_deepspeed_plugin(ds_config, micro_batch_size=1, grad_clip=1.0)
    accelerator = make_accelerator(precision, deepspeed_plugin=plugin)
    torch.manual_seed(0)
    model, make_batch, loss_fn = build_model(model_name)
    num_params = sum(p.numel() for p in model.parameters())
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    root = model.module if hasattr(model, "module") else model
    weights_dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        next(root.parameters()).dtype, str(next(root.parameters()).dtype))
    samples = []
    inner = inner_optimizer(optimizer)
    original_step = inner.step

    def measured_step(*args, **kwargs):
        samples.append(measure(root, optimizer))
        result = original_step(*args, **kwargs)
        samples.append(measure(root, optimizer))
        return result

    inner.step = measured_step
    model.train()
    started = time.time()
    torch.manual_seed(1 + accelerator.process_index)
    for _ in range(steps):
        loss = loss_fn(model, make_batch().to(accelerator.device))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    inner.step = original_step
    peak = max(samples, key=lambda s: s["total"])
    record = {"model": model_name, "mode": mode, "precision": precision, "weights": weights_dtype,
              "rank": accelerator.process_index,
              "world_size": accelerator.num_processes, "num_parameters": num_params, "num_trainable": num_trainable,
              "peak": peak, "samples": len(samples), "wall_s": time.time() - started}
    accelerator.free_memory()
    return record


def worker(plan_path: str) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)       # torch.distributed API renames
    warnings.filterwarnings("ignore", message="Grad strides do not match")   # DDP on the baseline

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    plan = json.loads(Path(plan_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    for item in plan["runs"]:
        record = run_one(item["model"], item["mode"], plan["precision"])
        with open(f"{plan_path}.rank{rank}", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if rank == 0:
            print(f"[zero_memory] {item['model']} {item['mode']}: {record['peak']['total'] / 2**20:.0f} MiB "
                  f"({record['wall_s']:.0f}s)", flush=True)


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
def summarise(records: list[dict]) -> dict:
    """One row per (model, mode): the larger rank's peak; then the like-for-like ratios and checks."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in records):
        for mode in MODES:
            ranks = [r for r in records if r["model"] == model and r["mode"] == mode]
            if not ranks:
                continue
            r = max(ranks, key=lambda r: r["peak"]["total"])
            precision = "fp32" if r["precision"] == "no" else r["precision"]
            rows.append({"model": model, "mode": mode, "precision": precision, "weights": r["weights"],
                         "world_size": r["world_size"], "num_parameters": r["num_parameters"],
                         "num_trainable": r["num_trainable"], **{f"{k}_bytes": v for k, v in r["peak"].items()}})
    return compare(rows)


def weights_dtype(row: dict) -> str:
    """The dtype the row's module weights had (files written before it was recorded: DDP keeps fp32
    weights under autocast, a DeepSpeed engine holds weights in its precision)."""
    if "weights" in row:
        return row["weights"]
    return "fp32" if row["mode"] == "none" or row["precision"] == "fp32" else row["precision"]


def compare(rows: list[dict]) -> dict:
    """Each row's total against the unsharded row of the same model *and weight dtype* (None without
    one), and the ``zero3 <= 0.6x`` check for every ZeRO-3 row that has such a baseline."""
    for row in rows:
        row["weights"] = weights_dtype(row)
        base = [b for b in rows if b["model"] == row["model"] and b["mode"] in UNSHARDED
                and weights_dtype(b) == row["weights"]]
        row["baseline_mode"] = base[0]["mode"] if base else None
        row["ratio_to_unsharded"] = row["total_bytes"] / base[0]["total_bytes"] if base else None
    checks = {f"{r['model']}: zero3 <= {ZERO3_MAX_RATIO} x unsharded ({r['weights']})":
              r["ratio_to_unsharded"] <= ZERO3_MAX_RATIO
              for r in rows if r["mode"] == "zero3" and r["ratio_to_unsharded"] is not None}
    return {"rows": rows, "checks": checks}


def markdown_table(result: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"   # noqa: E731
    lines = ["| model | params (trainable) | mode | precision | weights | weights MiB | .grad MiB "
             "| optimizer side MiB | total MiB / rank | vs. unsharded, same weight dtype |",
             "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        ratio = (f"{r['ratio_to_unsharded']:.2f}x ({r['baseline_mode']})"
                 if r["ratio_to_unsharded"] is not None else "- (no unsharded run with these weights)")
        lines.append(f"| {r['model']} | {r['num_parameters'] / 1e6:.1f}M ({r['num_trainable'] / 1e6:.1f}M) | "
                     f"{r['mode']} | {r['precision']} | {r['weights']} | "
                     f"{mib(r['params_bytes'])} | {mib(r['grads_bytes'])} | {mib(r['optimizer_bytes'])} | "
                     f"{mib(r['total_bytes'])} | {ratio} |")
    world = result["rows"][0]["world_size"] if result["rows"] else 2
    lines.append("")
    lines.append(f"Per-rank peak over two AdamW steps, {world} ranks; largest rank shown. *weights*: the dtype and bytes "
                 "of the module's parameters (their local shard under ZeRO-3); *.grad*: gradients left on the "
                 "parameters (DDP); *optimizer side*: every tensor the optimizer wrapper holds (Adam moments, and under "
                 "DeepSpeed the fp32 master and gradient partitions). Under bf16 the DeepSpeed engines hold bf16 weights "
                 "with fp32 master partitions while the DDP baseline (`none`) keeps fp32 weights under bf16 autocast "
                 "(Accelerate's mixed precision), so a bf16 ZeRO row is compared with the unsharded bf16 DeepSpeed "
                 "engine (`zero0`), never with `none`.")
    lines.append("")
    lines.append("Checks: " + (", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in result["checks"].items())
                               or "none (no like-for-like baseline)"))
    if result.get("command"):
        lines += ["", f"Command: `{result['command']}`"]
    if result.get("rendered_by"):
        lines += ["", f"Ratios and checks re-derived from the measured bytes by `{result['rendered_by']}`."]
    return "\n".join(lines) + "\n"


def render(path: Path) -> dict:
    """Re-derive the ratios, checks and table of an existing result file (no new measurement)."""
    from adatok_vlm.training.results import write_results

    result = json.loads(path.read_text())
    result.update(compare(result["rows"]))
    result["rendered_by"] = f"python benchmarks/zero_memory.py --render {path}"
    write_results(path, result, markdown_table(result))
    print(markdown_table(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    from adatok_vlm.training.flags import FlagParser
    from adatok_vlm.training.results import write_results

    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/zero_memory.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, from {','.join(MODES)}")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--render", default=None, metavar="FILE.json",
                        help="re-derive the like-for-like ratios, checks and .md of an existing result file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}
    if args.render:
        return render(Path(args.render))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan_path = out.with_suffix(".plan.json")
    for old in out.parent.glob(plan_path.name + ".rank*"):
        old.unlink()
    runs = [{"model": m, "mode": mode} for m in args.models.split(",") for mode in args.modes.split(",")]
    plan_path.write_text(json.dumps({"runs": runs, "precision": "bf16" if args.precision == "bf16" else "no"}))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "adatok-vlm" / "torch_extensions"))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                    __file__, "--worker", str(plan_path)], check=True, env=env)
    records = [json.loads(line) for f in sorted(out.parent.glob(plan_path.name + ".rank*"))
               for line in f.read_text().splitlines()]
    result = summarise(records)
    result["command"] = "python benchmarks/zero_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result["precision"] = args.precision
    write_results(out, result, markdown_table(result))
    for f in [plan_path, *out.parent.glob(plan_path.name + ".rank*")]:
        f.unlink()
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
