"""Understanding at adaptive lengths: accuracy vs the image tokens an LM reads, and t2i lengths per class.

Two measurements on a VLM trained by ``train_vlm`` with class-name captions (``--data.direction mixed``:
it both reads images, ``<image>a sneaker``, and writes them, ``a sneaker<image>``):

1. **Understanding.** Held-out images go through the processor -> ``generate`` path a user takes
   (``AdaTokVLMForCausalLM.caption``: the i2t prompt, greedy decoding, KV cache). A prediction is right
   when the generated text is exactly the class's caption. Every length rule runs side by side in one
   process on the same images: ``auto`` (the policy), fixed ``m``, fixed at the policy's mean length on
   these images, and two quality-dial settings (``{"max_mse": x}``). Per rule: accuracy, the image tokens
   the LM reads per image, and the prefill time per image (one forward over one image's prompt + image
   tokens, the median of 3, AdaTok's encoding excluded; CPU time of this process on a CPU, wall time on
   CUDA). Generation itself runs in left-padded batches.
2. **Text-to-image lengths per class.** The policy's lengths on held-out images of each class (the
   distribution the LM was trained on) against the lengths the LM chooses when it stops by itself
   (``generate_images`` from the class caption, greedy stop): per-class means, the 1-Wasserstein
   distance between the two samples, and the Spearman correlation of the per-class means.

    # a tokenizer with a policy (stage 1 + stage 2), then the VLM (tiny Llama, char tokenizer):
    python -m adatok_vlm.training.train_vlm --config configs/vlm/tiny.yaml --tokenizer TOK \\
        --output_dir OUT --data.direction mixed --max_steps 1500
    python benchmarks/vlm_understanding.py --vlm OUT/model --name tiny-llama \\
        --out benchmarks/results/vlm_understanding.json            # + .md beside it

``--vlm`` may be repeated (``--name`` once per model, in order): each model is one block of rows.
``--merge A.json B.json --out C.json`` combines earlier runs (same data settings) into one file, so models
trained at different times can be measured as each becomes ready; the markdown lists each run's command.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from adatok_vlm.training.flags import FlagParser
from adatok_vlm.training.results import write_results

CPU_CLOCK_NOTE = "CPU time of this process, robust on a shared machine"


# ============================================================================================
# helpers
# ============================================================================================
def make_clock(device: str):
    """``(name, now)``: process CPU time on a CPU, wall time (after a sync) on CUDA."""
    if str(device).startswith("cuda"):
        def now():
            torch.cuda.synchronize()
            return time.perf_counter()
        return "wall", now
    return "cpu", time.process_time


def rule_name(rule) -> str:
    if isinstance(rule, dict):
        key, value = next(iter(rule.items()))
        return f"{key}={value:g}"
    return str(rule)


def length_rules(adatok, pixel_values: torch.Tensor, dial: tuple[float, ...] = (0.02, 0.04)) -> list[tuple[str, object]]:
    """The rules compared: ``auto``, fixed ``m``, fixed at the policy's (rounded) mean on these images, and
    the quality dial at each ``dial`` MSE. ``pixel_values`` are the evaluation images (for the mean)."""
    m = adatok.num_latent_tokens
    with torch.no_grad():
        auto = adatok.encode(pixel_values.to(adatok.device), num_tokens="auto").lengths.float()
    mean = max(1, min(m, int(round(float(auto.mean())))))
    rules = [("auto", "auto"), (f"fixed m={m}", m), (f"fixed mean={mean}", mean)]
    rules += [(f"dial max_mse={x:g}", {"max_mse": float(x)}) for x in dial]
    return rules


def _rows(inputs: dict, lo: int, hi: int) -> dict:
    """Rows ``lo:hi`` of a processor batch with one image per row: ids, mask (left padding trimmed) and the
    matching packed image tokens."""
    lengths = inputs["image_lengths"]
    start, stop = int(lengths[:lo].sum()), int(lengths[:hi].sum())
    mask = inputs["attention_mask"][lo:hi]
    keep = int(mask.sum(1).max())
    return {"input_ids": inputs["input_ids"][lo:hi, -keep:], "attention_mask": mask[:, -keep:],
            "image_tokens": inputs["image_tokens"][start:stop], "image_lengths": lengths[lo:hi]}


# ============================================================================================
# understanding: exact-match accuracy, image tokens, prefill time
# ============================================================================================
@torch.no_grad()
def understanding_eval(vlm, processor, images, labels, captions: list[str], num_image_tokens, *,
                       prompt_template: str = "{image}", batch_size: int = 16, max_new_tokens: int | None = None,
                       clock=None, repeats: int = 3, prefill_batch_size: int = 1) -> dict:
    """Caption each image with ``vlm.caption``'s path and score exact matches against ``captions[label]``.

    Args:
        images: a float tensor ``[N, 3, H, W]`` in [0, 1] (or a list the image processor reads).
        labels: ``N`` class ids; ``captions``: one caption per class (what the VLM was trained to write).
        num_image_tokens: the length rule (``"auto"``, an int, a dial dict).
        prompt_template: the i2t prompt (``train_vlm``'s default i2t layout is ``<image>{caption}``, so the
            prompt is the image alone).
        clock: ``now()`` for the prefill timing (default: :func:`make_clock` of the model's device).
        repeats: prefill forwards per batch; the median is kept.
        prefill_batch_size: images per timed prefill forward (1: each image's own cost, no padding to the
            longest image of a batch).
    Returns:
        ``accuracy``, ``mean_image_tokens``, ``prefill_ms_per_image``, ``num_images`` and ``predictions``.
    """
    labels = [int(x) for x in labels]
    n = len(labels)
    if clock is None:
        clock = make_clock(str(vlm.language_model.device))[1]
    max_new = max_new_tokens or 2 + max(len(processor.tokenizer(c, add_special_tokens=False)["input_ids"])
                                        for c in captions)
    text, text_kwargs = vlm.answer_prompt(processor, "", prompt_template, chat=False)
    device = vlm.language_model.device
    predictions, tokens, prefill = [], 0, 0.0
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        count = len(batch)
        inputs = processor(text=[text] * count, images=batch, num_image_tokens=num_image_tokens,
                           padding_side="left", **text_kwargs)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        tokens += int(inputs["image_lengths"].sum())
        for lo in range(0, count, prefill_batch_size):
            # prefill timed in its own (default: one-image) batches: a padded batch costs its longest image
            part = _rows(inputs, lo, lo + prefill_batch_size)
            times = []
            for _ in range(repeats):   # the median of a few: single small forwards are noisy on a shared CPU
                t0 = clock()
                vlm(**part, use_cache=True, logits_to_keep=1)
                times.append(clock() - t0)
            prefill += float(np.median(times))
        tok = processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = vlm.generate(**inputs, max_new_tokens=max_new, do_sample=False, pad_token_id=pad,
                           eos_token_id=tok.eos_token_id)
        predictions += [t.strip() for t in tok.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                             skip_special_tokens=True)]
    correct = sum(p == captions[y].strip() for p, y in zip(predictions, labels))
    return {"accuracy": correct / n, "mean_image_tokens": tokens / n, "prefill_ms_per_image": 1000 * prefill / n,
            "num_images": n, "predictions": predictions}


# ============================================================================================
# text-to-image: the LM's own lengths against the data's, per class
# ============================================================================================
@torch.no_grad()
def t2i_length_comparison(vlm, tokenizer, captions: list[str], data_lengths: dict[int, list[int]], *,
                          template: str = "{caption}<image>", add_bos: bool | None = None, per_class: int = 16,
                          batch_size: int = 32, seed: int = 0) -> dict:
    """Per class: the data's lengths (``data_lengths[c]``, the policy's on held-out images) against the lengths
    ``vlm.generate_images`` writes from the caption when it stops by itself (greedy stop decision).

    Returns per-class means and 1-Wasserstein distances, their averages and the Spearman correlation of the
    per-class means (``nan`` when either side has a single distinct mean).
    """
    from scipy.stats import spearmanr, wasserstein_distance

    from adatok_vlm.vlm_data import left_pad, prompt_ids

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = vlm.language_model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = [c for c in sorted(data_lengths) for _ in range(per_class)]
    chosen: dict[int, list[int]] = {c: [] for c in data_lengths}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, mask = left_pad([prompt_ids(tokenizer, captions[c], template, add_bos) for c in chunk], pad)
        enc = vlm.generate_images(ids.to(device), mask.to(device), generator=generator)
        for c, length in zip(chunk, enc.lengths.tolist()):
            chosen[c].append(int(length))
    per_class = []
    for c in sorted(data_lengths):
        data, lm = np.asarray(data_lengths[c], float), np.asarray(chosen[c], float)
        per_class.append({"class": c, "caption": captions[c], "data_mean": float(data.mean()),
                          "lm_mean": float(lm.mean()), "data_std": float(data.std()), "lm_std": float(lm.std()),
                          "wasserstein": float(wasserstein_distance(data, lm)), "num_data": len(data),
                          "num_lm": len(lm)})
    data_means = [r["data_mean"] for r in per_class]
    lm_means = [r["lm_mean"] for r in per_class]
    rho = float("nan")
    if len(set(data_means)) > 1 and len(set(lm_means)) > 1:
        rho = float(spearmanr(data_means, lm_means).statistic)
    return {"per_class": per_class, "spearman_class_means": rho,
            "mean_wasserstein": float(np.mean([r["wasserstein"] for r in per_class])),
            "data_mean": float(np.mean([x for v in data_lengths.values() for x in v])),
            "lm_mean": float(np.mean([x for v in chosen.values() for x in v])),
            "distinct_data_lengths": len({x for v in data_lengths.values() for x in v})}


# ============================================================================================
# the benchmark
# ============================================================================================
def held_out(dataset: str, split: str, image_processor, limit: int, seed: int):
    """``(pixel_values [N, 3, S, S], labels [N])``: ``limit`` images drawn from ``split`` (fixed ``seed``)."""
    from adatok_vlm.training.data import load_image_dataset

    ds = load_image_dataset(dataset, split=split)
    order = np.random.default_rng(seed).permutation(len(ds))[:limit]
    rows = ds.select(sorted(int(i) for i in order))
    pixels = image_processor([r["image"] for r in rows], return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor([int(r["label"]) for r in rows])


def issue_targets(rows: list[dict], t2i: dict, m: int) -> dict:
    """The issue's goals, as checks: at ``auto``, accuracy within 1 point of fixed ``m`` with at most half of its
    image tokens; per-class t2i means tracking the data's (Spearman >= 0.8)."""
    by_rule = {r["rule"]: r for r in rows}
    auto, fixed = by_rule["auto"], by_rule[f"fixed m={m}"]
    rho = t2i["spearman_class_means"]
    return {"auto_accuracy_within_1pt_of_fixed_m": auto["accuracy"] >= fixed["accuracy"] - 0.01,
            "auto_tokens_at_most_half_of_fixed_m": auto["mean_image_tokens"] <= fixed["mean_image_tokens"] / 2,
            "t2i_spearman_of_class_means_ge_0.8": bool(rho == rho and rho >= 0.8)}


def run_model(name: str, model_dir: str, args, clock) -> dict:
    from adatok_vlm.sample_t2i import load_for_sampling
    from adatok_vlm.vlm_data import DEFAULT_TEMPLATES

    vlm, processor, info = load_for_sampling(model_dir, args.device)
    captions = info.get("captions")
    if not captions:
        raise ValueError(f"--vlm {model_dir}: no class captions in vlm_training.json; train on a labelled data set")
    if not vlm.adatok.has_policy:
        raise ValueError(f"--vlm {model_dir}: its AdaTok has no length policy; 'auto' and the dial need one")
    pixels, labels = held_out(args.dataset, args.split, processor.image_processor, args.num_images, args.seed)
    i2t = info.get("i2t_template", DEFAULT_TEMPLATES["i2t"])
    prompt_template = i2t.split("{caption}")[0].replace("<image>", "{image}")
    rows = []
    rules = length_rules(vlm.adatok, pixels, tuple(args.dial))
    understanding_eval(vlm, processor, pixels[:4], labels[:4], captions, "auto", prompt_template=prompt_template,
                       batch_size=args.batch_size, clock=clock)   # warm-up
    for label, rule in rules:
        r = understanding_eval(vlm, processor, pixels, labels, captions, rule, prompt_template=prompt_template,
                               batch_size=args.batch_size, clock=clock)
        rows.append({"rule": label, "num_image_tokens": rule if not isinstance(rule, dict) else rule,
                     **{k: v for k, v in r.items() if k != "predictions"}})
        print(f"{name:14s} {label:20s} acc {r['accuracy']:.3f}  tokens/image {r['mean_image_tokens']:6.2f}  "
              f"prefill {r['prefill_ms_per_image']:.3f} ms/image")
    with torch.no_grad():
        lengths = vlm.adatok.encode(pixels.to(vlm.adatok.device), num_tokens="auto").lengths.cpu()
        quality = {}   # how much the AdaTok's reconstructions gain from more tokens (context for the rows)
        for n in sorted({1, 4, 8, 16, vlm.adatok.num_latent_tokens}):
            if n <= vlm.adatok.num_latent_tokens:
                enc = vlm.adatok.encode(pixels.to(vlm.adatok.device), num_tokens=n)
                recon = vlm.adatok.decode(enc.tokens, enc.lengths).cpu()
                quality[n] = float((recon.float() - pixels.float()).pow(2).mean())
    data_lengths = {c: lengths[labels == c].tolist() for c in sorted(set(labels.tolist()))}
    t2i = t2i_length_comparison(vlm, processor.tokenizer, captions, data_lengths,
                                template=info.get("t2i_template", DEFAULT_TEMPLATES["t2i"]),
                                add_bos=info.get("add_bos"), per_class=args.per_class, batch_size=args.batch_size,
                                seed=args.seed)
    print(f"{name:14s} t2i lengths: data mean {t2i['data_mean']:.2f}, LM mean {t2i['lm_mean']:.2f}, "
          f"W1 {t2i['mean_wasserstein']:.2f}, Spearman {t2i['spearman_class_means']:.3f}")
    targets = issue_targets(rows, t2i, vlm.config.max_image_tokens)
    return {"name": name, "model": str(model_dir), "targets": targets, "training": {k: info.get(k) for k in ("steps", "direction",
                                                                                          "finetune", "tokenizer")},
            "lm": type(vlm.language_model).__name__, "lm_parameters": vlm.language_model.num_parameters(),
            "max_image_tokens": vlm.config.max_image_tokens, "tokenizer_rmse_by_length": quality,
            "understanding": rows, "t2i_lengths": t2i}


def markdown(result: dict) -> str:
    lines = ["# Understanding at adaptive lengths", "",
             f"{result['num_images']} held-out {result['dataset']} ({result['split']}) images, exact match of the "
             f"generated class caption, greedy; prefill = one forward over one image's prompt + image tokens "
             f"({result['clock']}, {result['device']}, {result['threads']} thread(s)).", "",
             "| model | length rule | accuracy | image tokens / image | prefill ms / image |",
             "| --- | --- | ---: | ---: | ---: |"]
    for model in result["models"]:
        for r in model["understanding"]:
            lines.append(f"| {model['name']} | {r['rule']} | {r['accuracy']:.3f} | {r['mean_image_tokens']:.2f} | "
                         f"{r['prefill_ms_per_image']:.3f} |")
    lines.append("")
    for model in result["models"]:
        q = ", ".join(f"{n}: {v:.4f}" for n, v in model["tokenizer_rmse_by_length"].items())
        lines.append(f"{model['name']}: {model['lm']} ({model['lm_parameters']:,} parameters), "
                     f"{model['training'].get('steps')} steps ({model['training'].get('direction')}); its AdaTok's "
                     f"reconstruction MSE by token count on these images: {q}.")
    for model in result["models"]:
        lines.append(f"{model['name']} targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                                            for k, v in model.get("targets", {}).items()) + ".")
    lines += ["", "## Text-to-image lengths per class (data = policy on held-out images; LM = its own [EOI])", ""]
    for model in result["models"]:
        t = model["t2i_lengths"]
        lines += [f"**{model['name']}**: data mean {t['data_mean']:.2f}, LM mean {t['lm_mean']:.2f}, mean W1 "
                  f"{t['mean_wasserstein']:.2f}, Spearman of per-class means {t['spearman_class_means']:.3f} "
                  f"({t['distinct_data_lengths']} distinct data lengths)", "",
                  "| class | data mean | LM mean | W1 |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['caption']} | {r['data_mean']:.2f} | {r['lm_mean']:.2f} | {r['wasserstein']:.2f} |"
                  for r in t["per_class"]]
        lines.append("")
    if result.get("note"):
        lines += [result["note"], ""]
    commands = result.get("commands", [result["command"]])
    lines += [f"Command{'s' if len(commands) > 1 else ''}: " + "; ".join(f"`{c}`" for c in commands), ""]
    return "\n".join(lines)


# the fields two runs must share to be merged into one table
MERGE_KEYS = ("dataset", "split", "num_images", "per_class", "device", "threads", "clock", "seed")


def merge_results(results: list[dict], note: str = "") -> dict:
    """One result from several runs' JSON (each with its ``models``): the models in order, each run's command.

    Raises ValueError when the runs differ in a data or measurement setting (``MERGE_KEYS``): their rows would
    not be comparable side by side.
    """
    if not results:
        raise ValueError("merge_results: expected at least one result, got none")
    first = results[0]
    for r in results[1:]:
        differ = {k: (first.get(k), r.get(k)) for k in MERGE_KEYS if first.get(k) != r.get(k)}
        if differ:
            raise ValueError(f"--merge: the runs differ in {differ}; merge only runs with the same settings")
    commands = [c for r in results for c in r.get("commands", [r["command"]])]
    merged = {**first, "models": [m for r in results for m in r["models"]], "commands": commands,
              "command": commands[0], "note": note or first.get("note", "")}
    return merged


def write_result(result: dict, out) -> None:
    """``out`` (JSON; an undefined Spearman, a non-finite number, as null) and the markdown beside it."""
    paths = write_results(out, result, markdown(result))
    print(f"wrote {paths[0]} and {paths[1]}")


def parse_args(argv=None) -> argparse.Namespace:
    p = FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vlm", action="append", default=[], help="a train_vlm export (<output_dir>/model); repeat")
    p.add_argument("--merge", nargs="+", default=[], help="earlier runs' JSON files to combine into --out "
                                                          "(instead of --vlm)")
    p.add_argument("--name", action="append", default=[], help="a row name per --vlm")
    p.add_argument("--out", default="outputs/bench/vlm_understanding.json", help="JSON file; the .md goes beside it")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--split", default="test", help="held-out split (the VLM trained on 'train')")
    p.add_argument("--num_images", type=int, default=500, help="held-out images scored per rule")
    p.add_argument("--per_class", type=int, default=16, help="t2i: images generated per class")
    p.add_argument("--dial", type=float, nargs=2, default=[0.02, 0.04],
                   help="two max_mse settings of the dial (pick values the tokenizer's curve spans)")
    p.add_argument("--batch_size", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="a line for the markdown (how the models were trained)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import sys

    args = parse_args(argv)
    if bool(args.vlm) == bool(args.merge):
        raise SystemExit("give either --vlm (one or more models to measure) or --merge (earlier JSON results)")
    if args.merge:
        result = merge_results([json.loads(Path(f).read_text()) for f in args.merge], note=args.note)
        result["commands"].append(f"python benchmarks/vlm_understanding.py --merge {' '.join(args.merge)} --out "
                                  f"{args.out}" + (" --note NOTE (the note above)" if args.note else ""))
        write_result(result, args.out)
        return result
    if args.name and len(args.name) != len(args.vlm):
        raise SystemExit("--name: give one per --vlm, or none")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    clock_name, clock = make_clock(args.device)
    names = args.name or [Path(v).parent.name for v in args.vlm]
    models = [run_model(n, v, args, clock) for n, v in zip(names, args.vlm)]
    result = {"dataset": args.dataset, "split": args.split, "num_images": args.num_images,
              "per_class": args.per_class, "device": args.device, "threads": args.threads,
              "clock": CPU_CLOCK_NOTE if clock_name == "cpu" else "wall", "platform": platform.platform(),
              "torch": torch.__version__, "seed": args.seed, "note": args.note, "models": models,
              "command": "python benchmarks/vlm_understanding.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
