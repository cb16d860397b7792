"""Behaviour of the ATA building blocks: rewards (eq. 6-9), the length policy, the quality dial."""

import itertools
import math

import pytest
import torch

from adatok_vlm.tokenizer.policy import (
    IMAGE_STATISTICS,
    QualityCurveHead,
    TokenLengthPolicy,
    allocate_budget,
    image_statistics,
    length_grid,
    lengths_to_indices,
)
from adatok_vlm.tokenizer.rewards import (
    RewardSpec,
    baseline_lengths,
    continuous_reward,
    default_sharpness,
    entropy_weight,
    pool_baseline,
    reinforce_loss,
    relative_advantage,
    structured_reward,
)

D = torch.float64


def convex_curve(lengths):
    """A diminishing-returns rl(L) (Appendix B.1): convex and decreasing."""
    return 0.2 * torch.exp(-lengths.to(D) / 20) + 0.005


def exp_curves(a, tau, c, grid):
    """rl(L) = a exp(-L / tau) + c per row: convex decreasing curves [B, K]."""
    return a[:, None] * torch.exp(-grid.to(D)[None] / tau[:, None]) + c[:, None]


# --------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------


def test_continuous_reward_hand_values():
    rl = torch.tensor([0.01, 0.05, 0.0], dtype=D)
    length = torch.tensor([64, 256, 0])
    # -20 * 0.01 - 0.2 * 64/256 = -0.25 ; -20 * 0.05 - 0.2 = -1.2 ; 0
    torch.testing.assert_close(continuous_reward(rl, length, 256), torch.tensor([-0.25, -1.2, 0.0], dtype=D))
    assert continuous_reward(0.5, 128, 256, alpha=1.0, beta=1.0).item() == pytest.approx(-1.0)
    # broadcasting: one length for every rl
    assert continuous_reward(torch.tensor([0.0, 0.1]), 128, 256).tolist() == pytest.approx([-0.1, -2.1])


def test_structured_reward_hard_hand_values():
    rl = torch.tensor([0.01, 0.02, 0.05, 0.12], dtype=D)
    length = torch.tensor([64, 256, 64, 64])
    # met: 1 + (256 - 64)/256 = 1.75 ; exactly at the threshold counts as met: 1 + 0 = 1
    # missed: -(0.05 - 0.02) * 10 = -0.3 ; -(0.12 - 0.02) * 10 = -1.0
    expected = torch.tensor([1.75, 1.0, -0.3, -1.0], dtype=D)
    torch.testing.assert_close(structured_reward(rl, length, 256, hard=True), expected)


def test_structured_reward_smooth_hand_values():
    assert default_sharpness(0.02) == pytest.approx(2500.0)
    # At the threshold the switch is half-way: 0.5 * R_high + 0.5 * 0.
    assert structured_reward(0.02, 64, 256).item() == pytest.approx(0.875)
    # s = sigmoid(1000 * (0.02 - 0.021)) = sigmoid(-1) = 0.26894142
    # R = 0.26894142 * 1.5 + 0.73105858 * (-0.01) = 0.39610154
    r = structured_reward(torch.tensor(0.021, dtype=D), 128, 256, sharpness=1000.0)
    assert r.item() == pytest.approx(0.39610154, abs=1e-7)
    # Far from the threshold the smoothed reward is the piecewise one.
    rl = torch.tensor([0.0, 0.01, 0.015, 0.025, 0.05, 0.3], dtype=D)
    length = torch.tensor([1, 64, 100, 100, 200, 256])
    torch.testing.assert_close(
        structured_reward(rl, length, 256), structured_reward(rl, length, 256, hard=True), atol=1e-4, rtol=0
    )


def test_structured_reward_is_continuous_at_threshold():
    around = torch.tensor([0.02 - 1e-7, 0.02 + 1e-7], dtype=D)
    smooth = structured_reward(around, 100, 256)
    hard = structured_reward(around, 100, 256, hard=True)
    assert (smooth[0] - smooth[1]).abs() < 1e-3
    assert (hard[0] - hard[1]).abs() > 1.0  # the paper's piecewise form jumps (Appendix B.3)
    # No jump anywhere: on a 1e-6 sweep the largest step is bounded by the sigmoid's slope.
    rl = torch.linspace(0.0, 0.04, 40001, dtype=D)
    assert structured_reward(rl, 100, 256).diff().abs().max() < 2e-3
    assert structured_reward(rl, 100, 256, hard=True).diff().abs().max() > 1.0


def test_rewards_on_convex_curve_have_one_peak():
    """Appendix B: on a convex decreasing rl(L), eq. 6 is concave in L; eq. 7 is unimodal.

    What we assert and why: the continuous reward is concave (second differences <= 0). The
    structured reward is *not* concave across the threshold (hard: a jump up; smoothed: an S-shaped
    step whose lower half is convex), so there we assert what the paper's argument needs, a single
    peak (the sign of the first difference changes once, + to -), at the threshold length for the
    hard form and a few tokens past it for the smoothed one, plus concavity wherever the smooth switch
    has settled (every point >= 12 switch widths from rl_base, s within 6e-6 of 0 or 1).
    """
    lengths = torch.arange(1, 257)
    rl = convex_curve(lengths)

    def single_peak(r):
        signs = torch.sign(r.diff())
        signs = signs[signs != 0]
        return int((signs[1:] != signs[:-1]).sum()) == 1 and signs[0] > 0 and signs[-1] < 0

    cont = continuous_reward(rl, lengths, 256)
    assert cont.diff(n=2).max() <= 1e-12
    assert single_peak(cont)

    t_star = int(lengths[rl <= 0.02][0])  # first length meeting the target (52)
    hard = structured_reward(rl, lengths, 256, hard=True)
    assert single_peak(hard) and int(lengths[hard.argmax()]) == t_star

    sharpness = default_sharpness(0.02)
    smooth = structured_reward(rl, lengths, 256)
    assert single_peak(smooth)
    assert t_star <= int(lengths[smooth.argmax()]) <= t_star + 6
    settled = sharpness * (rl - 0.02).abs() > 12
    settled3 = settled[:-2] & settled[1:-1] & settled[2:]
    assert settled3.sum() > 200
    assert smooth.diff(n=2)[settled3].max() <= 1e-9


def test_reward_spec_dispatches_and_validates():
    rl, length = torch.tensor([0.01, 0.03]), torch.tensor([32, 200])
    torch.testing.assert_close(RewardSpec()(rl, length, 256), continuous_reward(rl, length, 256))
    spec = RewardSpec("structured", gamma=5.0, rl_base=0.025, sharpness=4000.0)
    torch.testing.assert_close(
        spec(rl, length, 256), structured_reward(rl, length, 256, rl_base=0.025, gamma=5.0, sharpness=4000.0)
    )
    hard = RewardSpec("structured", hard=True)
    torch.testing.assert_close(hard(rl, length, 256), structured_reward(rl, length, 256, hard=True))
    for kwargs, field in [
        (dict(kind="threshold"), "kind"),
        (dict(alpha=-1.0), "alpha"),
        (dict(beta=float("nan")), "beta"),
        (dict(gamma=-0.1), "gamma"),
        (dict(rl_base=0.0), "rl_base"),
        (dict(sharpness=-5.0), "sharpness"),
    ]:
        with pytest.raises(ValueError, match=field):
            RewardSpec(**kwargs)


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: continuous_reward(torch.tensor([0.1, float("nan")]), 10, 256), "rl"),
        (lambda: continuous_reward(0.1, torch.tensor([10.0, float("inf")]), 256), "length"),
        (lambda: continuous_reward(0.1, 300, 256), "length"),
        (lambda: continuous_reward(0.1, 10, 0), "max_length"),
        (lambda: continuous_reward(0.1, 10, 256, alpha=float("inf")), "alpha"),
        (lambda: structured_reward(torch.tensor([float("nan")]), 10, 256), "rl"),
        (lambda: structured_reward(0.1, 10, 256, rl_base=-0.02), "rl_base"),
        (lambda: structured_reward(0.1, 10, 256, sharpness=0.0), "sharpness"),
        (lambda: relative_advantage(torch.tensor([float("nan")]), torch.tensor([0.0])), "reward"),
        (lambda: relative_advantage(torch.tensor([1.0]), torch.tensor([float("inf")])), "baseline_reward"),
        (lambda: relative_advantage(torch.tensor([1.0]), torch.tensor([0.0]), mode="ppo"), "mode"),
        (lambda: relative_advantage(torch.tensor([1.0]), torch.tensor([0.0]), mu=float("nan")), "mu"),
        (lambda: entropy_weight(0, 10, float("nan")), "start"),
        (lambda: entropy_weight(0, 10, 0.1, end=0.2), "end"),
        (lambda: entropy_weight(0, 0, 0.1), "total_steps"),
        (lambda: entropy_weight(-1, 10, 0.1), "step"),
        (lambda: entropy_weight(0, 10, 0.1, schedule="step"), "schedule"),
        (lambda: reinforce_loss(torch.tensor([float("nan")]), torch.ones(1), torch.ones(1), 0.0), "log_prob"),
        (lambda: reinforce_loss(torch.zeros(1), torch.tensor([float("nan")]), torch.ones(1), 0.0), "advantage"),
        (lambda: reinforce_loss(torch.zeros(1), torch.ones(1), torch.tensor([float("inf")]), 0.0), "entropy"),
        (lambda: reinforce_loss(torch.zeros(1), torch.ones(1), torch.ones(1), float("nan")), "entropy_weight"),
        (lambda: reinforce_loss(torch.zeros(4, 1), torch.ones(4), torch.ones(4), 0.0), "same shape"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


# --------------------------------------------------------------------------------------------------
# Advantage, entropy schedule, REINFORCE loss
# --------------------------------------------------------------------------------------------------


def test_relative_advantage_both_modes_and_detached_baseline():
    reward = torch.tensor([1.0, -0.5], requires_grad=True)
    baseline = torch.tensor([0.5, 0.5], requires_grad=True)
    adv = relative_advantage(reward, baseline, mu=0.1)
    # eq. 8: R + mu (R - R_mean) = 1 + 0.1 * 0.5 = 1.05 ; -0.5 + 0.1 * (-1) = -0.6
    torch.testing.assert_close(adv, torch.tensor([1.05, -0.6]))
    adv.sum().backward()
    torch.testing.assert_close(reward.grad, torch.full((2,), 1.1))
    assert baseline.grad is None  # no gradient through the baseline

    reward.grad = None
    adv = relative_advantage(reward, baseline, mu=0.1, mode="baseline")
    torch.testing.assert_close(adv, torch.tensor([0.5, -1.0]))  # R - R_mean, mu unused
    adv.sum().backward()
    torch.testing.assert_close(reward.grad, torch.ones(2))
    assert baseline.grad is None
    # A scalar baseline broadcasts.
    torch.testing.assert_close(relative_advantage(torch.tensor([2.0, 0.0]), 1.0, mu=0.5), torch.tensor([2.5, -0.5]))


def test_baseline_readings_of_eq8():
    """'R(L_mean) computed on a batch basis', three ways: each image's own rounded E_pi[L]; the batch's
    mean E_pi[L] for every image; the per-image baselines' batch mean for every image."""
    grid = length_grid(1, 8)
    expected = torch.tensor([1.2, 2.6, 7.9, 4.4])
    assert baseline_lengths(expected, grid, "image").tolist() == [1, 3, 8, 4]
    assert baseline_lengths(expected, grid, "batch_reward").tolist() == [1, 3, 8, 4]
    assert baseline_lengths(expected, grid, "batch_length").tolist() == [4, 4, 4, 4]   # mean 4.025
    assert baseline_lengths(torch.tensor([2.0, 3.2]), length_grid(2, 8, 2), "image").tolist() == [2, 4]
    measured = torch.tensor([1.0, 2.0, 3.0, 6.0], requires_grad=True)
    torch.testing.assert_close(pool_baseline(measured, "image"), measured.detach())
    torch.testing.assert_close(pool_baseline(measured, "batch_length"), measured.detach())
    torch.testing.assert_close(pool_baseline(measured, "batch_reward"), torch.full((4,), 3.0))
    assert not pool_baseline(measured, "batch_reward").requires_grad
    with pytest.raises(ValueError, match="reading"):
        baseline_lengths(expected, grid, "global")
    with pytest.raises(ValueError, match="reading"):
        pool_baseline(measured, "per_batch")
    with pytest.raises(ValueError, match="expected_lengths"):
        baseline_lengths(torch.tensor([1.0, float("nan")]), grid)
    with pytest.raises(ValueError, match="expected_lengths"):
        baseline_lengths(torch.ones(2, 2), grid)


@pytest.mark.parametrize(
    "schedule, middle",
    [
        ("linear", 0.5),
        ("cosine", 0.5),
        ("exponential", (math.exp(-2.5) - math.exp(-5.0)) / (1 - math.exp(-5.0))),  # 0.0758578
        ("constant", 1.0),
    ],
)
def test_entropy_weight_schedules(schedule, middle):
    start_value = entropy_weight(0, 100, 1.0, schedule=schedule)
    assert start_value == pytest.approx(1.0)
    assert entropy_weight(50, 100, 1.0, schedule=schedule) == pytest.approx(middle)
    end_expected = 1.0 if schedule == "constant" else 0.0
    assert entropy_weight(100, 100, 1.0, schedule=schedule) == pytest.approx(end_expected, abs=1e-12)
    assert entropy_weight(150, 100, 1.0, schedule=schedule) == pytest.approx(end_expected, abs=1e-12)
    for end in (0.0, 0.1):
        values = [entropy_weight(s, 100, 1.0, end=end, schedule=schedule) for s in range(151)]
        assert all(b <= a + 1e-15 for a, b in zip(values, values[1:]))
        if schedule != "constant":
            assert values[100] == pytest.approx(end, abs=1e-12) and values[0] == pytest.approx(1.0)
            assert values[25] < 1.0 and values[75] > end


def test_reinforce_loss_value_gradient_and_logs():
    logits = torch.tensor([[0.2, -0.1, 0.4], [0.0, 0.3, -0.2]], requires_grad=True)
    dist = torch.distributions.Categorical(logits=logits)
    action = torch.tensor([2, 0])
    log_prob, entropy = dist.log_prob(action), dist.entropy()
    advantage_source = torch.tensor([1.5, -0.5], requires_grad=True)
    advantage = advantage_source * 1.0  # has a graph: must be detached inside
    loss, logs = reinforce_loss(log_prob, advantage, entropy, 0.05)
    expected = -(log_prob * torch.tensor([1.5, -0.5])).mean() - 0.05 * entropy.mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert advantage_source.grad is None
    assert set(logs) >= {"loss", "policy_loss", "entropy", "entropy_weight", "advantage_mean"}
    assert all(isinstance(v, float) for v in logs.values())
    assert logs["loss"] == pytest.approx(loss.item()) and logs["entropy_weight"] == 0.05

    # Gradient sign: a positive advantage raises the probability of its action, a negative one lowers it.
    for adv_value, direction in ((1.0, +1), (-1.0, -1)):
        logits = torch.zeros(1, 4, requires_grad=True)
        dist = torch.distributions.Categorical(logits=logits)
        loss, _ = reinforce_loss(dist.log_prob(torch.tensor([1])), torch.tensor([adv_value]), dist.entropy(), 0.0)
        loss.backward()
        with torch.no_grad():
            stepped = torch.softmax(logits - 0.1 * logits.grad, -1)[0, 1]
        assert (stepped - 0.25) * direction > 0


# --------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------


def test_length_grid():
    assert length_grid(1, 10, 4).tolist() == [1, 5, 9, 10]  # max_tokens always included
    g = length_grid(8, 256, 8)
    assert g.dtype == torch.long and g.numel() == 32 and g[0] == 8 and g[-1] == 256
    assert length_grid(5, 5).tolist() == [5]
    assert length_grid(1, 256).tolist() == list(range(1, 257))
    for args, name in [((0, 10), "min_tokens"), ((10, 5), "max_tokens"), ((1, 10, 0), "step")]:
        with pytest.raises(ValueError, match=name):
            length_grid(*args)


def test_policy_starts_near_uniform_and_samples_on_grid():
    torch.manual_seed(0)
    grid = length_grid(4, 64, 4)
    policy = TokenLengthPolicy(16, grid, hidden_dim=32)
    features = 3.0 * torch.randn(64, 16)
    probs = policy.distribution(features).probs
    assert probs.shape == (64, grid.numel())
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / grid.numel()), atol=1e-2, rtol=0)

    lengths, log_prob, entropy = policy.sample(features, generator=torch.Generator().manual_seed(1))
    assert lengths.dtype == torch.long and set(lengths.tolist()) <= set(grid.tolist())
    assert len(set(lengths.tolist())) > 5  # near-uniform: it explores
    torch.testing.assert_close(log_prob, policy.log_prob(features, lengths))
    torch.testing.assert_close(entropy, torch.full((64,), math.log(grid.numel())), atol=1e-3, rtol=0)
    assert log_prob.requires_grad and entropy.requires_grad
    again, _, _ = policy.sample(features, generator=torch.Generator().manual_seed(1))
    assert torch.equal(lengths, again)


def test_policy_mode_and_expected_length():
    grid = length_grid(10, 40, 10)  # [10, 20, 30, 40]
    policy = TokenLengthPolicy(4, grid, hidden_dim=8, num_layers=1)
    probs = torch.tensor([0.1, 0.2, 0.6, 0.1])
    with torch.no_grad():
        policy.mlp.out.weight.zero_()
        policy.mlp.out.bias.copy_(probs.log())
    features = torch.randn(3, 4)
    assert policy.mode(features).tolist() == [30, 30, 30]
    # E[L] = 1 + 4 + 18 + 4 = 27 -> nearest allowed length 30
    torch.testing.assert_close(policy.expected_length(features), torch.full((3,), 27.0))
    assert policy.rounded_expected_length(features).tolist() == [30, 30, 30]
    with torch.no_grad():
        policy.mlp.out.bias.copy_(torch.tensor([0.5, 0.3, 0.1, 0.1]).log())  # E[L] = 18 -> 20
    assert policy.rounded_expected_length(features).tolist() == [20, 20, 20]
    assert policy.mode(features).tolist() == [10, 10, 10]


def test_policy_pools_token_features_and_ignores_masked_positions():
    torch.manual_seed(0)
    policy = TokenLengthPolicy(8, length_grid(1, 16), hidden_dim=16)
    with torch.no_grad():
        policy.mlp.out.weight.normal_()  # not uniform, so logits depend on features
    tokens = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    pooled = torch.stack([tokens[0, :3].mean(0), tokens[1].mean(0)])
    torch.testing.assert_close(policy(tokens, mask), policy(pooled))
    torch.testing.assert_close(policy(tokens), policy(tokens.mean(1)))
    scrambled = tokens.clone()
    scrambled[0, 3:] = 1e3
    torch.testing.assert_close(policy(scrambled, mask), policy(tokens, mask))
    torch.testing.assert_close(
        policy.log_prob(scrambled, torch.tensor([3, 7]), mask=mask), policy.log_prob(tokens, [3, 7], mask=mask)
    )
    with pytest.raises(ValueError, match="mask"):
        policy(tokens, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="feature_dim"):
        policy(torch.randn(2, 7))
    with pytest.raises(ValueError, match="finite"):
        policy(torch.full((2, 8), float("nan")))


def test_policy_off_grid_length_raises_and_grid_roundtrips_state_dict():
    policy = TokenLengthPolicy(4, [2, 4, 8, 16], hidden_dim=8)
    features = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"\[5\]"):
        policy.log_prob(features, torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="lengths"):
        policy.log_prob(features, torch.tensor([4, 32]))
    assert lengths_to_indices(torch.tensor([2, 16, 8]), policy.grid).tolist() == [0, 3, 2]
    for bad in ([4, 2, 8], [0, 1], []):
        with pytest.raises(ValueError, match="lengths"):
            TokenLengthPolicy(4, bad)

    state = policy.state_dict()
    assert state["grid"].tolist() == [2, 4, 8, 16]
    other = TokenLengthPolicy(4, [1, 2, 3, 4], hidden_dim=8)
    other.load_state_dict(state)
    assert other.grid.tolist() == [2, 4, 8, 16]
    torch.testing.assert_close(other.log_prob(features, [8, 16]), policy.log_prob(features, [8, 16]))


@pytest.mark.parametrize("mode", ["relative", "baseline"])
def test_reinforce_learns_a_contextual_bandit(mode):
    """Two feature clusters whose best length is 5 and 20. The reward is the structured reward of a
    synthetic rl(L) that meets rl_base from the target length on, so it peaks at the target."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    grid = length_grid(5, 40, 5)  # [5, 10, ..., 40]
    center = torch.randn(8, generator=gen)
    centers, targets = torch.stack([center, -center]), torch.tensor([5, 20])

    def batch(n):
        cluster = torch.randint(0, 2, (n,), generator=gen)
        return centers[cluster] + 0.5 * torch.randn(n, 8, generator=gen), targets[cluster]

    def reward(lengths, target):  # rl(target) = rl_base / 2; one grid step shorter misses rl_base
        rl = 0.01 * torch.exp(-(lengths - target).float() / 5)
        return structured_reward(rl, lengths, 40)

    policy = TokenLengthPolicy(8, grid, hidden_dim=32, num_layers=1)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    steps = 300
    for step in range(steps):
        features, target = batch(64)
        lengths, log_prob, entropy = policy.sample(features, generator=gen)
        baseline = reward(policy.rounded_expected_length(features), target)
        advantage = relative_advantage(reward(lengths, target), baseline, mode=mode)
        loss, _ = reinforce_loss(log_prob, advantage, entropy, entropy_weight(step, steps, 0.01))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    features, target = batch(1000)
    accuracy = (policy.mode(features) == target).float().mean().item()
    assert accuracy >= 0.9, accuracy


# --------------------------------------------------------------------------------------------------
# Quality curve head
# --------------------------------------------------------------------------------------------------


def synthetic_curves(z, grid):
    """Features z [B, 4] -> a known convex decreasing rl(L) family [B, K]."""
    a = 0.1 * torch.exp(0.5 * z[:, 0])
    tau = 12 * torch.exp(0.3 * z[:, 1])
    c = 0.003 * torch.exp(0.3 * z[:, 2])
    return exp_curves(a, tau, c, grid).float()


def test_quality_curve_head_is_monotone():
    torch.manual_seed(0)
    head = QualityCurveHead(16, length_grid(1, 64), hidden_dim=32)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(std=0.3)  # arbitrary weights: monotone by construction, not by training
    features = 5.0 * torch.randn(32, 16)
    log_curves = head(features)
    assert log_curves.shape == (32, 64) and torch.isfinite(log_curves).all()
    assert (log_curves.diff(dim=-1) <= 0).all()
    curves = head.predict_curve(features)
    assert (curves >= 0).all() and (curves.diff(dim=-1) <= 0).all()


def test_quality_curve_head_keeps_its_quality_promise():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    grid = length_grid(4, 64, 4)
    head = QualityCurveHead(4, grid, hidden_dim=64)
    optimizer = torch.optim.Adam(head.parameters(), lr=5e-3)
    for _ in range(300):
        z = torch.randn(128, 4, generator=gen)
        idx = torch.randint(0, grid.numel(), (128, 4), generator=gen)  # 4 measured lengths per image
        loss = head.curve_loss(z, grid[idx], synthetic_curves(z, grid).gather(1, idx))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.01  # log-space MSE

    z = torch.randn(2000, 4, generator=gen)
    truth = synthetic_curves(z, grid)
    assert (head.predict_curve(z).diff(dim=-1) <= 0).all()
    max_mse = 0.02
    reachable = truth[:, -1] <= max_mse
    assert reachable.float().mean() > 0.95
    chosen = head.min_length_for_quality(z, max_mse)
    idx = lengths_to_indices(chosen, grid)
    kept = truth.gather(1, idx[:, None]).squeeze(1) <= max_mse
    assert kept[reachable].float().mean() >= 0.9
    # ... and not by spending everything: within one grid step of the true fewest tokens.
    oracle = (truth <= max_mse).float().argmax(dim=1)
    assert ((idx - oracle)[reachable].abs() <= 1).float().mean() >= 0.95
    # per-image targets; an unreachable target gives the longest length
    per_image = head.min_length_for_quality(z[:3], torch.tensor([0.5, 0.02, 1e-6]))
    assert per_image[0] == grid[0] and per_image[2] == grid[-1]
    with pytest.raises(ValueError, match="max_mse"):
        head.min_length_for_quality(z[:3], 0.0)
    with pytest.raises(ValueError, match="measured_rl"):
        head.curve_loss(z[:2], [4, 8], torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match=r"\[6\]"):
        head.curve_loss(z[:2], [4, 6], torch.tensor([0.1, 0.1]))


# --------------------------------------------------------------------------------------------------
# Budget allocation
# --------------------------------------------------------------------------------------------------


def random_convex_curves(n, grid, seed):
    gen = torch.Generator().manual_seed(seed)
    a = 0.02 + 0.3 * torch.rand(n, generator=gen, dtype=D)
    tau = 3 + 40 * torch.rand(n, generator=gen, dtype=D)
    c = 0.01 * torch.rand(n, generator=gen, dtype=D)
    return exp_curves(a, tau, c, grid)


@pytest.mark.parametrize("budget", [4, 10.5, 32, 47.3, 64])
def test_allocate_budget_meets_budget_and_beats_uniform(budget):
    grid = length_grid(4, 64, 4)
    curves = random_convex_curves(500, grid, seed=1)
    lengths = allocate_budget(curves, grid, budget)
    assert lengths.shape == (500,) and set(lengths.tolist()) <= set(grid.tolist())
    mean = lengths.double().mean().item()
    assert budget - 4 / 500 < mean <= budget + 1e-9  # <= budget, short by less than one step / B
    if float(budget) in grid.tolist():
        uniform = curves[:, lengths_to_indices(torch.tensor([int(budget)]), grid)].sum()
        chosen = curves.gather(1, lengths_to_indices(lengths, grid)[:, None]).sum()
        assert chosen <= uniform + 1e-12
        if 4 < budget < 64:
            assert chosen < uniform - 1e-3  # strictly better when the curves differ


def test_allocate_budget_matches_brute_force():
    grid = torch.tensor([4, 8, 12, 16])
    for seed in range(5):
        curves = random_convex_curves(3, grid, seed=seed)
        for budget in (4, 5, 7.5, 8, 10, 13, 16):
            lengths = allocate_budget(curves, grid, budget)
            got = curves.gather(1, lengths_to_indices(lengths, grid)[:, None]).sum().item()
            best = min(
                sum(curves[b, i].item() for b, i in enumerate(choice))
                for choice in itertools.product(range(4), repeat=3)
                if sum(grid[i].item() for i in choice) <= budget * 3
            )
            assert got == pytest.approx(best, abs=1e-12), (seed, budget, lengths)


def test_allocate_budget_large_batch_uneven_grid_and_validation():
    grid = length_grid(1, 256, 5)  # last step is shorter (251 -> 256)
    curves = random_convex_curves(3000, grid, seed=2)
    lengths = allocate_budget(curves, grid, 100.0)
    assert 100.0 - 5 / 3000 < lengths.double().mean().item() <= 100.0
    assert (allocate_budget(curves, grid, 256) == 256).all()
    assert (allocate_budget(curves, grid, 1) == 1).all()
    assert allocate_budget(curves[:0], grid, 50).shape == (0,)
    for bad in (0.5, 257, float("nan")):
        with pytest.raises(ValueError, match="mean_budget"):
            allocate_budget(curves, grid, bad)
    with pytest.raises(ValueError, match="curves"):
        allocate_budget(curves[:, :-1], grid, 50)
    with pytest.raises(ValueError, match="curves"):
        allocate_budget(torch.full((2, grid.numel()), float("nan")), grid, 50)


def test_allocate_budget_equals_step_by_step_greedy_on_non_convex_curves():
    """The vectorised ranking is the greedy of the docstring, also where curves are not convex."""
    grid = length_grid(2, 16, 2)
    gen = torch.Generator().manual_seed(3)
    drops = torch.rand(20, grid.numel() - 1, generator=gen, dtype=D) ** 3  # irregular, non-convex
    curves = 1.0 - torch.cat([torch.zeros(20, 1, dtype=D), drops.cumsum(1)], dim=1)
    for budget in (3, 6.5, 9, 14):
        counts, spent = [0] * 20, 0.0
        while True:
            open_ = [b for b in range(20) if counts[b] < grid.numel() - 1]
            if not open_:
                break
            best = max(open_, key=lambda b: (curves[b, counts[b]] - curves[b, counts[b] + 1]).item())
            if spent + 2 > (budget - 2) * 20:
                break
            counts[best] += 1
            spent += 2
        assert allocate_budget(curves, grid, budget).tolist() == grid[counts].tolist()


def test_image_statistics_measure_detail_deterministically():
    """Flat images have no detail (every gradient statistic at the floor), a checkerboard the most; more
    noise, larger statistics; the same pixels give the same numbers; one row per image, one column each."""
    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 16, 16), 0.5)
    smooth = torch.linspace(0, 1, 16).expand(1, 3, 16, 16).clone()
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float().expand(1, 3, 16, 16)
    noisy = [(0.5 + s * torch.randn(1, 3, 16, 16, generator=g)).clamp(0, 1) for s in (0.05, 0.2)]
    batch = torch.cat([flat, smooth, checker, *noisy])
    stats = image_statistics(batch)
    assert stats.shape == (5, len(IMAGE_STATISTICS)) and stats.dtype == torch.float32
    torch.testing.assert_close(stats[0], torch.full((len(IMAGE_STATISTICS),), math.log(1e-4)))
    assert (stats[4] > stats[3]).all(), "more noise, more detail"
    lap = IMAGE_STATISTICS.index("laplacian")
    assert stats[2, lap] > stats[4, lap] > stats[1, lap], "a checkerboard has the most curvature, a ramp ~none"
    torch.testing.assert_close(image_statistics(batch), stats, rtol=0, atol=0)
    torch.testing.assert_close(image_statistics(batch[3:4]), stats[3:4])   # per image: batch-independent
    with pytest.raises(ValueError, match="pixels"):
        image_statistics(torch.rand(3, 16, 16))
    with pytest.raises(TypeError, match="pixels"):
        image_statistics(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
