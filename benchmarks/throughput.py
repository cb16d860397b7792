"""Encode, decode and round-trip throughput of the tokenizer presets, fp32 and bf16, side by side in one process.

    python benchmarks/throughput.py                                              # every preset, batch 8
    python benchmarks/throughput.py --batch_size 2 --presets adatok-tiny,adatok-s --repeats 2 --threads 1

Random weights of the real architectures (the VAE presets' VA-VAE f16d32 too: nothing is downloaded). For
each preset, ``--batch_size`` images of its size, eval mode, no gradients, and each precision (``fp32``;
``bf16``: the whole call under ``torch.autocast(bfloat16)``, weights kept in fp32), it times:

* ``encode``: ``model.encode(pixels, num_tokens=m)``, and ``vae_encoder``: ``model.latent_space.encode``
  alone, so the VAE's share of an encode is ``vae_encoder / encode``;
* ``decode``: ``model.decode(tokens, lengths)`` at the full length ``m``, and ``vae_decoder``:
  ``model.latent_space.decode`` alone (its share of a decode);
* ``round_trip``: encode then decode, in one timed call;
* ``decode@L`` and ``decoder@L`` for L in m/8, m/2, m: a whole decode of every image at L kept tokens,
  and the transformer decoder alone (``model.forward_decoder``). The decoder runs on the kept prefix
  only, so its cost falls with L; the VAE decode after it does not depend on L;
* ``vae_encoder_nchw`` / ``vae_decoder_nchw`` (VAE presets): the VAE alone with its default channels-last
  layout switched off, for the layout's speed-up.

Each timed call runs ``--warmup`` untimed times, then ``--repeats`` timed ones: the calls of one repeat
interleaved across precisions (and ops), so the machine's load hits all of them alike; the medians are
reported. On a CPU the process CPU seconds stand beside the wall seconds (on a shared machine the wall time
includes waiting for a core), and the 1-minute load average is sampled before every call. Writes FILE.json
and FILE.md (``--out``), with the machine, the threads and ``uptime``.

``benchmarks/gpu_check.py`` imports its timing and encode/decode measurement from here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from adatok_vlm.training.flags import FlagParser
from adatok_vlm.training.results import write_results

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("adatok-tiny", "adatok-s", "adatok-b", "adatok-l")
PRECISIONS = ("fp32", "bf16")


# ---------------------------------------------------------------------------------------------
# timing helpers (gpu_check.py uses these too)
# ---------------------------------------------------------------------------------------------
def synchronize() -> None:
    """Wait for queued CUDA work (a no-op without CUDA), so a timer stops when the work is done."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_call(fn) -> tuple[float, float, object]:
    """``(wall seconds, process CPU seconds, what fn returned)`` of one synchronised call of ``fn()``."""
    synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` synchronised calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_call(fn)[0] for _ in range(repeats))


def structured_images(count: int, size: int, seed: int, device) -> torch.Tensor:
    """``[count, 3, size, size]`` in [0, 1]: smooth random colour patterns (learnable, unlike noise)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    freq = torch.rand(count, 3, 2, generator=g) * 6 + 1
    phase = torch.rand(count, 3, 1, 1, generator=g) * 6.3
    images = 0.5 + 0.4 * torch.sin(freq[..., 0, None, None] * 6.3 * xx + freq[..., 1, None, None] * 6.3 * yy + phase)
    return images.clamp(0, 1).to(device)


def precision_context(precision: str, device: str):
    """``fp32``: nothing; ``bf16``: ``torch.autocast(device, bfloat16)`` (weights stay fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def kept_lengths(m: int) -> list[int]:
    """The kept lengths the decode-cost rows use: m/8, m/2 and m (at least 1, no repeats)."""
    return sorted({max(1, m // 8), max(1, m // 2), m})


# ---------------------------------------------------------------------------------------------
# the measurement
# ---------------------------------------------------------------------------------------------
def model_calls(model, pixels: torch.Tensor) -> dict:
    """The timed calls of one model: ``{name: fn}`` (see the module docstring); the caller runs them under
    ``no_grad``."""
    m = model.num_latent_tokens
    b = pixels.shape[0]
    with torch.no_grad():
        tokens = model.encode(pixels, num_tokens=m).tokens                  # [B, m, D]
        latents = model.latent_space.encode(pixels)                         # [B, C, h, w]
    full = torch.full((b,), m, dtype=torch.long, device=tokens.device)
    calls = {
        "encode": lambda: model.encode(pixels, num_tokens=m),
        "vae_encoder": lambda: model.latent_space.encode(pixels),
        "decode": lambda: model.decode(tokens, full),
        "vae_decoder": lambda: model.latent_space.decode(latents),
        "round_trip": lambda: model.decode(*model.encode(pixels, num_tokens=m).to_tuple()[:2]),
    }
    for length in kept_lengths(m):
        lengths = torch.full((b,), length, dtype=torch.long, device=tokens.device)
        if length != m:   # decode@m is "decode"
            calls[f"decode@{length}"] = lambda t=tokens[:, :length], n=lengths: model.decode(t, n)
        calls[f"decoder@{length}"] = lambda t=tokens[:, :length], n=lengths: model.forward_decoder(t, n)
    space = model.latent_space
    if getattr(space, "channels_last", False):   # the VAE's default NHWC layout against plain NCHW
        calls["vae_encoder_nchw"] = lambda: nchw(space, lambda: space.encode(pixels))
        calls["vae_decoder_nchw"] = lambda: nchw(space, lambda: space.decode(latents))
    return calls


def nchw(space, fn):
    """``fn()`` with the VAE latent space's channels-last layout switched off for the call."""
    space.channels_last = False
    try:
        return fn()
    finally:
        space.channels_last = True


def measure_model(model, pixels: torch.Tensor, precisions=PRECISIONS, repeats: int = 2, warmup: int = 1,
                  device: str = "cpu", loads: list | None = None) -> dict:
    """Time :func:`model_calls` of ``model`` on ``pixels`` at each precision, interleaved within every repeat.

    Returns ``{precision: {"ops": {name: {"wall_s", "cpu_s", "images_per_second"}}, "vae_share": {...},
    "decode_by_length": {...}}, "kept_lengths": [...], "bf16_vs_fp32_round_trip": {...}}`` (medians over the
    repeats; ``images_per_second`` is ``batch / wall_s``; the round trip's difference, in pixels in [0, 1],
    when both precisions ran). ``loads``, when given, collects the 1-minute load
    average sampled before every timed call.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    model.eval()
    b, m = pixels.shape[0], model.num_latent_tokens
    calls = model_calls(model, pixels)
    jobs = [(precision, name, fn) for precision in precisions for name, fn in calls.items()]
    for precision, _, fn in jobs:
        for _ in range(warmup):
            with torch.no_grad(), precision_context(precision, device):
                fn()
    samples = {(precision, name): [] for precision, name, _ in jobs}
    round_trips = {}   # the last reconstruction at each precision, for the bf16-vs-fp32 difference
    for _ in range(repeats):
        for precision, name, fn in jobs:
            if loads is not None and hasattr(os, "getloadavg"):
                loads.append(os.getloadavg()[0])
            with torch.no_grad(), precision_context(precision, device):
                wall, cpu, out = timed_call(fn)
            samples[(precision, name)].append((wall, cpu))
            if name == "round_trip":
                round_trips[precision] = out
    result = {"batch_size": b, "num_tokens": m, "kept_lengths": kept_lengths(m), "repeats": repeats,
              "warmup": warmup}
    for precision in precisions:
        ops = {}
        for name in calls:
            wall = statistics.median(s[0] for s in samples[(precision, name)])
            cpu = statistics.median(s[1] for s in samples[(precision, name)])
            ops[name] = {"wall_s": wall, "cpu_s": cpu, "images_per_second": b / wall}
        share = {"encode": ops["vae_encoder"]["wall_s"] / ops["encode"]["wall_s"],
                 "decode": ops["vae_decoder"]["wall_s"] / ops["decode"]["wall_s"],
                 "round_trip": (ops["vae_encoder"]["wall_s"] + ops["vae_decoder"]["wall_s"])
                               / ops["round_trip"]["wall_s"]}
        by_length = {"decode_images_per_second": {}, "decoder_images_per_second": {}}
        for length in kept_lengths(m):
            whole = "decode" if length == m else f"decode@{length}"
            by_length["decode_images_per_second"][str(length)] = ops[whole]["images_per_second"]
            by_length["decoder_images_per_second"][str(length)] = ops[f"decoder@{length}"]["images_per_second"]
        result[precision] = {"ops": ops, "vae_share": share, "decode_by_length": by_length}
        if "vae_encoder_nchw" in ops:
            result[precision]["vae_channels_last_speedup"] = {
                f"{part}_{clock}": ops[f"vae_{part}_nchw"][clock] / ops[f"vae_{part}"][clock]
                for part in ("encoder", "decoder") for clock in ("wall_s", "cpu_s")}
    if "fp32" in round_trips and "bf16" in round_trips:
        diff = (round_trips["bf16"].float() - round_trips["fp32"].float()).abs()
        result["bf16_vs_fp32_round_trip"] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
    return result


# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def uptime() -> str | None:
    """``uptime``'s line (the load averages a reader needs to judge the numbers), or None without it."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(device: str, threads: int) -> dict:
    info = {"device": device, "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": threads,
            "torch": torch.__version__, "python": platform.python_version()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def markdown(r: dict) -> str:
    mach, load = r["machine"], r["load_average_1min"]
    lines = [
        f"# Tokenizer throughput (batch {r['batch_size']}, {mach['device']}, {mach['torch_threads']} thread(s))",
        "",
        f"Random weights of the real architectures; presets run: {', '.join(r['presets'])}. Median of "
        f"{r['repeats']} repeat(s) after {r['warmup']} warm-up, fp32 and bf16 autocast interleaved in one "
        f"process. Machine: {mach['cpu']}, {mach['cpu_count']} CPUs, torch {mach['torch']}. 1-minute load "
        f"average during the run {load['min']:.2f}-{load['max']:.2f} (`uptime` before: {r['uptime_before']}; "
        f"after: {r['uptime_after']}).",
        "",
        "Images/s are wall-clock; on a shared machine the process CPU seconds per image (the work itself) are "
        "steadier, and the VAE's share is given by both clocks (wall / CPU).",
        "",
        "| preset | precision | encode img/s | decode img/s | round trip img/s | encode CPU s/img | "
        "decode CPU s/img | VAE share of encode | VAE share of decode |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for preset, entry in r["results"].items():
        b = entry["batch_size"]
        for precision in r["precisions"]:
            ops = entry[precision]["ops"]

            def share(part, whole):
                if entry["latent_space"] != "vae":
                    return "(pixels)"
                return " / ".join(f"{100 * ops[part][k] / ops[whole][k]:.0f}%" for k in ("wall_s", "cpu_s"))

            lines.append(f"| {preset} | {precision} | {ops['encode']['images_per_second']:.3g} | "
                         f"{ops['decode']['images_per_second']:.3g} | {ops['round_trip']['images_per_second']:.3g} | "
                         f"{ops['encode']['cpu_s'] / b:.3g} | {ops['decode']['cpu_s'] / b:.3g} | "
                         f"{share('vae_encoder', 'encode')} | {share('vae_decoder', 'decode')} |")
    lines += ["", "Decode cost against the kept length L: the whole decode, and the transformer decoder alone (it "
              "runs on the kept prefix only; the VAE decode after it is the same at every L):", "",
              "| preset | precision | L | decode img/s | decoder alone img/s | decoder alone CPU ms/img |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for preset, entry in r["results"].items():
        for precision in r["precisions"]:
            by, ops = entry[precision]["decode_by_length"], entry[precision]["ops"]
            for length in entry["kept_lengths"]:
                cpu_ms = 1e3 * ops[f"decoder@{length}"]["cpu_s"] / entry["batch_size"]
                lines.append(f"| {preset} | {precision} | {length} | {by['decode_images_per_second'][str(length)]:.3g} "
                             f"| {by['decoder_images_per_second'][str(length)]:.3g} | {cpu_ms:.3g} |")
    layout = [(preset, precision, entry[precision]["vae_channels_last_speedup"])
              for preset, entry in r["results"].items() for precision in r["precisions"]
              if "vae_channels_last_speedup" in entry[precision]]
    if layout:
        lines += ["", "The frozen VAE's channels-last layout (the default) against NCHW: speed-up = NCHW time / "
                  "channels-last time (wall, and process CPU seconds):", "",
                  "| preset | precision | VAE encoder (wall) | VAE encoder (CPU) | VAE decoder (wall) | "
                  "VAE decoder (CPU) |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for preset, precision, x in layout:
            lines.append(f"| {preset} | {precision} | {x['encoder_wall_s']:.2f}x | {x['encoder_cpu_s']:.2f}x | "
                         f"{x['decoder_wall_s']:.2f}x | {x['decoder_cpu_s']:.2f}x |")
    lines += ["", f"`{r['command']}`"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def build_model(preset: str, device: str):
    """``preset`` with random weights (a random VAE of the real architecture where the preset has one)."""
    from adatok_vlm.tokenizer import AdaTokConfig, AdaTokModel

    overrides = {"vae_random_init": True} if AdaTokConfig.from_preset(preset).latent_space == "vae" else {}
    torch.manual_seed(0)
    return AdaTokModel(AdaTokConfig.from_preset(preset, **overrides)).to(device).eval()


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    loads = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    command = " ".join(["python benchmarks/throughput.py", *args.argv])
    record = {"script": "benchmarks/throughput.py", "command": command,
              "presets": args.presets, "precisions": args.precisions, "batch_size": args.batch_size,
              "repeats": args.repeats, "warmup": args.warmup, "weights": "random (real architectures)",
              "machine": machine(args.device, torch.get_num_threads()), "uptime_before": uptime(), "results": {}}
    for preset in args.presets:
        model = build_model(preset, args.device)
        c = model.config
        pixels = structured_images(args.batch_size, c.image_size, 0, args.device)
        print(f"throughput: {preset} ...", flush=True)
        entry = measure_model(model, pixels, args.precisions, args.repeats, args.warmup, args.device, loads)
        entry.update(latent_space=c.latent_space, image_size=c.image_size,
                     vae_channels_last=getattr(model.latent_space, "channels_last", None),
                     trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
        record["results"][preset] = entry
        del model
    loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    record["uptime_after"] = uptime()
    record["load_average_1min"] = {"min": min(loads), "max": max(loads), "mean": statistics.mean(loads),
                                   "samples": len(loads)}
    return record


def parse_args(argv=None) -> argparse.Namespace:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated tokenizer presets")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: fp32, bf16")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls of each op (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each op first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "throughput.json"),
                        help="the JSON file; the markdown table goes beside it (.md)")
    parser.add_argument("--markdown_only", action="store_true",
                        help="measure nothing: rewrite the .md beside --out from the JSON already there")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from adatok_vlm.tokenizer import ADATOK_PRESETS

    args.presets = [p for p in args.presets.split(",") if p]
    args.precisions = [p for p in args.precisions.split(",") if p]
    unknown = [p for p in args.presets if p not in ADATOK_PRESETS]
    if unknown or not args.presets:
        parser.error(f"--presets: unknown or none {unknown}; choose from {sorted(ADATOK_PRESETS)}")
    if not args.precisions or any(p not in PRECISIONS for p in args.precisions):
        parser.error(f"--precisions must name some of {PRECISIONS}, got {args.precisions}")
    for name in ("batch_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if args.markdown_only:
        if not out.is_file():
            raise FileNotFoundError(f"--markdown_only rewrites the table from --out's JSON, and {out} does not exist")
        record = json.loads(out.read_text(encoding="utf-8"))      # rewritten as read, the table redrawn
    else:
        record = run(args)
    write_results(out, record, markdown(record))
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
