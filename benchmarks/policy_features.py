"""Which policy input and decision rule closes ATA's gap to the binary search (issue #17 item 3)?

    .venv/bin/python benchmarks/policy_features.py --model /work/exp/demo1/model \\
        --table_dir /work/exp/demo1/policy/reward_table --cache /work/exp/h5/rows.pt \\
        --out benchmarks/results/policy_features_search.json

Stage 2 on a reward table (``train.reward_table``) knows every training crop's loss ``rl`` at every grid
length, so any length rule is scored by look-ups. This script trains candidate length policies on the
table's training rows and scores each on its HELD-OUT rows (``train.val_size``: training photos' crops
never in the table; the test split is never read), against the binary search at ``rl_base`` and the
oracle on the same rows:

* structured reward (eq. 7) of the chosen lengths, and its gap to the search's (issue 17's target: <= 0.01,
  issue 16's: <= 0.02), the continuous reward (eq. 6), mean length;
* Spearman of the chosen lengths with the oracle's and with the crop's PNG size (issue 16: >= 0.6 / 0.5).

Candidates vary what the one encoder pass gives the policy (``--inputs``: mean-pooled patch and token
features as today, the 9 image statistics, the m bottleneck tokens flattened, attention pooling over the
suffix tokens, the quality head's predicted curve) and how the length is decided (the policy trained on
the exact expected reward as today, a soft-target cross-entropy warm start, a regression of R(L) with
argmax, the quality head's first length predicted under rl_base). None decodes: each is one encoder pass.

The table's crops are re-read once (same data set, rows and evaluation transform as the table; the
recomputed pooled features are checked against the table's) to get the encoder's hidden states, the
bottleneck tokens, the pixels' statistics and PNG sizes; all cached in ``--cache``. Every training run is
seeded and budgeted by steps, with train_policy's defaults (AdamW, warm-up 20, cosine to 0.1, weight decay
4e-5, clip 1, entropy 0.05 -> 0). ``--photo_split`` also scores the chosen candidates on whole held-out
photos (train + held-out rows pooled, the photos of ~val_size rows held out): the table's held-out rows
are crops of the table's own photos, the test split's are not. Writes FILE.json and FILE.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import adatok_vlm  # noqa: F401  (registers AdaTok with AutoModel)
from adatok_vlm.tokenizer.policy import FeatureMLP, QualityCurveHead, first_at_or_below, image_statistics
from adatok_vlm.tokenizer.rewards import RewardSpec, entropy_weight
from adatok_vlm.training.engine import lr_at, set_lr
from adatok_vlm.training.flags import FlagParser
from adatok_vlm.training.reward_table import reward_softmax_cross_entropy
from adatok_vlm.training.results import write_results

INPUTS = ("pooled", "stats", "tokens", "attention", "curve")
HEADS = ("expected", "regress", "meet", "curve_rule", "knn")


# ------------------------------------------------------------------------------------------------
# the table's rows, re-read once: hidden states, tokens, statistics, PNG sizes (cached)
# ------------------------------------------------------------------------------------------------
def _table(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "null"))
    return load_file(str(path)), meta


@torch.no_grad()
def gather_rows(model_dir: str, table_dir: str, cache: Path, policy_config: str = "policy/adatok-natural.yaml",
                batch_size: int = 256) -> dict:
    """Per part (``train``, ``val``): the table's ``rl [N, K]``, ``features`` and ``rows``, and for the same
    crops the encoder's ``hidden [N, n+m, dim]``, bottleneck ``tokens [N, m, D]``, ``stats [N, 9]``,
    ``png [N]`` and ``source`` (photo name, when the data set records it). Cached in ``cache``."""
    from transformers import AutoModel

    from adatok_vlm.tokenizer.loading import model_fingerprint

    parts = {p: _table(Path(table_dir) / f"{p}.safetensors") for p in ("train", "val")}
    key = {"model": model_fingerprint(model_dir), "table": {p: m for p, (_, m) in parts.items()}}
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == json.loads(json.dumps(key)):
            return saved
    from adatok_vlm.training.batches import preload_images
    from adatok_vlm.training.config import configs_dir, fill_dataclass, load_yaml
    from adatok_vlm.training.data_setup import build_image_processor, load_split
    from adatok_vlm.training.train_policy import PolicyTrainingConfig
    from adatok_vlm.training.visualize import png_sizes

    model = AutoModel.from_pretrained(model_dir).eval()
    meta = parts["train"][1]
    source = meta["data"]
    cfg = fill_dataclass(PolicyTrainingConfig, load_yaml(configs_dir() / policy_config) if policy_config else {})
    cfg.data.dataset, cfg.data.train_split, cfg.data.limit = source["dataset"], source["split"], source["limit"]
    if source.get("crops"):
        cfg.data.num_crops, seed = source["crops"]
    else:
        seed = 0
    processor = build_image_processor(model.config, cfg.data, train=False)
    if json.loads(json.dumps(processor.to_dict(), sort_keys=True, default=str)) != source["processor"]:
        raise ValueError("the evaluation processor rebuilt here differs from the one the table was measured with")
    raw = load_split(cfg.data, cfg.data.train_split, seed, limit=cfg.data.limit)
    pixels_all = preload_images(raw, processor).pixels
    sources = raw["source"] if "source" in raw.column_names else None
    n = model.config.num_patches
    out = {"key": key, "grid": meta["grid"], "num_patches": n}
    for part, (tensors, _) in parts.items():
        rows = tensors["rows"].long()
        pixels = pixels_all[rows].float() / 255.0
        hidden, tokens = [], []
        for s in range(0, len(rows), batch_size):
            t, h, _, _ = model.forward_encoder(pixels[s:s + batch_size])
            hidden.append(h.half())
            tokens.append(t)
        hidden, tokens = torch.cat(hidden), torch.cat(tokens)
        pooled = torch.cat([hidden[:, :n].float().mean(1), hidden[:, n:].float().mean(1)], 1)
        width = pooled.shape[1]
        out[part] = {"rl": tensors["rl"].float(), "features": tensors["features"].float(), "rows": rows,
                     "hidden": hidden, "tokens": tokens, "stats": image_statistics(pixels), "png": png_sizes(pixels),
                     "source": [sources[int(r)] for r in rows] if sources is not None else None,
                     # recomputed vs stored pooled features (fp16 hidden states: ~1e-3)
                     "feature_check": float((pooled - tensors["features"][:, :width]).abs().max())}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


# ------------------------------------------------------------------------------------------------
# candidates
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One length rule: its inputs, head, training recipe. Defaults: configs/policy/adatok-natural.yaml."""

    name: str
    inputs: tuple = ("pooled",)
    head: str = "expected"            # HEADS: the policy on E_pi[R] | regress R(L) | P(rl_L <= rl_base) | quality head | kNN
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.2
    steps: int = 1500
    batch_size: int = 256
    lr: float = 2e-3
    entropy_start: float = 0.05
    warm_ce_steps: int = 0            # soft-target cross-entropy (softmax(R / ce_tau)) steps before E_pi[R]
    ce_tau: float = 0.1
    standardize: bool = False         # inputs scaled to zero mean / unit variance on the training rows
    neighbours: int = 16              # head "knn": the training rows averaged
    ensemble: int = 1                 # heads trained from seeds seed..seed+ensemble-1, their softmaxes averaged
    seed: int = 0

    def describe(self) -> str:
        head = {"expected": "policy, exact E_pi[R]", "regress": "MSE regression of R(L), argmax",
                "meet": "P(rl_L <= rl_base) per L (BCE), argmax P * R_high(L)",
                "curve_rule": "quality head, first L with predicted rl * e^margin <= rl_base",
                "knn": f"{self.neighbours} nearest training rows' mean R(L), argmax (not a shippable head)"}[self.head]
        if self.head == "knn":
            return f"{'+'.join(self.inputs)}; {head}" + (", standardised" if self.standardize else "")
        extra = f", CE warm start {self.warm_ce_steps} steps (tau {self.ce_tau:g})" if self.warm_ce_steps else ""
        extra += f", mean of {self.ensemble} seeds' softmax" if self.ensemble > 1 else ""
        return (f"{'+'.join(self.inputs)}; {head}{extra}; {self.layers}x{self.hidden}, dropout {self.dropout:g}, "
                f"{self.steps} steps" + (", standardised" if self.standardize else ""))


def candidates(steps: int) -> list[Candidate]:
    base = Candidate("today", steps=steps)
    stats = replace(base, name="stats", inputs=("pooled", "stats"))
    return [
        base,
        stats,
        replace(base, name="stats_only", inputs=("stats",)),
        replace(base, name="tokens", inputs=("tokens",)),
        replace(base, name="tokens_stats", inputs=("tokens", "stats")),
        replace(base, name="pooled_tokens", inputs=("pooled", "tokens")),
        replace(base, name="pooled_tokens_stats", inputs=("pooled", "tokens", "stats")),
        replace(base, name="attention", inputs=("attention",)),
        replace(base, name="attention_stats", inputs=("attention", "stats")),
        replace(base, name="curve_input", inputs=("pooled", "stats", "curve")),
        replace(stats, name="stats_standardised", standardize=True),
        replace(stats, name="stats_wide_512", hidden=512),
        replace(stats, name="stats_wide_1024", hidden=1024),
        replace(stats, name="stats_layers_3", layers=3),
        replace(stats, name="stats_dropout_0", dropout=0.0),
        replace(stats, name="stats_dropout_0.5", dropout=0.5),
        replace(stats, name="stats_steps_third", steps=max(1, steps // 3)),
        replace(stats, name="stats_steps_x3", steps=3 * steps),
        replace(stats, name="stats_ce_warm", warm_ce_steps=max(1, steps // 3)),
        replace(stats, name="stats_ce_warm_tau_0.05", warm_ce_steps=max(1, steps // 3), ce_tau=0.05),
        replace(stats, name="stats_ce_warm_tau_0.2", warm_ce_steps=max(1, steps // 3), ce_tau=0.2),
        replace(stats, name="stats_ce_warm_two_thirds", warm_ce_steps=max(1, 2 * steps // 3)),
        replace(stats, name="stats_ce_only", warm_ce_steps=steps),
        replace(stats, name="stats_ensemble_5", ensemble=5),
        replace(stats, name="stats_ce_warm_ensemble_5", warm_ce_steps=max(1, steps // 3), ensemble=5),
        replace(stats, name="stats_regress", head="regress"),
        replace(stats, name="stats_meet", head="meet"),
        replace(stats, name="stats_knn", head="knn", standardize=True),
        replace(base, name="tokens_stats_knn", inputs=("tokens", "stats"), head="knn", standardize=True),
        replace(stats, name="stats_curve_rule", head="curve_rule"),
        replace(base, name="curve_rule_today", head="curve_rule"),
    ]


class AttentionPooling(nn.Module):
    """One learned query attending over tokens ``[B, T, dim]`` -> ``[B, dim]`` (multi-head, pre-norm keys)."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm(tokens)
        return self.attn(self.query.expand(tokens.shape[0], -1, -1), kv, kv, need_weights=False)[0].squeeze(1)


class Head(nn.Module):
    """``[flat features (+ attention-pooled suffix tokens)] -> [B, K]`` (logits, R(L) or a log-rl curve)."""

    def __init__(self, flat_dim: int, token_dim: int, k: int, c: Candidate):
        super().__init__()
        self.pool = AttentionPooling(token_dim) if token_dim else None
        in_dim = flat_dim + token_dim
        if c.head == "curve_rule":
            self.net = QualityCurveHead(in_dim, list(range(1, k + 1)), c.hidden, c.layers, c.dropout)
        else:
            self.net = FeatureMLP(in_dim, k, c.hidden, c.layers, c.dropout)
            if c.head == "expected":          # TokenLengthPolicy's near-uniform start
                nn.init.normal_(self.net.out.weight, std=1e-3)
                nn.init.zeros_(self.net.out.bias)

    def forward(self, flat: torch.Tensor, seq: torch.Tensor | None) -> torch.Tensor:
        x = flat if self.pool is None else torch.cat([flat, self.pool(seq)], 1)
        return self.net(x).float()


def build_inputs(c: Candidate, data: dict, part: str, curves: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(flat [N, F], suffix tokens [N, m, dim] or None)`` of a part for a candidate's inputs."""
    d, n = data[part], data["num_patches"]
    flat = []
    for name in c.inputs:
        if name == "pooled":
            flat.append(d["features"][:, : 2 * d["hidden"].shape[-1]])
        elif name == "stats":
            flat.append(d["stats"])
        elif name == "tokens":
            flat.append(d["tokens"].flatten(1))
        elif name == "attention":      # mean patch features; the suffix tokens go through attention pooling
            flat.append(d["hidden"][:, :n].float().mean(1))
        elif name == "curve":
            flat.append(curves[part])
    seq = d["hidden"][:, n:].float() if "attention" in c.inputs else None
    return torch.cat(flat, 1), seq


def train_head(c: Candidate, flat: torch.Tensor, seq, rewards: torch.Tensor, rl: torch.Tensor,
               rl_base: float = 0.02) -> Head:
    """A fresh head trained on table rows by train_policy's recipe (steps, AdamW, warm-up, cosine, clip)."""
    torch.manual_seed(c.seed)
    head = Head(flat.shape[1], seq.shape[-1] if seq is not None else 0, rewards.shape[1], c)
    optimizer = torch.optim.AdamW(head.parameters(), lr=c.lr, weight_decay=4e-5)
    batches = torch.Generator().manual_seed(c.seed)
    order, at = torch.empty(0, dtype=torch.long), 0
    log_rl = rl.clamp_min(1e-8).log()
    for step in range(c.steps):
        if at + c.batch_size > order.numel():
            order, at = torch.randperm(flat.shape[0], generator=batches), 0
        rows = order[at:at + c.batch_size]
        at += c.batch_size
        set_lr(optimizer, lr_at(step / c.steps, step, c.lr, 20, "cosine", 0.1))
        out = head(flat[rows], seq[rows] if seq is not None else None)
        if c.head == "regress":
            loss = F.mse_loss(out, rewards[rows])
        elif c.head == "meet":
            loss = F.binary_cross_entropy_with_logits(out, (rl[rows] <= rl_base).float())
        elif c.head == "curve_rule":
            loss = F.mse_loss(out, log_rl[rows])
        elif step < c.warm_ce_steps:
            loss = reward_softmax_cross_entropy(out, rewards[rows], c.ce_tau)
        else:                                  # reward_table.table_policy_loss, objective "expected"
            probs = F.softmax(out, 1)
            entropy = -(probs * F.log_softmax(out, 1)).sum(1)
            lam = entropy_weight(step, c.steps, c.entropy_start, 0.0, "linear")
            loss = -(probs * rewards[rows]).sum(1).mean() - lam * entropy.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
    return head.eval()


@torch.no_grad()
def head_out(head: Head, flat: torch.Tensor, seq, batch: int = 2048) -> torch.Tensor:
    return torch.cat([head(flat[s:s + batch], seq[s:s + batch] if seq is not None else None)
                      for s in range(0, flat.shape[0], batch)])


def margin_choice(log_curve: torch.Tensor, rewards: torch.Tensor, rl_base: float, margins) -> tuple[float, float]:
    """The margin (log space) whose rule ``first L with exp(log_curve + margin) <= rl_base`` has the best mean
    reward on these rows: ``(margin, reward)``."""
    best = (0.0, -math.inf)
    rows = torch.arange(rewards.shape[0])
    for mg in margins:
        r = float(rewards[rows, first_at_or_below(log_curve + mg, math.log(rl_base))].mean())
        if r > best[1]:
            best = (float(mg), r)
    return best


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------
def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    if len(set(a.tolist())) < 2 or len(set(b.tolist())) < 2:
        return float("nan")
    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def score(choice: torch.Tensor, grid: torch.Tensor, rewards: dict, png: torch.Tensor) -> dict:
    """Mean tokens, both rewards, the gap to the search and Spearman with the oracle length and PNG size."""
    s, rows = rewards["structured"], torch.arange(choice.numel())
    lengths = grid[choice]
    oracle = grid[s.argmax(1)]
    return {"length_mean": float(lengths.float().mean()), "distinct_lengths": int(lengths.unique().numel()),
            "structured": float(s[rows, choice].mean()), "continuous": float(rewards["continuous"][rows, choice].mean()),
            "spearman_oracle": spearman(lengths, oracle), "spearman_png": spearman(lengths, png)}


def references(rl: torch.Tensor, grid: torch.Tensor, rewards: dict, png: torch.Tensor, threshold: float) -> dict:
    """The binary search at ``threshold`` (smallest L with rl <= threshold), the oracle and the best fixed L."""
    s = rewards["structured"]
    fixed = torch.full((rl.shape[0],), int(s.mean(0).argmax()))
    return {"search": score(first_at_or_below(rl, threshold), grid, rewards, png),
            "oracle": score(s.argmax(1), grid, rewards, png), "best_fixed": score(fixed, grid, rewards, png)}


def fit_and_score(c: Candidate, data: dict, train: str, val: str, rewards: dict, spec: RewardSpec,
                  curves: dict | None) -> dict:
    """Train ``c`` on part ``train`` and score it on part ``val`` (parts of ``data``)."""
    started = time.time()
    flat, seq = build_inputs(c, data, train, curves)
    vflat, vseq = build_inputs(c, data, val, curves)
    if c.standardize:
        mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
        flat, vflat = (flat - mean) / std, (vflat - mean) / std
    grid, extra = torch.tensor(data["grid"]), {}
    if c.head == "knn":
        dist = torch.cdist(vflat, flat)                                       # [N_val, N_train]
        near = dist.topk(c.neighbours, dim=1, largest=False).indices
        choice = rewards[train]["structured"][near].mean(1).argmax(1)
        return {**score(choice, grid, rewards[val], data[val]["png"]), "seconds": time.time() - started}
    if c.ensemble > 1:         # only the policy head: its softmaxes averaged over seeds
        if c.head != "expected":
            raise ValueError(f"ensemble needs head 'expected', got {c.head!r}")
        probs = sum(F.softmax(head_out(train_head(replace(c, seed=c.seed + k), flat, seq, rewards[train]["structured"],
                                                  data[train]["rl"], spec.rl_base), vflat, vseq), 1)
                    for k in range(c.ensemble))
        return {**score(probs.argmax(1), grid, rewards[val], data[val]["png"]), "seconds": time.time() - started}
    head = train_head(c, flat, seq, rewards[train]["structured"], data[train]["rl"], spec.rl_base)
    out = head_out(head, vflat, vseq)
    if c.head == "meet":      # expected structured reward if met (R_high) or missed (~0): argmax P(met) R_high(L)
        r_high = 2.0 - grid.float() / grid[-1].float()
        choice = (torch.sigmoid(out) * r_high).argmax(1)
    elif c.head == "curve_rule":
        margins = torch.linspace(-1.0, 2.0, 61)
        train_margin, _ = margin_choice(head_out(head, flat, seq), rewards[train]["structured"], spec.rl_base, margins)
        val_margin, val_best = margin_choice(out, rewards[val]["structured"], spec.rl_base, margins)
        choice = first_at_or_below(out + train_margin, math.log(spec.rl_base))
        extra = {"margin_chosen_on_training_rows": train_margin, "margin_best_on_held_out": val_margin,
                 "structured_at_best_held_out_margin": val_best}
    else:
        choice = out.argmax(1)
    return {**score(choice, grid, rewards[val], data[val]["png"]), **extra, "seconds": time.time() - started}


def oof_curves(data: dict, rewards: dict, spec: RewardSpec, steps: int) -> dict:
    """The quality head's predicted log-rl curves as an input: out-of-fold (2 folds) on the training rows, a
    full-table fit on the held-out rows, so the policy never reads a curve fitted on its own row."""
    c = Candidate("curve", inputs=("pooled", "stats"), head="curve_rule", steps=steps)
    n = data["train"]["rl"].shape[0]
    folds = torch.randperm(n, generator=torch.Generator().manual_seed(0)) % 2
    flat, _ = build_inputs(c, data, "train", None)
    vflat, _ = build_inputs(c, data, "val", None)
    rl = data["train"]["rl"]
    train_curve = torch.empty_like(rl)
    for k in (0, 1):
        fit = folds != k
        head = train_head(c, flat[fit], None, rewards["train"]["structured"][fit], rl[fit])
        train_curve[~fit] = head_out(head, flat[~fit], None)
    head = train_head(c, flat, None, rewards["train"]["structured"], rl)
    return {"train": train_curve, "val": head_out(head, vflat, None)}


def photo_split(data: dict, val_rows: int, seed: int = 0) -> dict | None:
    """Train + held-out rows pooled, then whole photos held out (a seeded draw of photos until ~``val_rows``
    rows): parts ``photo_train`` / ``photo_val``. None when the data set does not name each crop's photo."""
    if data["train"]["source"] is None:
        return None
    keys = ("rl", "features", "hidden", "tokens", "stats", "png")
    pooled = {k: torch.cat([data["train"][k], data["val"][k]]) for k in keys}
    sources = data["train"]["source"] + data["val"]["source"]
    names = sorted(set(sources))
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    held, count = set(), 0
    for i in order:
        if count >= val_rows:
            break
        held.add(names[i])
        count += sources.count(names[i])
    mask = torch.tensor([s in held for s in sources])
    out = dict(data)
    out["photo_train"] = {k: v[~mask] for k, v in pooled.items()}
    out["photo_val"] = {k: v[mask] for k, v in pooled.items()}
    out["photo_split"] = {"held_out_photos": len(held), "photos": len(names), "held_out_rows": int(mask.sum())}
    return out


def shipped_policy(model_dir: str, data: dict, rewards: dict, grid: torch.Tensor) -> dict:
    """The trained model's own policy (the demo's ATA) on the held-out rows' stored features."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        choice = model.policy(data["val"]["features"]).argmax(1)
    return score(choice, grid, rewards["val"], data["val"]["png"])


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    ref = result["references"]
    search = ref["search"]["structured"]
    lines = [f"# Policy inputs and decision rules vs the binary search ({result['num_train']} table crops, "
             f"scored on {result['num_val']} held-out crops of training photos)", "",
             f"Command: `{result['command']}`", ""] + ([result["note"], ""] if result.get("note") else []) + [
             f"References on the held-out rows: binary search at rl_base {result['rl_base']:g}: structured "
             f"{search:.4f} at {ref['search']['length_mean']:.2f} tokens; oracle {ref['oracle']['structured']:.4f} "
             f"at {ref['oracle']['length_mean']:.2f}; best fixed length {ref['best_fixed']['structured']:.4f}. "
             f"Spearman with PNG size: search {ref['search']['spearman_png']:.3f}, oracle "
             f"{ref['oracle']['spearman_png']:.3f}. "
             f"Recomputed pooled features vs the table's: max |diff| {result['feature_check']:.2e}.", ""]
    if result.get("shipped"):
        s = result["shipped"]
        lines += [f"The model's own policy on these rows: structured {s['structured']:.4f} at {s['length_mean']:.2f} "
                  f"tokens (gap {search - s['structured']:+.4f}), Spearman oracle {s['spearman_oracle']:.3f}, "
                  f"PNG {s['spearman_png']:.3f}.", ""]
    head = ("| candidate | what | mean L | R structured | gap to search | R continuous | Spearman oracle | "
            "Spearman PNG | s |")
    rule = "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    lines += ["## Held-out rows of the table (training photos)", "", head, rule]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['describe']} | {r['length_mean']:.2f} | {r['structured']:.4f} | "
                     f"{search - r['structured']:+.4f} | {r['continuous']:.4f} | {r['spearman_oracle']:.3f} | "
                     f"{r['spearman_png']:.3f} | {r['seconds']:.0f} |")
        if "margin_chosen_on_training_rows" in r:
            lines.append(f"| | margin {r['margin_chosen_on_training_rows']:.2f} (training rows); best on held out "
                         f"{r['margin_best_on_held_out']:.2f}: {r['structured_at_best_held_out_margin']:.4f} | | | | | | | |")
    if result.get("photo_rows"):
        ps = result["photo_split"]
        psearch = result["photo_references"]["search"]["structured"]
        lines += ["", f"## Whole photos held out ({ps['held_out_photos']} of {ps['photos']} photos, "
                  f"{ps['held_out_rows']} crops)", "",
                  f"Binary search: {psearch:.4f}; oracle {result['photo_references']['oracle']['structured']:.4f}.", "",
                  head, rule]
        for r in result["photo_rows"]:
            lines.append(f"| {r['name']} | {r['describe']} | {r['length_mean']:.2f} | {r['structured']:.4f} | "
                         f"{psearch - r['structured']:+.4f} | {r['continuous']:.4f} | {r['spearman_oracle']:.3f} | "
                         f"{r['spearman_png']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = FlagParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the stage-2 model folder (tokenizer + policy)")
    p.add_argument("--table_dir", required=True, help="its reward_table folder (train/val.safetensors)")
    p.add_argument("--cache", default="outputs/policy_features/rows.pt", help="where the re-read rows are cached")
    p.add_argument("--policy_config", default="policy/adatok-natural.yaml",
                   help="the stage-2 config (under configs/) the table's data came through; '' for the defaults")
    p.add_argument("--out", default="benchmarks/results/policy_features_search.json")
    p.add_argument("--steps", type=int, default=1500, help="training steps of a candidate (train_policy's 1500)")
    p.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    p.add_argument("--photo_split", default="",
                   help="comma-separated candidates (or 'all') also scored on held-out photos (one seed)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per candidate (rows list each)")
    p.add_argument("--note", default="", help="a paragraph for the markdown (what the model and table are)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = gather_rows(args.model, args.table_dir, Path(args.cache), args.policy_config)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model)
    spec = {k: RewardSpec(kind=k, alpha=config.reward_alpha, beta=config.reward_beta, gamma=config.reward_gamma,
                          rl_base=config.reward_rl_base) for k in ("structured", "continuous")}
    grid, m = torch.tensor(data["grid"]), config.num_latent_tokens
    split = photo_split(data, data["val"]["rl"].shape[0]) if args.photo_split else None
    if split is not None:
        data = split
    parts = [p for p in ("train", "val", "photo_train", "photo_val") if p in data]
    rewards = {p: {k: s(data[p]["rl"], grid.float().expand_as(data[p]["rl"]), m).float() for k, s in spec.items()}
               for p in parts}
    chosen = [c for c in candidates(args.steps) if not args.only or c.name in args.only.split(",")]
    curves = oof_curves(data, rewards, spec["structured"], args.steps) \
        if any("curve" in c.inputs for c in chosen) else None
    rows = []
    for c in chosen:
        for seed in range(args.seeds):
            cs = replace(c, seed=seed)
            r = {"name": c.name + (f" (seed {seed})" if args.seeds > 1 else ""), "describe": c.describe(),
                 "candidate": asdict(cs), **fit_and_score(cs, data, "train", "val", rewards, spec["structured"], curves)}
            print(json.dumps({k: v for k, v in r.items() if k != "candidate"}), flush=True)
            rows.append(r)
    result = {"command": "python benchmarks/policy_features.py " + " ".join(argv if argv is not None else
                                                                            __import__("sys").argv[1:]),
              "note": args.note, "rl_base": config.reward_rl_base, "num_train": data["train"]["rl"].shape[0],
              "num_val": data["val"]["rl"].shape[0], "feature_check": data["train"]["feature_check"],
              "references": references(data["val"]["rl"], grid, rewards["val"], data["val"]["png"],
                                       config.search_threshold),
              "shipped": shipped_policy(args.model, data, rewards, grid), "rows": rows}
    if split is not None:
        result["photo_split"] = data["photo_split"]
        result["photo_references"] = references(data["photo_val"]["rl"], grid, rewards["photo_val"],
                                                data["photo_val"]["png"], config.search_threshold)
        result["photo_rows"] = []
        for c in candidates(args.steps):
            wanted = args.photo_split == "all" or c.name in args.photo_split.split(",")
            if wanted and (not args.only or c.name in args.only.split(",")) and "curve" not in c.inputs:
                r = {"name": c.name, "describe": c.describe(), "candidate": asdict(c),
                     **fit_and_score(c, data, "photo_train", "photo_val", rewards, spec["structured"], None)}
                print(json.dumps({k: v for k, v in r.items() if k != "candidate"}), flush=True)
                result["photo_rows"].append(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results(out, result, markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
