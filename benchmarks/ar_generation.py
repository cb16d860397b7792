"""Autoregressive image generation: stopping at [EOI] vs always writing m tokens, KV cache on vs off.

AdaTok's claim for generation (paper Sec. 5 and Limitations a): when an LM emits ``[EOI]`` after the
length the policy would have chosen, an image costs ``L`` steps instead of ``m``, so generation speeds up
by about ``L_max / mean(L)``. This script measures that on one tiny, randomly initialised VLM whose
lengths are controlled: each image's length is drawn from a skewed histogram (log-normal, like a
policy's) and forced through ``num_image_tokens`` (the same ``[EOI]`` path as a trained LM's own stop),
against the same model forced to ``m`` tokens. Every configuration runs in one process, after a warm-up,
on the same prompts and lengths.

    python benchmarks/ar_generation.py --out outputs/bench/ar_generation.json   # ~1 min on 2 CPU cores; + .md

Writes JSON (settings, length histogram, one row per configuration) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from adatok_vlm import AdaTokConfig, AdaTokModel
from adatok_vlm.modeling_vlm import AdaTokVLMForCausalLM
from adatok_vlm.training.flags import FlagParser
from adatok_vlm.training.results import write_results

PROMPT_WORDS = ["a", "cat", "dog", "red", "blue", "small", "large", "shoe", "bag", "shirt", "on", "the", "grass"]
TARGET_TOLERANCE = 0.2  # measured speed-up within 20% of L_max / mean(L)
FORCED_LENGTHS_NOTE = ("What this measures: a random, untrained VLM whose lengths are drawn from the histogram and "
                       "forced through `num_image_tokens` (`[EOI]` is written after L sampled tokens), against the "
                       "same model forced to m: the cost of L generation steps instead of m. A trained LM's own stop "
                       "decision is not measured here.")


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/bench/ar_generation.json", help="JSON file; the .md table goes beside it")
    p.add_argument("--num_images", type=int, default=32, help="images timed per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed images before each configuration")
    p.add_argument("--batch_size", type=int, default=1, help="prompts per generate_images call")
    p.add_argument("--max_tokens", type=int, default=32, help="m: AdaTok's num_latent_tokens")
    p.add_argument("--median_tokens", type=float, default=8.0, help="median of the log-normal length histogram")
    p.add_argument("--sigma", type=float, default=0.6, help="log-space spread of the length histogram")
    p.add_argument("--prompt_words", type=int, default=32, help="mean prompt length in words (uniform 1..2x-1)")
    p.add_argument("--hidden", type=int, default=256, help="LM hidden size")
    p.add_argument("--layers", type=int, default=4, help="LM layers")
    p.add_argument("--flow_steps", type=int, default=10, help="Euler steps of the flow head per token")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for tiny models)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="auto: process CPU time on CPU (robust on shared machines), wall time on CUDA")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------------------------------
def build_model(args) -> tuple[AdaTokVLMForCausalLM, PreTrainedTokenizerFast]:
    """A tiny Llama given the image modality (random weights: speed does not depend on them)."""
    words = ["<pad>", "<s>", "</s>", "<unk>", *PROMPT_WORDS]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", padding_side="left")
    torch.manual_seed(args.seed)
    heads = max(1, args.hidden // 32)
    lm = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=len(tok),
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    adatok = AdaTokModel(AdaTokConfig.from_preset(
        "adatok-tiny", hidden_size=32, decoder_hidden_size=32, num_attention_heads=2, decoder_num_attention_heads=2,
        num_encoder_layers=1, num_decoder_layers=1, num_latent_tokens=args.max_tokens))
    vlm = AdaTokVLMForCausalLM.from_text_model(lm, adatok, tok, num_flow_steps=args.flow_steps)
    return vlm.to(args.device).eval(), tok


def draw_lengths(n: int, args, generator: torch.Generator) -> torch.LongTensor:
    """A skewed (log-normal) length histogram, clipped to 1..m: many short images, a long tail."""
    log_l = math.log(args.median_tokens) + args.sigma * torch.randn(n, generator=generator)
    return log_l.exp().round().long().clamp(1, args.max_tokens)


def draw_prompts(n: int, mean_words: int, generator: torch.Generator):
    texts = []
    for _ in range(n):
        k = int(torch.randint(1, 2 * mean_words, (1,), generator=generator))
        idx = torch.randint(len(PROMPT_WORDS), (k,), generator=generator).tolist()
        texts.append(" ".join(PROMPT_WORDS[i] for i in idx))
    return texts


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
def make_clock(kind: str, device: str):
    """``"wall"``: elapsed time (CUDA synchronised). ``"cpu"``: CPU time of this process, which other jobs on
    a shared machine barely disturb (with one thread, ~ wall time on an idle machine)."""
    if kind == "auto":
        kind = "wall" if device.startswith("cuda") else "cpu"

    def now() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.process_time() if kind == "cpu" else time.perf_counter()

    return kind, now


def run(vlm, tok, texts, lengths, args, use_cache: bool, now) -> dict:
    """Generate every prompt's image (length = lengths[i]); return timing over the timed images."""
    device = args.device

    def generate(i0: int, i1: int):
        p = tok(texts[i0:i1], return_tensors="pt", padding=True).to(device)
        enc = vlm.generate_images(p.input_ids, p.attention_mask, num_image_tokens=lengths[i0:i1].to(device),
                                  use_cache=use_cache, seed=args.seed + i0)
        assert torch.equal(enc.lengths.cpu(), lengths[i0:i1]), "generation did not stop where it was told to"

    b = args.batch_size
    for i in range(0, args.warmup * b, b):
        generate(i, i + b)
    start = now()
    for i in range(args.warmup * b, len(texts), b):
        generate(i, i + b)
    seconds = now() - start
    timed = lengths[args.warmup * b:]
    return {"seconds": seconds, "images": len(timed), "images_per_s": len(timed) / seconds,
            "ms_per_image": 1000 * seconds / len(timed), "mean_tokens": float(timed.float().mean())}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Autoregressive generation: stop at [EOI] vs forced m",
        "",
        f"Tiny Llama (hidden {s['hidden']}, {s['layers']} layers) + flow head ({s['flow_steps']} Euler steps), "
        f"m = {s['max_tokens']}, batch {s['batch_size']}, {s['num_images']} images per row after "
        f"{s['warmup']} warm-up, {result['device']}, {s['threads']} thread(s), {result['clock']} time. "
        f"Lengths: log-normal "
        f"(median {s['median_tokens']}, sigma {s['sigma']}), mean {result['mean_length']:.2f}, so the ideal "
        + (f"speed-up L_max / mean(L) = {result['ideal_speedup']:.2f}." if s["batch_size"] == 1 else
           f"speed-up L_max / mean(longest L per batch) = {result['ideal_speedup']:.2f} (a batch runs until its "
           "longest image stops)."),
        "",
        FORCED_LENGTHS_NOTE,
        "",
        "| generation | KV cache | images/s | ms / image | mean tokens | speed-up vs forced m | / ideal |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        speed = f"{row['speedup']:.2f}x" if row.get("speedup") else "1.00x"
        ratio = f"{row['speedup'] / result['ideal_speedup']:.2f}" if row.get("speedup") else "-"
        lines.append(f"| {row['generation']} | {'on' if row['use_cache'] else 'off'} | {row['images_per_s']:.2f} | "
                     f"{row['ms_per_image']:.1f} | {row['mean_tokens']:.2f} | {speed} | {ratio} |")
    lines += ["", f"KV cache speed-up (forced m): {result['cache_speedup_forced']:.2f}x; "
              f"(stop at [EOI]): {result['cache_speedup_eoi']:.2f}x.",
              f"Target: speed-up within {int(TARGET_TOLERANCE * 100)}% of L_max / mean(L) "
              f"(KV cache on): {'met' if result['target_met'] else 'NOT met'}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    clock, now = make_clock(args.clock, args.device)
    vlm, tok = build_model(args)
    g = torch.Generator().manual_seed(args.seed)
    n = (args.num_images // args.batch_size + args.warmup) * args.batch_size
    texts = draw_prompts(n, args.prompt_words, g)
    lengths = draw_lengths(n, args, g)
    forced = torch.full_like(lengths, args.max_tokens)

    rows = []
    for generation, lens in (("stop at [EOI]", lengths), (f"forced m = {args.max_tokens}", forced)):
        for use_cache in (True, False):
            row = run(vlm, tok, texts, lens, args, use_cache, now)
            rows.append({"generation": generation, "use_cache": use_cache, **row})
            print(f"{generation:>20} | cache {'on ' if use_cache else 'off'} | {row['images_per_s']:8.2f} images/s "
                  f"| {row['ms_per_image']:8.1f} ms/image", flush=True)
    by = {(r["generation"].startswith("stop"), r["use_cache"]): r for r in rows}
    for cache in (True, False):
        by[(True, cache)]["speedup"] = by[(False, cache)]["seconds"] / by[(True, cache)]["seconds"]
    timed = lengths[args.warmup * args.batch_size:]
    if args.batch_size == 1:
        ideal = args.max_tokens / float(timed.float().mean())
    else:  # a batch runs until its longest image stops
        ideal = args.max_tokens / float(timed.view(-1, args.batch_size).amax(1).float().mean())
    result = {
        "benchmark": "ar_generation",
        "settings": {k: getattr(args, k) for k in ("num_images", "warmup", "batch_size", "max_tokens", "median_tokens",
                                                   "sigma", "prompt_words", "hidden", "layers", "flow_steps",
                                                   "threads", "seed")},
        "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()}, "
                                                             f"{os.cpu_count()} cores)",
        "torch": torch.__version__,
        "clock": clock,
        "length_histogram": {int(k): int(v) for k, v in zip(*torch.unique(timed, return_counts=True))},
        "mean_length": float(timed.float().mean()),
        "ideal_speedup": ideal,
        "rows": rows,
        "cache_speedup_forced": by[(False, False)]["seconds"] / by[(False, True)]["seconds"],
        "cache_speedup_eoi": by[(True, False)]["seconds"] / by[(True, True)]["seconds"],
    }
    result["target_met"] = abs(by[(True, True)]["speedup"] / ideal - 1) <= TARGET_TOLERANCE
    table = markdown(result)
    write_results(args.out, result, table)
    print(table)
    return result


if __name__ == "__main__":
    main()
