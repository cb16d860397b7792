"""The GPU check of issue 15: one prepared script for when a CUDA machine is lent.

    python benchmarks/gpu_check.py --out gpu_check.json                    # about 3-6 minutes on an H200
    python benchmarks/gpu_check.py --out gpu_check.json --budget-s 300     # skip what would run past 300 s

On a machine without CUDA it exits at once (status 2) with a message on stderr and writes nothing. On a
CUDA device it runs, each in its own ``try`` (a failing check records its error in the JSON and the next
one runs), and rewrites ``--out`` after every check, so a run stopped from outside still leaves what it
measured:

1. ``device``: name, capability, memory, torch / CUDA / cuDNN versions, bf16 support;
2. ``bf16_autocast``: a matmul and one ``adatok-s`` forward under ``torch.autocast(bfloat16)``: the dtypes
   that come out, finiteness, and the relative difference to fp32;
3. ``sdpa_backends``: the decoder's masked attention (``[B, heads, n + L, 64]`` with a boolean key-padding
   mask ``[B, 1, 1, n + L]``, bf16) forced through each backend with ``torch.nn.attention.sdpa_kernel``
   (flash, memory-efficient, cuDNN, math): which run, their time and error against math; then the
   profiler on the default dispatch (bare and inside the model's decoder) says which kernel actually runs;
4. ``train_step``: one ``adatok-s`` stage-1 step (forward, backward, AdamW) at ``--batch-size`` (32) under
   bf16 autocast: images/s and peak memory, from pixels (the frozen VAE encoder runs) and from cached
   latents (``model(latents=...)``: no VAE encoder), each with NTM's random lengths and at the
   fixed full length (the fixed-length tokenizer's equivalent);
5. ``encode_decode``: ``benchmarks/throughput.py``'s measurement: ``model.encode`` / ``model.decode`` / round
   trip images/s at the full length, fp32 and bf16 autocast, with the VAE's share of each, and the decode at
   m/8, m/2 and m kept tokens (its cost falls with the kept length);
6. ``loss_run``: ``--steps`` (200) steps from cached latents of a fixed set of structured images; the loss
   must fall (mean of the last 20 below the mean of the first 20).

Random weights of the real architectures (nothing is downloaded). Needs torch, timm, transformers,
safetensors, pyyaml, tqdm and diffusers (the VAE); the repository is imported from this checkout, installed
or not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = ("gpu_check: no CUDA device here (torch.cuda.is_available() is False); this script measures a GPU and "
           "wrote nothing. Run it on a machine with an NVIDIA GPU.")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def import_project():
    """``adatok_vlm``'s tokenizer classes from this checkout, without running ``adatok_vlm/__init__``
    (which registers the VLM and generator too): a bare package whose path maps the sibling folders
    (``tokenizer/``, ``training/``) into the namespace the way ``setup.py``'s ``package_dir`` does."""
    if "adatok_vlm" not in sys.modules:
        package = types.ModuleType("adatok_vlm")
        package.__path__ = [str(REPO / "adatok_vlm"), str(REPO)]
        sys.modules["adatok_vlm"] = package
    from adatok_vlm.tokenizer import AdaTokConfig, AdaTokModel

    return AdaTokConfig, AdaTokModel


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_throughput():
    """``benchmarks/throughput.py`` beside this file, as a module (whether this file runs as a script or is
    loaded by path): the timing helpers and the encode/decode measurement both scripts share."""
    path = Path(__file__).with_name("throughput.py")
    spec = importlib.util.spec_from_file_location("adatok_benchmarks_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


throughput = load_throughput()


def error_record(err: BaseException) -> dict:
    return {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
            "traceback": traceback.format_exc()[-3000:]}


def attention_backend_of(names: list[str]) -> str:
    """Which SDPA implementation a list of profiled op / kernel names shows: the ATen op that dispatch chose
    (``aten::_scaled_dot_product_{flash,efficient,cudnn}_attention``, ``..._attention_math``) when profiled,
    else the kernel names (cuDNN's own kernels may say "flash", so the ATen op is read first)."""
    text = " ".join(names).lower()
    for backend, op in (("flash", "_scaled_dot_product_flash_attention"),
                        ("efficient", "_scaled_dot_product_efficient_attention"),
                        ("cudnn", "_scaled_dot_product_cudnn_attention"),
                        ("math", "_scaled_dot_product_attention_math")):
        if op in text:
            return backend
    if "cudnn" in text:
        return "cudnn"
    if "flash" in text:
        return "flash"
    if "fmha" in text or "mem_eff" in text or "efficient_attention" in text:
        return "efficient"
    if "softmax" in text:
        return "math"
    return "unknown"


def profiled_names(fn) -> list[str]:
    """Op and kernel names of one call of ``fn`` (CPU + CUDA activities), attention-related first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        throughput.synchronize()
    names = sorted({event.key for event in prof.key_averages()})
    keys = ("attention", "attn", "flash", "fmha", "softmax", "sdpa", "cudnn")
    return [n for n in names if any(k in n.lower() for k in keys)]


# ---------------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------------
def check_device(ctx: dict) -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"ok": True, "name": props.name, "capability": list(torch.cuda.get_device_capability(0)),
            "memory_gib": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported()}


def build_model(ctx: dict):
    import torch

    if "model" not in ctx:
        AdaTokConfig, AdaTokModel = import_project()
        torch.manual_seed(0)
        model = AdaTokModel(AdaTokConfig.from_preset(ctx["args"].preset, vae_random_init=True)).to(ctx["device"])
        ctx.update(model=model)
    return ctx["model"]


def check_bf16(ctx: dict) -> dict:
    import torch

    dev = ctx["device"]
    a = torch.randn(256, 256, device=dev)
    with torch.autocast(dev, dtype=torch.bfloat16):
        product = a @ a
    out = {"matmul_dtype": str(product.dtype)}
    model = build_model(ctx).eval()
    pixels = throughput.structured_images(2, model.config.image_size, 0, dev)
    with torch.no_grad():
        ref = model(pixels, num_tokens=model.num_latent_tokens, return_reconstruction=False)
        with torch.autocast(dev, dtype=torch.bfloat16):
            low = model(pixels, num_tokens=model.num_latent_tokens, return_reconstruction=False)
    rel = float((low.latents.float() - ref.latents.float()).norm() / ref.latents.float().norm().clamp_min(1e-12))
    out.update(model_latents_dtype=str(low.latents.dtype), loss_fp32=float(ref.loss), loss_bf16=float(low.loss),
               finite=bool(torch.isfinite(low.latents).all()), rel_diff_latents_vs_fp32=rel)
    out["ok"] = product.dtype == torch.bfloat16 and out["finite"] and rel < 0.1
    return out


def check_sdpa(ctx: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = ctx["device"]
    args = ctx["args"]
    b, heads, n, length, dim = args.batch_size, 8, 256, 256, 64   # adatok-s: 256 patch queries + 256 tokens
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(b, heads, n + length, dim, device=dev, dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    kept = torch.randint(1, length + 1, (b,), device=dev, generator=g)
    valid = torch.cat([torch.ones(b, n, dtype=torch.bool, device=dev),
                       torch.arange(length, device=dev)[None] < kept[:, None]], dim=1)
    mask = valid[:, None, None, :]
    with sdpa_kernel([SDPBackend.MATH]):
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    forced = {}
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        entry = {}
        for masked in (True, False):
            key = "masked" if masked else "unmasked"
            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    call = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask if masked else None)
                    out = call()
                    seconds = throughput.median_seconds(call, 5)
                result = {"runs": True, "ms": 1e3 * seconds}
                if masked:
                    result["max_abs_err_vs_math_fp32"] = float((out.float() - reference).abs().max())
                entry[key] = result
            except Exception as err:   # a backend that cannot take these inputs says why
                entry[key] = {"runs": False, "error": f"{type(err).__name__}: {str(err)[:400]}"}
        forced[backend.lower()] = entry
    bare = profiled_names(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    out = {"shape": [b, heads, n + length, dim], "dtype": "bfloat16", "mask": "bool key padding [B, 1, 1, N]",
           "forced": forced, "default_masked_ops": bare, "default_masked_backend": attention_backend_of(bare)}
    try:
        model = build_model(ctx).train()
        tokens = torch.randn(b, length, model.config.token_dim, device=dev)
        lengths = kept.clone()
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
            inside = profiled_names(lambda: model.decoder(tokens, lengths))
        out.update(model_decoder_ops=inside, model_decoder_backend=attention_backend_of(inside))
    except Exception as err:
        out["model_decoder_error"] = f"{type(err).__name__}: {err}"
    out["ok"] = any(e["masked"]["runs"] for e in forced.values())
    return out


def check_train_step(ctx: dict) -> dict:
    import torch

    dev = ctx["device"]
    args = ctx["args"]
    model = build_model(ctx).train()
    b, m = args.batch_size, model.num_latent_tokens
    pixels = throughput.structured_images(b, model.config.image_size, 1, dev)
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
        latents = model.latent_space.encode(pixels).float()   # what the cache would hand the step
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(params, lr=1e-5)
    variants = {
        "pixels_ntm": lambda: model(pixels, return_reconstruction=False).loss,
        "cache_ntm": lambda: model(latents=latents, return_reconstruction=False).loss,
        "pixels_fixed_length": lambda: model(pixels, num_tokens=m, return_reconstruction=False).loss,
        "cache_fixed_length": lambda: model(latents=latents, num_tokens=m, return_reconstruction=False).loss,
    }
    out = {"batch_size": b, "precision": "bf16 autocast, fp32 weights, AdamW", "variants": {}}
    for name, loss_fn in variants.items():
        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = loss_fn()
            loss.backward()
            optimizer.step()
        try:
            if dev == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            seconds = throughput.median_seconds(step, args.step_repeats, warmup=2)
            peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
            out["variants"][name] = {"ok": True, "seconds_per_step": seconds, "images_per_second": b / seconds,
                                     "peak_memory_gib": peak}
        except Exception as err:
            out["variants"][name] = error_record(err)
            if dev == "cuda":
                torch.cuda.empty_cache()
    v = out["variants"]
    if v.get("pixels_ntm", {}).get("ok") and v.get("cache_ntm", {}).get("ok"):
        out["cache_speedup"] = v["pixels_ntm"]["seconds_per_step"] / v["cache_ntm"]["seconds_per_step"]
    out["ok"] = all(entry.get("ok") for entry in v.values())
    optimizer.zero_grad(set_to_none=True)
    return out


def check_encode_decode(ctx: dict) -> dict:
    """``throughput.measure_model`` at ``--batch-size``: encode, decode, round trip and the decode at m/8, m/2,
    m kept tokens, fp32 and bf16 autocast, with the VAE's share of each (3 repeats after 1 warm-up)."""
    model = build_model(ctx).eval()
    pixels = throughput.structured_images(ctx["args"].batch_size, model.config.image_size, 2, ctx["device"])
    out = throughput.measure_model(model, pixels, repeats=3, warmup=1, device=ctx["device"])
    out["ok"] = True
    return out


def check_loss_run(ctx: dict) -> dict:
    import torch

    dev = ctx["device"]
    args = ctx["args"]
    model = build_model(ctx).train()
    b = args.batch_size
    images = throughput.structured_images(2 * b, model.config.image_size, 3, dev)
    with torch.no_grad():
        latents = torch.cat([model.latent_space.encode(images[i:i + b]) for i in range(0, 2 * b, b)]).float()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=4e-5, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(0)
    losses, start, warmup = [], time.perf_counter(), 20
    for step in range(args.steps):
        if time.perf_counter() - ctx["start"] > args.budget_s:
            break
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup)
        order = torch.randperm(2 * b, generator=g)[:b].to(dev)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(latents=latents[order], generator=g, return_reconstruction=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:20]) / max(1, len(losses[:20])), sum(losses[-20:]) / max(1, len(losses[-20:]))
    finite = all(math.isfinite(v) for v in losses)
    return {"ok": finite and len(losses) >= 40 and last < first, "steps_run": len(losses), "batch_size": b,
            "lr": args.lr, "seconds": time.perf_counter() - start, "loss_first20_mean": first,
            "loss_last20_mean": last, "loss_every_10": losses[::10], "finite": finite,
            "source": "cached latents (no VAE in the loop)"}


CHECKS = (("device", check_device), ("bf16_autocast", check_bf16), ("sdpa_backends", check_sdpa),
          ("train_step", check_train_step), ("encode_decode", check_encode_decode), ("loss_run", check_loss_run))


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--preset", default="adatok-s")
    parser.add_argument("--batch-size", type=int, default=32, help="per-GPU batch of the step checks")
    parser.add_argument("--steps", type=int, default=200, help="steps of the loss run")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--step-repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip the checks that would start after this many seconds (the loss run stops early)")
    parser.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(n for n, _ in CHECKS))
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    wanted = None if args.only is None else set(args.only.split(","))
    unknown = (wanted or set()) - {name for name, _ in CHECKS}
    if unknown:
        parser.error(f"--only: unknown check(s) {sorted(unknown)}; choose from {[n for n, _ in CHECKS]}")
    out = Path(args.out)
    ctx = {"args": args, "start": time.perf_counter(), "device": "cuda"}
    record = {"script": "benchmarks/gpu_check.py", "argv": sys.argv[1:] if argv is None else argv,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "checks": {}}
    for name, check in CHECKS:
        if wanted is not None and name not in wanted:
            continue
        elapsed = time.perf_counter() - ctx["start"]
        if elapsed > args.budget_s:
            record["checks"][name] = {"ok": None, "skipped": f"budget: {elapsed:.0f} s > --budget-s {args.budget_s}"}
        else:
            t0 = time.perf_counter()
            try:
                result = check(ctx)
            except Exception as err:   # record and go on: one broken check must not cost the others
                result = error_record(err)
            result["check_seconds"] = time.perf_counter() - t0
            record["checks"][name] = result
            print(f"gpu_check: {name}: ok={result.get('ok')} ({result['check_seconds']:.1f} s)"
                  + (f" {result['error']}" if result.get("error") else ""), flush=True)
        record["total_seconds"] = time.perf_counter() - ctx["start"]
        write_json(out, record)
    record["all_ok"] = all(c.get("ok") is True for c in record["checks"].values())
    write_json(out, record)
    print(f"gpu_check: wrote {out} (all ok: {record['all_ok']})")
    return 0 if record["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
