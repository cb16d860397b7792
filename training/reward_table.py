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
``<output_dir>/reward_table/`` (safetensors, with what they were measured from in the metadata) and
reused when a run resumes; a table from another tokenizer, grid or data set is measured again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file

from ..tokenizer.policy import first_at_or_below, lengths_to_indices, round_to_grid
from ..tokenizer.rewards import relative_advantage, reinforce_loss
from .distributed import any_rank
from .evaluation import mse_per_image

OBJECTIVES = ("reinforce", "expected")


@dataclass
class RewardTable:
    """Per image: policy features ``[N, F]`` and reconstruction MSE at each grid length ``[N, K]``."""

    features: torch.Tensor
    rl: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    def save(self, path: Path, meta: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"features": self.features.contiguous(), "rl": self.rl.contiguous()}, str(tmp),
                  metadata={"meta": json.dumps(meta, sort_keys=True)})
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
        return cls(tensors["features"], tensors["rl"])


@torch.no_grad()
def measure_reward_table(model, batches: Iterable[torch.Tensor], grid: torch.Tensor,
                         progress: Callable[[int], None] | None = None) -> RewardTable:
    """Encode each batch of pixels ``[B, C, H, W]`` (in [0, 1]) once and decode it at every length of ``grid``."""
    features, rls = [], []
    device = next(model.parameters()).device
    for x in batches:
        x = x.to(device)
        tokens, hidden, _, _ = model.forward_encoder(x)
        features.append(model.policy_features(hidden).float().cpu())
        per_length = []
        for length in grid.tolist():
            lengths = torch.full((x.shape[0],), length, dtype=torch.long, device=device)
            recon = model.decode(tokens[:, :length], lengths)
            per_length.append(mse_per_image(recon, x).cpu())
        rls.append(torch.stack(per_length, 1))
        if progress is not None:
            progress(x.shape[0])
    if not features:
        raise ValueError("no images to measure a reward table on")
    return RewardTable(torch.cat(features), torch.cat(rls))


# ---------------------------------------------------------------------------------------------
# one policy step on table rows
# ---------------------------------------------------------------------------------------------
def table_policy_loss(policy, features: torch.Tensor, rewards: torch.Tensor, objective: str, mu: float,
                      advantage: str, entropy_weight: float) -> tuple[torch.Tensor, dict, dict]:
    """The policy loss on rows whose reward at every grid length is known, ``rewards [B, K]``.

    ``reinforce``: sample ``L ~ pi``, look up ``R(L)`` and ``R(L_mean)``, eq. 8 and eq. 9 (the paper).
    ``expected``: ``-sum_L pi(L|f) R(L) - lambda H(pi)``, the exact gradient REINFORCE estimates.
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
    mean_idx = lengths_to_indices(round_to_grid(dist.probs.detach() @ grid.to(dist.probs.dtype), grid), grid)
    baseline = rewards.gather(1, mean_idx[:, None]).squeeze(1)
    if objective == "reinforce":
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


def measure_shared(accelerator, path: Path, meta: dict, model, load_batch: Callable[[list[int]], torch.Tensor],
                   num_rows: int, batch_size: int, grid: torch.Tensor, desc: str) -> tuple[RewardTable, float]:
    """The table of rows ``0..num_rows-1`` on every rank: loaded from ``path`` when every rank finds a
    matching one, else measured with the rows split into one contiguous chunk per rank, gathered, and
    saved by the main process. ``load_batch(indices)`` returns the pixels of those rows."""
    world, rank = accelerator.num_processes, accelerator.process_index
    table = RewardTable.load(path, meta)
    if not any_rank(accelerator, table is None):   # every rank has it
        return table, 0.0
    from tqdm.auto import tqdm

    started = time.time()
    chunk = -(-num_rows // world)
    mine = list(range(rank * chunk, min(num_rows, (rank + 1) * chunk)))
    bar = tqdm(total=len(mine), desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True)
    batches = (load_batch(mine[s:s + batch_size]) for s in range(0, len(mine), batch_size))
    part = measure_reward_table(model, batches, grid, progress=bar.update) if mine else None
    bar.close()
    if world > 1:
        features = torch.zeros(chunk, model.policy.mlp.in_dim)   # the width of policy_features
        rl = torch.zeros(chunk, grid.numel())
        if part is not None:
            features[: len(part)], rl[: len(part)] = part.features, part.rl
        features = accelerator.gather(features.to(accelerator.device)).cpu()[:num_rows]
        rl = accelerator.gather(rl.to(accelerator.device)).cpu()[:num_rows]
        part = RewardTable(features, rl)
    if not bool(torch.isfinite(part.rl).all() and torch.isfinite(part.features).all()):
        raise ValueError(f"the reward table {path.name} holds NaN or inf: is the tokenizer broken?")
    if accelerator.is_main_process:
        part.save(path, meta)
    accelerator.wait_for_everyone()
    return part, time.time() - started
