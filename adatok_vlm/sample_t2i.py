"""Text-to-image (and class-to-image) sampling with a trained AdaTok VLM: PNGs, grids, token counts.

    adatok sample-t2i --model outputs/vlm-smollm2/model --prompt "a sneaker" --prompt "a bag" \
        --num_images 4 --seed 0 --out outputs/t2i
    adatok sample-t2i --model outputs/vlm-smollm2/model --classes all --num_images 8 --out outputs/c2i-ar
    adatok sample-c2i --generator ar --model outputs/vlm-smollm2/model --classes all --per_class 8 --out DIR

Each prompt is laid out exactly as in training (``vlm_training.json`` beside the model holds the template
and whether BOS comes first; :func:`~adatok_vlm.vlm_data.prompt_ids`), continued with ``[BOI]``, and the LM
writes image tokens through its flow head until it emits ``[EOI]`` (the length it learned from the
policy, paper Sec. 4.2; ``--min/max_image_tokens`` bound it, ``--num_image_tokens`` forces it); AdaTok
decodes them. Class-conditional AR generation is the same model with the class names' captions as
prompts (``--classes all``, ``--classes 0,7`` or ``--classes Sneaker,Bag``). ``--cfg_scale`` > 1 guides with
the empty prompt (the model saw dropped prompts in training). ``--out`` receives

* ``images/PPP_slug_KKK.png``: every image (``P`` the prompt's index, ``K`` the sample), and with
  ``--classes``, ``grid_CC_slug.png``: one grid per class;
* ``grid.png``: one row per prompt (or class);
* ``summary.json``: the arguments and, per image, its prompt, file and token count.

Each image's token count is printed as it is written.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch

from .configuration_vlm import VLM_TRAINING_INFO
from .training.flags import FlagParser
from .vlm_data import DEFAULT_TEMPLATES, left_pad, prompt_ids


# ============================================================================================
# loading
# ============================================================================================
def load_for_sampling(model_dir: str | Path, device: str = "cpu"):
    """``(vlm, processor, info)``: the VLM, its processor (text tokenizer + image processor + the VLM's AdaTok)
    and the training info (``{}`` for a model that was not written by ``train_vlm``)."""
    from transformers import AutoTokenizer

    from .tokenizer.image_processing_adatok import AdaTokImageProcessor
    from .modeling_vlm import AdaTokVLMForCausalLM
    from .processing_vlm import AdaTokVLMProcessor

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model: {model_dir} holds no config.json; pass the folder train_vlm exported "
                                "(<output_dir>/model) or any AdaTokVLMForCausalLM.save_pretrained folder")
    vlm = AdaTokVLMForCausalLM.from_pretrained(model_dir).to(device).eval()
    try:
        processor = AdaTokVLMProcessor.from_pretrained(model_dir, adatok=vlm.adatok)
    except (OSError, ValueError, TypeError):   # a bare save_pretrained folder: tokenizer files only
        tok = AutoTokenizer.from_pretrained(model_dir)
        processor = AdaTokVLMProcessor(AdaTokImageProcessor(size=vlm.config.tokenizer_config.image_size), tok,
                                       vlm.adatok)
    info_file = model_dir / VLM_TRAINING_INFO
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    return vlm, processor, info


def parse_classes(spec: str, captions: list[str] | None, class_names: list[str] | None = None) -> list[int]:
    """``"all"``, ids (``"0,7"``) or class names (``"Sneaker,Ankle boot"``, any case) -> class ids."""
    if not captions:
        raise ValueError("--classes needs the class names a model was trained on (vlm_training.json beside the "
                         "model, written by train_vlm on a labelled data set); pass --prompt instead")
    if spec == "all":
        return list(range(len(captions)))
    names = {n.lower(): i for i, n in enumerate(class_names or [])}
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part.isdigit() and int(part) < len(captions):
            out.append(int(part))
        elif part.lower() in names:
            out.append(names[part.lower()])
        else:
            raise ValueError(f"--classes: expected 'all', ids in 0..{len(captions) - 1} or class names "
                             f"{class_names}, got {part!r}")
    return out


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "empty"


# ============================================================================================
# sampling
# ============================================================================================
@torch.no_grad()
def sample(args: argparse.Namespace) -> dict:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    vlm, processor, info = load_for_sampling(args.model, device)
    tok = processor.tokenizer
    template = info.get("t2i_template", DEFAULT_TEMPLATES["t2i"])
    add_bos = info.get("add_bos")

    if args.classes:
        class_ids = parse_classes(args.classes, info.get("captions"), info.get("class_names"))
        prompts = [info["captions"][c] for c in class_ids]
        names = info.get("class_names") or prompts
        row_names = [f"{names[c]}" for c in class_ids]
    else:
        if not args.prompt:
            raise ValueError("pass at least one --prompt TEXT (or --classes all)")
        class_ids, prompts, row_names = None, list(args.prompt), list(args.prompt)

    rows = [(p, k) for p in range(len(prompts)) for k in range(args.num_images)]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    bounds = {"min_image_tokens": args.min_image_tokens, "max_image_tokens": args.max_image_tokens,
              "num_image_tokens": args.num_image_tokens}
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, pictures = [], []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start:start + args.batch_size]
        ids, mask = left_pad([prompt_ids(tok, prompts[p], template, add_bos) for p, _ in chunk], pad)
        enc = vlm.generate_images(ids.to(device), mask.to(device), num_flow_steps=args.num_steps,
                                  temperature=args.temperature, cfg_scale=args.cfg_scale, generator=generator,
                                  do_sample=args.sample_stop, **{k: v for k, v in bounds.items() if v is not None})
        images = processor.decode_images(enc)
        for (p, k), image, length in zip(chunk, images, enc.lengths.tolist()):
            path = out / "images" / f"{p:03d}_{slug(prompts[p])}_{k:03d}.png"
            image.save(path)
            pictures.append(np.asarray(image.convert("RGB")))
            records.append({"prompt": prompts[p], "class": None if class_ids is None else class_ids[p],
                            "sample": k, "file": str(path), "num_tokens": int(length)})
            print(f"{path}  tokens={length}  prompt={prompts[p]!r}")

    from .training.visualize import class_grid

    pictures = np.stack(pictures)
    labels = [p for p, _ in rows]
    class_grid(pictures, labels, out / "grid.png", row_names, max_classes=len(prompts), max_per_class=args.num_images)
    if class_ids is not None:
        for p, c in enumerate(class_ids):
            members = [i for i, label in enumerate(labels) if label == p]
            class_grid(pictures[members], [p] * len(members), out / f"grid_{c:02d}_{slug(row_names[p])}.png",
                       row_names, max_classes=1, max_per_class=args.num_images)
    lengths = [r["num_tokens"] for r in records]
    summary = {"args": vars(args), "template": template, "images": records, "mean_tokens": float(np.mean(lengths)),
               "max_image_tokens": vlm.config.max_image_tokens, "grid": str(out / "grid.png")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"{len(records)} images in {out} (mean {summary['mean_tokens']:.2f} tokens of {vlm.config.max_image_tokens})")
    return summary


def build_parser() -> FlagParser:
    p = FlagParser(prog="adatok sample-t2i", description=__doc__.split("\n\n")[0],
                   renamed={"--cfg": "--cfg_scale", "--steps": "--num_steps"})
    p.add_argument("--model", required=True, help="a train_vlm export (<output_dir>/model)")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat for several)")
    p.add_argument("--classes", default=None,
                   help="'all', class ids '0,7' or names 'Sneaker,Bag': the classes' training captions as prompts")
    p.add_argument("--out", default="outputs/t2i", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_images", type=int, default=4, help="images per prompt (per class)")
    p.add_argument("--cfg_scale", type=float, default=None,
                   help="classifier-free guidance scale (1: off; default: config)")
    p.add_argument("--num_steps", type=int, default=None, help="Euler steps of the flow head (default: config)")
    p.add_argument("--temperature", type=float, default=None, help="flow-head noise scale (default: config)")
    p.add_argument("--min_image_tokens", type=int, default=None, help="no [EOI] before this many tokens")
    p.add_argument("--max_image_tokens", type=int, default=None, help="[EOI] forced at this many tokens")
    p.add_argument("--num_image_tokens", type=int, default=None, help="an exact length instead of the LM's choice")
    p.add_argument("--sample_stop", action="store_true",
                   help="sample the [EOI] decision instead of taking the likelier option")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="auto")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1:
        raise SystemExit("--num_images and --batch_size must be >= 1")
    return sample(args)


def build_c2i_parser() -> FlagParser:
    """``adatok sample-c2i --generator ar``'s options: sample-c2i's names for class-conditional AR sampling."""
    p = FlagParser(prog="adatok sample-c2i --generator ar",
                   description="Class-conditional generation by a VLM (autoregressive, the flow head).")
    p.add_argument("--generator", choices=["ar"], default="ar", help="ar: an autoregressive VLM")
    p.add_argument("--model", "--vlm", dest="model", required=True, help="a train_vlm export (<output_dir>/model)")
    p.add_argument("--classes", default="all", help="'all', class ids '0,7' or names 'Sneaker,Bag'")
    p.add_argument("--per_class", type=int, default=8, help="images per class")
    p.add_argument("--cfg_scale", type=float, default=None, help="classifier-free guidance scale (default: config)")
    p.add_argument("--num_steps", type=int, default=None, help="Euler steps of the flow head (default: config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/c2i-ar", help="output folder")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="auto")
    return p


def c2i_main(argv: list[str] | None = None) -> dict:
    """``adatok sample-c2i --generator ar``: class-conditional AR generation by a VLM, in sample-c2i's words
    (``--model/--vlm DIR --classes all --per_class N --cfg_scale S --num_steps K --seed --out``)."""
    a = build_c2i_parser().parse_args(argv)
    argv_t2i = ["--model", a.model, "--classes", a.classes, "--num_images", str(a.per_class), "--seed", str(a.seed),
                "--out", a.out, "--batch_size", str(a.batch_size), "--device", a.device]
    if a.cfg_scale is not None:
        argv_t2i += ["--cfg_scale", str(a.cfg_scale)]
    if a.num_steps is not None:
        argv_t2i += ["--num_steps", str(a.num_steps)]
    return main(argv_t2i)


if __name__ == "__main__":
    main()
