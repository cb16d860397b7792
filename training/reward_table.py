"""Stage 2 on a reward table: measure every image's reconstruction loss at every allowed length once.

Stage 2 freezes the tokenizer, and its encoder and decoder are deterministic in eval mode, so the
reward of length ``L`` for an image never changes while the policy trains. The online loop
(``train.reward_table false``) still decodes 2 + ``curve_extra_lengths`` times per image and step. With
``train.reward_table true`` the trainer instead measures, once, the policy features ``f [N, F]`` and
``rl [N, K]`` (pixel MSE at each of the K grid lengths: K decodes per image) and every later step
is a table look-up. That pays as soon as ``steps * batch * (2 + extra) > N * K``, and it lets the
policy see many more (image, length) outcomes for the same compute. It also allows two things the
online loop cannot afford:

* ``train.objective expected``: the exact gradient of ``E_pi[R(L)] + lambda(t) H(pi)``, summing over
  all K lengths instead of sampling one (REINFORCE's estimator without its variance); the default
  ``reinforce`` keeps eq. 8/9 with the looked-up rewards, i.e. the paper's algorithm;
* a held-out table (``train.val_size`` images of the evaluation split) on which the policy's ``auto``
  lengths are scored at every log step, next to the best fixed length, the binary search and the
  oracle: the comparison of Table 2 as a training curve.

The quality head (the dial) then fits each image's whole measured curve. Tables are written under
``<output_dir>/reward_table/`` (safetensors, with what they were measured from in the metadata and the
data set's row of each image) and reused when a run resumes; a table from another tokenizer, grid, data
set or subset is measured again. A measurement in progress is saved chunk by chunk, so an interrupted
one resumes (``measure_shared``).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file

from ..tokenizer.policy import first_at_or_below, lengths_to_indices
from ..tokenizer.rewards import baseline_lengths, pool_baseline, relative_advantage, reinforce_loss
from .distributed import any_rank
from .evaluation import errors_at_lengths

OBJECTIVES = ("reinforce", "expected")


@dataclass
class RewardTable:
    """Per image: policy features ``[N, F]`` and reconstruction MSE at each grid length ``[N, K]``;
    ``rows [N]``: which images of the data set they are (None when the caller did not say)."""

    features: torch.Tensor
    rl: torch.Tensor
    rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def save(self, path: Path, meta: dict) -> None:
        """Written under a temporary name, then renamed: a reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"features": self.features.contiguous(), "rl": self.rl.contiguous()}
        if self.rows is not None:
            tensors["rows"] = self.rows.to(torch.long).contiguous()
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta, sort_keys=True)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, meta: dict) -> "RewardTable | None":
        """The table at ``path`` if it was measured from ``meta`` (same tokenizer, grid, data), else None."""
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            saved = json.loads((f.metadata() or {}).get("meta", "null"))
        if saved != json.loads(json.dumps(meta, sort_keys=True)):
            return None
        tensors = load_file(str(path))
        return cls(tensors["features"], tensors["rl"], tensors.get("rows"))


@torch.no_grad()
def measure_reward_table(model, batches: Iterable[torch.Tensor], grid: torch.Tensor,
                         progress: Callable[[int], None] | None = None) -> RewardTable:
    """Encode each batch of pixels ``[B, C, H, W]`` (in [0, 1]) once and decode it at every length of ``grid``
    (:func:`~.evaluation.errors_at_lengths`, with the encoder's tokens whose hidden states give the features)."""
    features, rls = [], []
    device = next(model.parameters()).device
    for x in batches:
        x = x.to(device)
        tokens, hidden, _, _ = model.forward_encoder(x)
        features.append(model.policy_features(hidden, x).float().cpu())
        rls.append(errors_at_lengths(model, x, grid.tolist(), tokens=tokens))
        if progress is not None:
            progress(x.shape[0])
    if not features:
        raise ValueError("no images to measure a reward table on")
    return RewardTable(torch.cat(features), torch.cat(rls))


# ---------------------------------------------------------------------------------------------
# one policy step on table rows
# ---------------------------------------------------------------------------------------------
def reward_softmax_cross_entropy(logits: torch.Tensor, rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """``-sum_L softmax(R / tau)(L) log softmax(logits)(L)``, batch mean: the warm start's soft-target loss."""
    target = torch.softmax(rewards.to(logits.dtype) / tau, dim=1)
    return -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()


def table_policy_loss(policy, features: torch.Tensor, rewards: torch.Tensor, objective: str, mu: float,
                      advantage: str, entropy_weight: float, reading: str = "image",
                      ce_tau: float | None = None) -> tuple[torch.Tensor, dict, dict]:
    """The policy loss on rows whose reward at every grid length is known, ``rewards [B, K]``.

    ``reinforce``: sample ``L ~ pi``, look up ``R(L)`` and ``R(L_mean)``, eq. 8 and eq. 9 (the paper), with
    eq. 8's baseline read as ``reading`` (``rewards.BASELINE_READINGS``: each image's own ``E_pi[L]``, or the
    batch-wide readings the paper's "on a batch basis" allows).
    ``expected``: ``-sum_L pi(L|f) R(L) - lambda H(pi)``, the exact gradient REINFORCE estimates.
    ``ce_tau`` (a warm start, either objective): the cross-entropy to the soft target ``softmax(R / ce_tau)``
    instead, which pulls every image toward its own best lengths before the reward is maximised.
    Returns ``(loss, logs, sample)`` where ``sample`` holds the sampled lengths and their rewards,
    log-probabilities and entropies (for logging; both objectives sample).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"train.objective must be one of {OBJECTIVES}, got {objective!r}")
    grid = policy.grid
    dist = policy.distribution(features)
    idx = dist.sample()
    log_prob, entropy = dist.log_prob(idx), dist.entropy()
    reward = rewards.gather(1, idx[:, None]).squeeze(1)
    mean_lengths = baseline_lengths(dist.probs.detach() @ grid.to(dist.probs.dtype), grid, reading)
    mean_idx = lengths_to_indices(mean_lengths, grid)
    baseline = pool_baseline(rewards.gather(1, mean_idx[:, None]).squeeze(1), reading)
    if ce_tau is not None:
        loss = reward_softmax_cross_entropy(dist.logits, rewards, ce_tau)
        logs = {"loss": float(loss.detach()), "policy_loss": float(loss.detach()),
                "entropy": float(entropy.mean().detach()), "entropy_weight": 0.0}
    elif objective == "reinforce":
        adv = relative_advantage(reward, baseline, mu, advantage)
        loss, logs = reinforce_loss(log_prob, adv, entropy, entropy_weight)
    else:
        expected = (dist.probs * rewards.to(dist.probs.dtype)).sum(1)
        loss = -expected.mean() - entropy_weight * entropy.mean()
        logs = {"loss": float(loss.detach()), "policy_loss": float(-expected.mean().detach()),
                "entropy": float(entropy.mean().detach()), "entropy_weight": entropy_weight,
                "expected_reward": float(expected.mean().detach())}
    sample = {"lengths": grid[idx], "mean_lengths": grid[mean_idx], "reward": reward, "baseline": baseline,
              "log_prob": log_prob, "entropy": entropy}
    return loss, logs, sample


@torch.no_grad()
def score_on_table(policy, table: RewardTable, rewards: torch.Tensor, search_threshold: float,
                   batch_size: int = 4096) -> dict:
    """The policy's ``auto`` lengths on a held-out table, with the baselines of Table 2 on the same images.

    ``val_reward`` (auto) against ``val_best_fixed_reward`` (the best single length for all images),
    ``val_search_reward`` (smallest L with MSE <= ``search_threshold``) and ``val_oracle_reward``.
    """
    choice = head_outputs(policy, table.features, batch_size).argmax(-1)
    rows = torch.arange(len(table))
    search = first_at_or_below(table.rl, search_threshold)
    lengths = policy.grid.cpu()
    return {"val_reward": float(rewards[rows, choice].mean()), "val_length": float(lengths[choice].float().mean()),
            "val_rl": float(table.rl[rows, choice].mean()),
            "val_best_fixed_reward": float(rewards.mean(0).max()),
            "val_search_reward": float(rewards[rows, search].mean()),
            "val_search_length": float(lengths[search].float().mean()),
            "val_oracle_reward": float(rewards.max(1).values.mean())}


@torch.no_grad()
def calibrate_dial(curve_head, table: RewardTable, confidence: float) -> float:
    """The log-space margin above the quality head's predicted curves that ``confidence`` of the held-out
    (image, length) losses stay under: with it, ``num_tokens={"max_mse": x}`` keeps its promise for about
    that share of images (every rank computes it: a head forward, a collective under ZeRO-3)."""
    residual = table.rl.clamp_min(curve_head.min_rl).log() - head_outputs(curve_head, table.features).float()
    return float(torch.quantile(residual.flatten(), confidence))


def head_outputs(head, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """``head(features)`` over a whole table, in batches on the head's device; on the CPU."""
    device = head.grid.device
    return torch.cat([head(features[s:s + batch_size].to(device)).cpu() for s in range(0, len(features), batch_size)])


def table_rewards(spec, table: RewardTable, grid: torch.Tensor, max_length: int) -> torch.Tensor:
    """``R(rl[n, k], grid[k])`` for every row and length, ``[N, K]``."""
    lengths = grid.cpu().to(table.rl.dtype).expand_as(table.rl)
    return spec(table.rl, lengths, max_length).float()


def measure_shared(accelerator, path: Path, meta: dict, model,
                   load_batches: Callable[[list[list[int]]], Iterable[dict]], rows: list[int], batch_size: int,
                   grid: torch.Tensor, desc: str, chunk_size: int = 2048) -> tuple[RewardTable, float]:
    """The table of the data set's images ``rows`` (in that order) on every rank: loaded from ``path``
    when every rank finds a matching one, else measured and saved by the main process.

    The rows are cut into chunks of ``chunk_size`` (at most ``ceil(len(rows) / world)``, so every rank has
    work on a small table); rank ``r`` measures chunks ``r, r + world, ...`` and
    writes each to ``<path stem>.parts/`` as soon as it is done (temporary name, then a rename), so an
    interrupted measurement resumes at the first unfinished chunk (a chunk file is reused only if it was
    measured from the same ``meta``, rows and chunk size). The chunks are then gathered (no shared file
    system needed) and the parts removed. ``load_batches(index_batches)`` yields one collated batch
    (``{"pixel_values", optionally "keys"}``) per list of indices, in order: the DataLoader path, so images
    decode in ``data.num_workers`` workers. An image that cannot be decoded (missing from its batch's
    ``keys``) is left out of the table, with a warning."""
    world, rank = accelerator.num_processes, accelerator.process_index
    table = RewardTable.load(path, meta)
    if not any_rank(accelerator, table is None):   # every rank has it
        return table, 0.0
    rows = [int(i) for i in rows]
    if not rows:
        raise ValueError(f"rows: expected at least one image to measure the reward table {path.name} on, got none")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    from tqdm.auto import tqdm

    started = time.time()
    n, width, k = len(rows), model.policy.mlp.in_dim, grid.numel()   # in_dim: the width of policy_features
    chunk_size = min(chunk_size, -(-n // world))
    bounds = [(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]
    parts = path.with_name(path.stem + ".parts")
    part_meta = json.loads(json.dumps(dict(meta, chunk_size=chunk_size), sort_keys=True))
    mine = {c: _load_chunk(parts, c, rows, part_meta) for c in range(rank, len(bounds), world)}
    todo = [c for c, chunk in mine.items() if chunk is None]
    bar = tqdm(total=sum(bounds[c][1] - bounds[c][0] for c in todo), desc=desc,
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    wanted = [rows[b:min(e, b + batch_size)] for s, e in (bounds[c] for c in todo) for b in range(s, e, batch_size)]
    batches = iter(load_batches(wanted) if wanted else ())
    for c in todo:
        start, end = bounds[c]
        features, rl = torch.full((end - start, width), float("nan")), torch.full((end - start, k), float("nan"))
        valid = torch.zeros(end - start, dtype=torch.bool)
        for b in range(start, end, batch_size):
            want = rows[b:min(end, b + batch_size)]
            pixels, ok = _decoded(next(batches), want)
            if ok.any():
                part = measure_reward_table(model, [pixels], grid)
                where = torch.arange(b - start, b - start + len(want))[ok]
                features[where], rl[where], valid[where] = part.features, part.rl, True
            bar.update(len(want))
        mine[c] = (features, rl, valid)
        _save_chunk(parts, c, rows, part_meta, mine[c])
    bar.close()
    features, rl, valid = _gather_chunks(accelerator, mine, bounds, chunk_size, width, k)
    if not bool(torch.isfinite(rl[valid]).all() and torch.isfinite(features[valid]).all()):
        raise ValueError(f"the reward table {path.name} holds NaN or inf: is the tokenizer broken?")
    if not valid.any():
        raise ValueError(f"the reward table {path.name}: none of its {n} images could be decoded")
    if not valid.all():
        warnings.warn(f"reward table {path.name}: {int((~valid).sum())} of {n} images could not be decoded "
                      "and are left out")
    table = RewardTable(features[valid], rl[valid], torch.tensor(rows)[valid])
    if accelerator.is_main_process:
        table.save(path, meta)
    accelerator.wait_for_everyone()
    for c in mine:                                  # each rank its own parts (they may be on a local disk)
        _chunk_file(parts, c).unlink(missing_ok=True)
    try:
        parts.rmdir()
    except OSError:                                 # not empty yet (another rank) or already gone
        pass
    return table, time.time() - started


def _chunk_file(parts: Path, chunk: int) -> Path:
    return parts / f"chunk-{chunk:06d}.safetensors"


def _chunk_meta(part_meta: dict, chunk: int, rows: list[int]) -> str:
    """What a chunk file must have been measured from: the table's meta, its chunk size and number, and a
    digest of the table's rows (so a different subset never reuses it)."""
    import hashlib

    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    return json.dumps(dict(part_meta, chunk=chunk, rows_sha256=digest), sort_keys=True)


def _load_chunk(parts: Path, chunk: int, rows: list[int], part_meta: dict):
    """``(features, rl, valid)`` of a finished chunk file measured from the same table, else None."""
    file = _chunk_file(parts, chunk)
    if not file.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        if (f.metadata() or {}).get("meta") != _chunk_meta(part_meta, chunk, rows):
            return None
    tensors = load_file(str(file))
    return tensors["features"], tensors["rl"], tensors["valid"].bool()


def _save_chunk(parts: Path, chunk: int, rows: list[int], part_meta: dict, measured) -> None:
    parts.mkdir(parents=True, exist_ok=True)
    file = _chunk_file(parts, chunk)
    tmp = file.with_name(file.name + ".tmp")
    features, rl, valid = measured
    save_file({"features": features.contiguous(), "rl": rl.contiguous(), "valid": valid.to(torch.uint8)}, str(tmp),
              metadata={"meta": _chunk_meta(part_meta, chunk, rows)})
    tmp.replace(file)


def _decoded(batch: dict, want: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's pixels and which of the requested rows ``want`` they are (a loader drops undecodable
    images from a batch and names the rest in ``keys``)."""
    pixels = batch["pixel_values"]
    if pixels.shape[0] == len(want):
        return pixels, torch.ones(len(want), dtype=torch.bool)
    keys = [int(key) for key in batch.get("keys") or []]
    if len(keys) != pixels.shape[0]:
        raise ValueError(f"a batch of {len(want)} rows came back with {pixels.shape[0]} images and no keys "
                         "saying which: cannot tell which rows they are")
    keys = set(keys)
    return pixels, torch.tensor([i in keys for i in want], dtype=torch.bool)


def _gather_chunks(accelerator, mine: dict, bounds: list[tuple[int, int]], chunk_size: int, width: int, k: int):
    """Every chunk on every rank, in row order: each rank pads its chunks (``rank, rank + world, ...``) to
    ``slots x chunk_size`` rows and one gather per tensor collects them."""
    world, rank = accelerator.num_processes, accelerator.process_index
    slots = -(-len(bounds) // world)
    features, rl = torch.zeros(slots * chunk_size, width), torch.zeros(slots * chunk_size, k)
    valid = torch.zeros(slots * chunk_size)
    for c, (f, r, v) in mine.items():
        at = (c // world) * chunk_size
        features[at:at + len(f)], rl[at:at + len(f)], valid[at:at + len(f)] = f, r, v.float()
    if world > 1:
        features, rl, valid = (accelerator.gather(t.to(accelerator.device)).cpu() for t in (features, rl, valid))
    out = []
    for t in (features, rl, valid):
        t = t.view(world, slots, chunk_size, *t.shape[1:])
        out.append(torch.cat([t[c % world, c // world, : e - s] for c, (s, e) in enumerate(bounds)]))
    return out[0], out[1], out[2] > 0.5
