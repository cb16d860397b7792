"""benchmarks/policy_features.py: its candidate heads learn a per-image length from table look-ups, its
references are the search and oracle by definition, and its photo split never shares a photo."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adatok_vlm.tokenizer.rewards import RewardSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from policy_features import Candidate, fit_and_score, photo_split, references  # noqa: E402

K = 8


def synthetic(n: int, seed: int) -> dict:
    """Rows whose loss falls under rl_base = 0.02 at length ``t`` (1..K), told by a one-hot feature; the
    "photo" of a row is ``t`` (so a photo split holds whole crossing lengths out: not learnable, on purpose
    not used for learning tests)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, K + 1, (n,), generator=g)
    grid = torch.arange(1, K + 1)
    rl = torch.where(grid[None] >= t[:, None], 0.01, 0.03) + 0.001 * torch.rand(n, K, generator=g)
    x = torch.cat([torch.nn.functional.one_hot(t - 1, K).float(), 0.01 * torch.randn(n, 2, generator=g)], 1)
    part = {"rl": rl, "features": x, "hidden": torch.zeros(n, 3, 5).half(), "tokens": torch.zeros(n, 2, 1),
            "stats": x[:, :1], "png": t * 100 + torch.randint(0, 10, (n,), generator=g),
            "source": [f"photo{int(v) % 4}" for v in t]}
    return part


@pytest.fixture(scope="module")
def data():
    return {"grid": list(range(1, K + 1)), "num_patches": 1, "train": synthetic(512, 0), "val": synthetic(256, 1)}


def rewards_of(data: dict) -> dict:
    spec = {k: RewardSpec(kind=k) for k in ("structured", "continuous")}
    grid = torch.tensor(data["grid"]).float()
    return {p: {k: s(data[p]["rl"], grid.expand_as(data[p]["rl"]), K).float() for k, s in spec.items()}
            for p in ("train", "val")}


def test_references_are_the_search_and_the_oracle(data):
    rewards = rewards_of(data)
    ref = references(data["val"]["rl"], torch.tensor(data["grid"]), rewards["val"], data["val"]["png"], 0.02)
    # the crossing length is the structured reward's best length here: the search is the oracle
    assert ref["search"]["structured"] == pytest.approx(ref["oracle"]["structured"])
    assert ref["search"]["spearman_oracle"] == pytest.approx(1.0)
    assert ref["best_fixed"]["structured"] < ref["oracle"]["structured"] - 0.3


@pytest.mark.parametrize("head", ["expected", "regress", "meet", "knn"])
def test_every_head_learns_the_per_row_length(data, head):
    rewards = rewards_of(data)
    c = Candidate("t", inputs=("pooled",), head=head, steps=300, dropout=0.0, hidden=32, batch_size=64,
                  standardize=head == "knn")
    got = fit_and_score(c, data, "train", "val", rewards, RewardSpec(kind="structured"), None)
    oracle = float(rewards["val"]["structured"].max(1).values.mean())
    fixed = float(rewards["val"]["structured"].mean(0).max())
    # far above the best single length, close to the oracle, ranked like it
    assert got["structured"] > oracle - 0.15 > fixed
    assert got["spearman_oracle"] > 0.9


@pytest.mark.parametrize("extra", [{"warm_ce_steps": 100}, {"ensemble": 2}, {"warm_ce_steps": 100, "ensemble": 2}])
def test_ce_warm_start_and_seed_ensembles_learn_the_per_row_length(data, extra):
    rewards = rewards_of(data)
    c = Candidate("t", inputs=("pooled",), steps=300, dropout=0.0, hidden=32, batch_size=64, **extra)
    got = fit_and_score(c, data, "train", "val", rewards, RewardSpec(kind="structured"), None)
    oracle = float(rewards["val"]["structured"].max(1).values.mean())
    assert got["structured"] > oracle - 0.15
    with pytest.raises(ValueError, match="ensemble needs head 'expected'"):
        fit_and_score(replace(c, head="regress", ensemble=2), data, "train", "val", rewards,
                      RewardSpec(kind="structured"), None)


def test_curve_rule_picks_its_margin_on_training_rows(data):
    rewards = rewards_of(data)
    c = replace(Candidate("t", head="curve_rule", steps=300, dropout=0.0, hidden=32, batch_size=64))
    got = fit_and_score(c, data, "train", "val", rewards, RewardSpec(kind="structured"), None)
    assert -1.0 <= got["margin_chosen_on_training_rows"] <= 2.0
    assert got["structured_at_best_held_out_margin"] >= got["structured"]
    assert got["spearman_oracle"] > 0.9


def test_photo_split_holds_whole_photos_out(data):
    split = photo_split(data, 200)
    train_photos = {f"photo{int(v) % 4}" for v in (split["photo_train"]["png"] // 100)}
    held_photos = {f"photo{int(v) % 4}" for v in (split["photo_val"]["png"] // 100)}
    assert not train_photos & held_photos and train_photos and held_photos
    assert split["photo_split"]["held_out_rows"] == split["photo_val"]["rl"].shape[0] >= 200
    assert split["photo_train"]["rl"].shape[0] + split["photo_val"]["rl"].shape[0] == 768
    assert photo_split({**data, "train": {**data["train"], "source": None}}, 200) is None
