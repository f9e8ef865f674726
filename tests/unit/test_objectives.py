"""slime's RL objectives against hand-computed values, plus one learning test.

Expected numbers are written out or computed with plain Python `math` here, never by calling the
function under test.
"""

from __future__ import annotations

import math
import sys
from argparse import Namespace

import pytest
import torch

from slime_wf.plugins import PluginError
from slime_wf.training.objectives import (
    ObjectiveConfigError,
    ObjectiveOptions,
    PolicyOutputs,
    compute_advantages_and_returns,
    compute_approx_kl,
    compute_gae,
    get_sum_of_sample_mean,
    group_normalize,
    loss_function,
    make_reducer,
    masked_whiten,
    policy_loss,
    reinforce_plus_plus_returns,
    resolve_objective_args,
    response_log_probs_and_entropy,
    sequence_mean_ppo_kl,
    slice_responses,
    step_normalizer,
    tis_weights,
    token_log_probs_and_entropy,
    value_loss,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def close(actual, expected, tol=1e-5):
    actual = actual.tolist() if isinstance(actual, torch.Tensor) else actual
    if isinstance(expected, list | tuple):
        assert len(actual) == len(expected), (actual, expected)
        for a, e in zip(actual, expected, strict=True):
            assert a == pytest.approx(e, abs=tol), (actual, expected)
    else:
        assert actual == pytest.approx(expected, abs=tol)


def log_softmax_at(row, j, temperature=1.0):
    z = [v / temperature for v in row]
    return z[j] - math.log(sum(math.exp(v) for v in z))


def entropy_of(row, temperature=1.0):
    z = [v / temperature for v in row]
    norm = sum(math.exp(v) for v in z)
    return -sum(math.exp(v) / norm * math.log(math.exp(v) / norm) for v in z)


# ---- log-probs -------------------------------------------------------------------------------


def test_logits_at_t_score_the_token_at_t_plus_1():
    rows = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]
    tokens = torch.tensor([1, 0, 2, 1])
    lp, ent = token_log_probs_and_entropy(torch.tensor(rows), tokens)
    # entry t: row t scores tokens[t + 1]; the last row predicts past the sequence and is unused
    close(lp, [log_softmax_at(rows[0], 0), log_softmax_at(rows[1], 2), log_softmax_at(rows[2], 1)])
    close(lp[0], 2 - math.log(math.exp(2) + 2))
    close(ent, [entropy_of(rows[0]), entropy_of(rows[1]), entropy_of(rows[2])])

    lp2, ent2 = token_log_probs_and_entropy(torch.tensor(rows), tokens, temperature=2.0)
    close(
        lp2,
        [log_softmax_at(rows[0], 0, 2.0), log_softmax_at(rows[1], 2, 2.0), log_softmax_at(rows[2], 1, 2.0)],
    )
    close(ent2, [entropy_of(rows[0], 2.0), entropy_of(rows[1], 2.0), entropy_of(rows[2], 2.0)])
    greedy, _ = token_log_probs_and_entropy(torch.tensor(rows), tokens, temperature=0.0)
    close(greedy, lp.tolist())  # greedy engines report raw-logit log-softmax

    batched, _ = token_log_probs_and_entropy(torch.tensor([rows, rows]), torch.stack([tokens, tokens]))
    assert batched.shape == (2, 3)
    close(batched[1], lp.tolist())


def _two_sample_batch():
    # sample A: 3 tokens, response = last 1 (token 2); sample B: 4 tokens, response = last 2 (4, 1)
    g = torch.Generator().manual_seed(0)
    packed = torch.randn(7, 6, generator=g)
    tokens = [torch.tensor([5, 1, 2]), torch.tensor([0, 3, 4, 1])]
    return packed, tokens, [3, 4], [1, 2]


def test_the_default_chunks_on_cpu_are_cache_sized_and_agree_with_autograd():
    from slime_wf.training.objectives.logprobs import auto_chunk_rows, gather_log_probs_and_entropy

    vocab = 5400
    assert auto_chunk_rows(vocab, torch.device("cpu")) == (1 << 18) // vocab  # 48 rows: about 1 MB
    assert auto_chunk_rows(vocab, torch.device("cuda")) == (1 << 26) // vocab
    assert auto_chunk_rows(200_000, torch.device("cpu")) == 16
    torch.manual_seed(0)
    logits = (torch.randn(130, vocab) * 3).requires_grad_()  # three chunks of 48 rows, the last short
    whole, ref = (logits.detach().clone().requires_grad_() for _ in range(2))
    targets = torch.randint(0, vocab, (130,))
    weights = torch.randn(130)
    lp, ent = gather_log_probs_and_entropy(logits, targets, temperature=0.8)
    lp_whole, ent_whole = gather_log_probs_and_entropy(whole, targets, temperature=0.8, chunk_size=130)
    lsm = torch.log_softmax(ref / 0.8, dim=-1)
    lp_ref, ent_ref = lsm[torch.arange(130), targets], -(lsm.exp() * lsm).sum(-1)
    assert torch.allclose(lp, lp_ref, atol=1e-5) and torch.allclose(ent, ent_ref, atol=1e-4)
    for a, b in ((lp, ent), (lp_whole, ent_whole), (lp_ref, ent_ref)):
        ((a * weights).sum() + (b * weights.flip(0)).sum()).backward()
    assert torch.equal(logits.grad, whole.grad)  # chunks change nothing
    # the closed form against autograd through log_softmax: float32 rounding, gradients up to ~4
    assert torch.allclose(logits.grad, ref.grad, atol=1e-4, rtol=1e-4)


def test_response_slicing_packed_padded_and_chunked_agree_with_hand_alignment():
    packed, tokens, total, resp = _two_sample_batch()
    rows = packed.tolist()
    # A's response token (position 2) is scored by A's row 1 = packed row 1; B's tokens at
    # positions 2, 3 by B's rows 1, 2 = packed rows 3 + 1, 3 + 2
    expected = [[log_softmax_at(rows[1], 2)], [log_softmax_at(rows[4], 4), log_softmax_at(rows[5], 1)]]
    expected_ent = [[entropy_of(rows[1])], [entropy_of(rows[4]), entropy_of(rows[5])]]

    lp, ent = response_log_probs_and_entropy(packed, tokens, total, resp)
    for got, want in zip(lp, expected, strict=True):
        close(got, want)
    for got, want in zip(ent, expected_ent, strict=True):
        close(got, want)

    with_padding = torch.cat([packed, torch.randn(3, 6)]).unsqueeze(0)  # [1, T + 3, V], slime's THD
    lp_thd, _ = response_log_probs_and_entropy(with_padding, torch.cat(tokens), total, resp)
    padded = torch.zeros(2, 4, 6)
    padded[0, :3], padded[1] = packed[:3], packed[3:]
    lp_pad, _ = response_log_probs_and_entropy(
        padded, torch.tensor([[5, 1, 2, 0], [0, 3, 4, 1]]), total, resp
    )
    for a, b, want in zip(lp_thd, lp_pad, expected, strict=True):
        close(a, want)
        close(b, want)
    assert [v.shape[0] for v in slice_responses(padded[..., 0], total, resp, layout="padded")] == [1, 2]

    # gradients: the chunked closed-form backward against torch's autograd through log_softmax
    x1, x2, ref = (packed.clone().requires_grad_() for _ in range(3))
    a, ea = response_log_probs_and_entropy(x1, tokens, total, resp, temperature=0.7)
    b, eb = response_log_probs_and_entropy(x2, tokens, total, resp, temperature=0.7, chunk_size=1)
    weights = t(0.3, -1.2, 0.5)
    ((torch.cat(a) * weights).sum() + (torch.cat(ea) * weights.flip(0)).sum()).backward()
    ((torch.cat(b) * weights).sum() + (torch.cat(eb) * weights.flip(0)).sum()).backward()
    lsm = torch.log_softmax(ref / 0.7, dim=-1)
    rows_used, targets = [1, 4, 5], [2, 4, 1]
    lp_ref = lsm[rows_used, targets]
    ent_ref = -(lsm.exp() * lsm).sum(-1)[rows_used]
    ((lp_ref * weights).sum() + (ent_ref * weights.flip(0)).sum()).backward()
    close(torch.cat(a), lp_ref.tolist())
    assert torch.allclose(x1.grad, ref.grad, atol=1e-6) and torch.allclose(x2.grad, ref.grad, atol=1e-6)
    assert x1.grad[[0, 2, 3, 6]].abs().sum() == 0  # prompt rows and rows past a response get no gradient

    half = packed.to(torch.bfloat16).requires_grad_()
    lp_half, ent_half = response_log_probs_and_entropy(half, tokens, total, resp, entropy_grad=False)
    assert lp_half[1].dtype == torch.float32 and not ent_half[1].requires_grad
    torch.cat(lp_half).sum().backward()
    assert half.grad.dtype == torch.bfloat16

    with pytest.raises(ValueError, match="response_length 3 with total_length 3"):
        response_log_probs_and_entropy(packed, tokens, [3, 4], [3, 2])
    with pytest.raises(ValueError, match="outside the logits' vocabulary"):
        response_log_probs_and_entropy(packed, [torch.tensor([5, 1, 9]), tokens[1]], total, resp)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("used", ["log_probs", "entropy", "both"])
def test_backward_of_only_what_the_loss_reads_on_cropped_logits(used, temperature):
    """The log-prob or entropy alone reaching the loss (the other a metric or unused) gets the same
    gradient as torch's autograd, also for logits that are a vocabulary crop of wider ones (a model
    whose vocabulary is padded): strided rows, written back without a copy of the whole batch."""
    wide = torch.randn(2, 5, 9, generator=torch.Generator().manual_seed(3))
    tokens = torch.tensor([[5, 1, 2, 0, 3], [0, 3, 4, 1, 2]])
    total, resp = [4, 5], [2, 3]
    x, ref = (wide.clone().requires_grad_() for _ in range(2))
    lp, ent = response_log_probs_and_entropy(
        x[..., :6], tokens, total, resp, temperature=temperature, entropy_grad=used != "log_probs"
    )
    w_lp, w_ent = torch.arange(1.0, 6.0), torch.arange(5.0, 0.0, -1.0) / 3
    loss = 0
    if used != "entropy":
        loss = loss + (torch.cat(lp) * w_lp).sum()
    if used != "log_probs":
        loss = loss + (torch.cat(ent) * w_ent).sum()
    loss.backward()

    lsm = torch.log_softmax(ref[..., :6] / temperature, dim=-1)
    rows = [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]  # (sample, logit row) of each response token
    lp_ref = torch.stack([lsm[b, r, tokens[b, r + 1]] for b, r in rows])
    ent_ref = torch.stack([-(lsm[b, r].exp() * lsm[b, r]).sum() for b, r in rows])
    loss_ref = 0
    if used != "entropy":
        loss_ref = loss_ref + (lp_ref * w_lp).sum()
    if used != "log_probs":
        loss_ref = loss_ref + (ent_ref * w_ent).sum()
    loss_ref.backward()
    close(torch.cat(lp), lp_ref.tolist())
    close(torch.cat(ent), ent_ref.tolist())
    assert torch.allclose(x.grad, ref.grad, atol=1e-6), (x.grad - ref.grad).abs().max()
    assert x.grad[..., 6:].abs().sum() == 0


# ---- KL, clipping, reductions, TIS -----------------------------------------------------------


def test_kl_estimators_and_the_low_var_clamp():
    lp, base = t(-1.0, -20.0), t(-2.0, -5.0)  # log ratios 1 and -15
    close(compute_approx_kl(lp, base, "k1"), [1.0, -15.0])
    close(compute_approx_kl(lp, base, "k2"), [0.5, 112.5])
    k3 = compute_approx_kl(lp, base, "k3")
    close(k3[0], math.exp(-1))  # 1/r - 1 + log r with log r = 1
    assert k3[1].item() == pytest.approx(math.exp(15) - 1 - 15, rel=1e-6)
    close(compute_approx_kl(lp, base, "low_var_kl"), [math.exp(-1), 10.0])  # only low_var_kl is clamped
    close(compute_approx_kl(t(-1.0), t(-2.0), "k1", importance_ratio=t(2.0)), [2.0])
    with pytest.raises(ValueError, match="kl_loss_type 'k4'"):
        compute_approx_kl(lp, base, "k4")


def test_ppo_clip_boundaries_with_clip_higher():
    ratios = [0.79, 0.81, 1.27, 1.29]
    kl = torch.tensor([-math.log(r) for r in ratios] * 2)
    adv = t(*([1.0] * 4 + [-1.0] * 4))
    loss, clipfrac, dual = policy_loss(kl, adv, eps_clip=0.2, eps_clip_high=0.28)
    # A > 0: -min(r, clip(r)) ; A < 0: max(r, clip(r)), clip range [0.8, 1.28]
    close(loss, [-0.79, -0.81, -1.27, -1.28, 0.80, 0.81, 1.27, 1.29])
    close(clipfrac, [0, 0, 0, 1, 1, 0, 0, 0])
    close(dual, [0] * 8)

    log_probs = torch.tensor([math.log(r) for r in ratios], requires_grad=True)  # old log-probs are 0
    pg, _, _ = policy_loss(-log_probs, t(1.0, 1.0, 1.0, 1.0), 0.2, 0.28)
    pg.sum().backward()
    close(log_probs.grad, [-0.79, -0.81, -1.27, 0.0])  # d(-r)/dlog r = -r; the clipped token gets none


def test_dual_clip_caps_negative_advantage_losses():
    ratios = [5.0, 2.0, 5.0]
    kl = torch.tensor([-math.log(r) for r in ratios])
    loss, clipfrac, dual = policy_loss(
        kl, t(-1.0, -1.0, 1.0), eps_clip=0.2, eps_clip_high=0.28, eps_clip_c=3.0
    )
    close(loss, [3.0, 2.0, -1.28])  # min(3 * |A|, 5) ; below the cap ; positive A untouched
    close(dual, [1, 0, 0])
    close(clipfrac, [0, 0, 1])
    with pytest.raises(ValueError, match="must be > 1"):
        policy_loss(kl, t(-1.0, -1.0, 1.0), 0.2, 0.2, eps_clip_c=0.5)


def test_per_sample_mean_and_per_token_mean_differ_on_unequal_lengths():
    x = t(1, 2, 3, 4, 5, 6)
    masks = [t(1, 1), t(1, 1, 1, 0)]
    close(get_sum_of_sample_mean([2, 4], masks)(x), (1 + 2) / 2 + (3 + 4 + 5) / 3)  # slime: a sum
    close(make_reducer([2, 4], masks)(x), ((1 + 2) / 2 + (3 + 4 + 5) / 3) / 2)
    close(make_reducer([2, 4], masks, calculate_per_token_loss=True)(x), (1 + 2 + 3 + 4 + 5) / 5)
    # a fully masked sample contributes 0, but counts as a sample and as one token
    masks0 = [t(1, 1), t(0, 0, 0, 0)]
    close(make_reducer([2, 4], masks0)(x), 1.5 / 2)
    close(make_reducer([2, 4], masks0, calculate_per_token_loss=True)(x), 3 / 3)
    assert step_normalizer(masks0, True) == 3.0 and step_normalizer(masks0, False) == 2.0


def test_tis_weights_are_clamped_both_ways():
    train, rollout = t(-1.0, -1.0, -1.0), t(-1.0, -2.0, -0.5)
    w, m = tis_weights(train, rollout, tis_clip=2.0, tis_clip_low=0.7)
    close(w, [1.0, 2.0, 0.7])  # ratios 1, e, e^-0.5 = 0.607
    close(m["tis"], [1.0, math.e, math.exp(-0.5)])
    close(m["tis_clipfrac"], [0, 1, 1])
    close(m["tis_abs"], [0.0, math.e - 1, 1 - math.exp(-0.5)])
    w0, _ = tis_weights(train, rollout, tis_clip=2.0)
    close(w0, [1.0, 2.0, math.exp(-0.5)])


def test_gspo_ratio_is_the_masked_mean_per_sequence():
    kl = sequence_mean_ppo_kl(
        [t(-1.0, -2.0), t(-1.0, -1.0, -1.0)], [t(-1.5, -2.1), t(-1.2, -1.0, 5.0)], [t(1, 1), t(1, 1, 0)]
    )
    close(
        kl, [-0.3, -0.3, -0.1, -0.1, -0.1]
    )  # ((-0.5) + (-0.1)) / 2 ; (-0.2 + 0) / 2, the masked 5.0 ignored
    loss, clipfrac, _ = policy_loss(kl, t(1, 1, 1, 1, 1), 0.2, 0.2)
    close(loss, [-1.2, -1.2, -math.exp(0.1), -math.exp(0.1), -math.exp(0.1)])  # exp(0.3) = 1.35 clipped
    close(clipfrac, [1, 1, 0, 0, 0])


# ---- advantages -------------------------------------------------------------------------------


def test_group_normalization_with_and_without_std():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    a = 0.5 / (std + 1e-6)
    close(group_normalize(rewards, [4, 4]), [a, -a, -a, a, 0, 0, 0, 0])  # zero-std group: all 0
    close(group_normalize(rewards, [4, 4], std_normalization=False), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    close(
        group_normalize([3.0, 1.0, 2.0], [2, 1]), [1 / (math.sqrt(2) + 1e-6), -1 / (math.sqrt(2) + 1e-6), 0]
    )

    adv, ret = compute_advantages_and_returns(
        Namespace(advantage_estimator="grpo", kl_coef=0.5),
        rewards[:4],
        log_probs=[t(-1, -1), t(-1), t(-1, -1, -1), t(-1)],
        ref_log_probs=[t(-2, -2), t(-2), t(-2, -2, -2), t(-2)],
        loss_masks=[t(1, 1), t(1), t(1, 1, 0), t(1)],
        response_lengths=[2, 1, 3, 1],
        n_samples_per_prompt=4,
    )
    close(adv[0], [a, a])  # broadcast over tokens; grpo ignores kl_coef
    close(adv[2], [-a, -a, -a])
    close(ret[3], [a])
    adv2, _ = compute_advantages_and_returns(
        Namespace(advantage_estimator="grpo", grpo_std_normalization=False),
        rewards[:4],
        loss_masks=[t(1)] * 4,
        response_lengths=[1] * 4,
        n_samples_per_prompt=4,
    )
    close(torch.cat(adv2), [0.5, -0.5, -0.5, 0.5])
    with pytest.raises(ValueError, match="groups of n_samples_per_prompt=3"):
        compute_advantages_and_returns(
            Namespace(), rewards[:4], loss_masks=[t(1)] * 4, response_lengths=[1] * 4, n_samples_per_prompt=3
        )


def test_reinforce_plus_plus_discounted_returns_with_kl_penalty():
    (g,) = reinforce_plus_plus_returns([1.0], [t(0.1, 0.2, 0.3)], [t(1, 1, 0)], kl_coef=0.5, gamma=0.9)
    # token rewards -0.05, -0.1 + 1 (last masked-in token), -0.15; G_t = r_t + 0.9 G_{t+1}
    close(g, [-0.05 + 0.9 * (0.9 + 0.9 * -0.15), 0.9 + 0.9 * -0.15, -0.15])

    args = Namespace(
        advantage_estimator="reinforce_plus_plus",
        normalize_advantages=True,
        kl_coef=0.5,
        kl_loss_type="k1",
        gamma=0.9,
    )
    adv, ret = compute_advantages_and_returns(
        args,
        [1.0, 0.0],
        log_probs=[t(-1.0, -1.0, -1.0), t(-1.0)],
        ref_log_probs=[t(-1.1, -1.2, -1.3), t(-1.0)],
        loss_masks=[t(1, 1, 0), t(1)],
        response_lengths=[3, 1],
    )
    close(ret[0], g.tolist())
    close(ret[1], [0.0])
    vals = [g[0].item(), g[1].item(), 0.0]  # whitened over the three loss-masked tokens
    mean = sum(vals) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 2)
    close(torch.cat(adv), [(v - mean) / std for v in [g[0].item(), g[1].item(), -0.15, 0.0]])


def test_reinforce_plus_plus_baseline_centers_without_std():
    args = Namespace(
        advantage_estimator="reinforce_plus_plus_baseline", normalize_advantages=True, kl_coef=1.0
    )
    _, ret = compute_advantages_and_returns(
        args,
        [1.0, 0.0, 0.0, 0.0],
        log_probs=[t(-1.0, -1.0)] + [t(-1.0)] * 3,
        ref_log_probs=[t(-1.0, -1.5)] + [t(-1.0)] * 3,
        loss_masks=[t(1, 1)] + [t(1)] * 3,
        response_lengths=[2, 1, 1, 1],
        n_samples_per_prompt=4,
    )
    close(ret[0], [0.75, 0.75 - 0.5])  # 1 - mean 0.25, minus kl_coef * k1
    close(ret[1], [-0.25])
    with pytest.raises(ObjectiveConfigError, match="requires normalize_advantages"):
        resolve_objective_args(Namespace(advantage_estimator="reinforce_plus_plus_baseline"))


def test_gae_on_three_steps_and_the_ppo_dispatch():
    adv, ret = compute_gae(t(0.0, 0.0, 1.0), t(0.5, 0.6, 0.7), gamma=0.9, lambd=0.8)
    # deltas: 0 + 0.9*0.6 - 0.5 = 0.04 ; 0 + 0.9*0.7 - 0.6 = 0.03 ; 1 + 0 - 0.7 = 0.3 ; gamma*lambd = 0.72
    close(adv, [0.04 + 0.72 * (0.03 + 0.72 * 0.3), 0.03 + 0.72 * 0.3, 0.3])
    close(adv, [0.21712, 0.246, 0.3])
    close(ret, [0.71712, 0.846, 1.0])

    args = Namespace(advantage_estimator="ppo", kl_coef=0.1, kl_loss_type="k1", gamma=1.0, lambd=1.0)
    adv, ret = compute_advantages_and_returns(
        args,
        [1.0],
        log_probs=[t(-1.0, -1.0)],
        ref_log_probs=[t(-2.0, -1.5)],
        values=[t(0.2, 0.4)],
        loss_masks=[t(1, 0)],
        response_lengths=[2],
    )
    # token rewards: -0.1 * [1, 0.5] plus the reward on the last position (even though masked)
    close(ret[0], [-0.1 + 0.95, 1 - 0.05])
    close(adv[0], [0.85 - 0.2, 0.95 - 0.4])
    with pytest.raises(ValueError, match="needs the critic's values"):
        compute_advantages_and_returns(
            args, [1.0], log_probs=[t(-1.0)], ref_log_probs=[t(-1.0)], loss_masks=[t(1)], response_lengths=[1]
        )


def test_masked_whiten_uses_the_unbiased_masked_variance():
    out = masked_whiten(t(1, 2, 3, 100), t(1, 1, 1, 0))
    close(out, [-1.0, 0.0, 1.0, 98.0], tol=1e-4)  # mean 2, var 1 over the masked-in entries
    with pytest.raises(ValueError, match="no token of the batch"):
        masked_whiten(t(1, 2), t(0, 0))


def test_value_loss_is_clipped_around_the_old_values():
    losses, clipfrac = value_loss(t(1.0, 0.5, 0.0), t(0.5, 0.4, 0.0), t(0.0, 1.0, 1.0), value_clip=0.2)
    # token 0: clipped value 0.7 -> max(0.49, 1.0) ; token 1: inside -> 0.25 ; token 2: 1.0
    close(losses, [1.0, 0.25, 1.0])
    close(clipfrac, [1, 0, 0])


# ---- the loss entry point ---------------------------------------------------------------------


def _policy_batch():
    lp = [
        torch.tensor([-1.0, -2.0], requires_grad=True),
        torch.tensor([-0.8, -1.0, -3.0], requires_grad=True),
    ]
    ent = [t(0.3, 0.5), t(1.0, 2.0, 3.0)]
    batch = {
        "response_lengths": [2, 3],
        "total_lengths": [4, 5],
        "loss_masks": [t(1, 1), t(1, 1, 1)],
        "advantages": [t(1.0, 1.0), t(-0.5, -0.5, -0.5)],
        "log_probs": [t(-1.0, -2.0), t(-0.5, -1.0, -3.0)],
        "ref_log_probs": [t(-1.5, -2.0), t(-0.8, -1.5, -3.0)],
    }
    return lp, ent, batch


def test_policy_loss_function_combines_terms_as_slime_does():
    lp, ent, batch = _policy_batch()
    args = Namespace(entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="k1")
    loss, m = loss_function(args, batch, PolicyOutputs(lp, ent))
    # sample 1, token 0: ratio exp(-0.3) = 0.74 < 0.8 with A = -0.5 -> clipped loss 0.5 * 0.8
    pg = (-1 + (0.4 + 0.5 + 0.5) / 3) / 2
    entropy = ((0.3 + 0.5) / 2 + (1 + 2 + 3) / 3) / 2
    kl = ((0.5 + 0.0) / 2 + (0.0 + 0.5 + 0.0) / 3) / 2
    close(m["pg_loss"], pg)
    close(m["entropy_loss"], entropy)
    close(m["kl_loss"], kl)
    close(loss, pg - 0.01 * entropy + 0.1 * kl)
    close(m["loss"], pg - 0.01 * entropy + 0.1 * kl)
    close(m["pg_clipfrac"], (0 + 1 / 3) / 2)
    close(m["ppo_kl"], (0 + 0.3 / 3) / 2)
    assert "tis" not in m and "train_rollout_logprob_abs_diff" not in m

    args_tok = Namespace(calculate_per_token_loss=True)
    _, m_tok = loss_function(args_tok, batch, PolicyOutputs(lp, ent))
    close(m_tok["pg_loss"], (-1 - 1 + 0.4 + 0.5 + 0.5) / 5)  # differs from the per-sample -0.267
    close(m_tok["entropy_loss"], (0.3 + 0.5 + 1 + 2 + 3) / 5)

    lp, ent, batch = _policy_batch()
    loss, _ = loss_function(Namespace(), batch, PolicyOutputs(lp, ent))
    loss.backward()
    # d(-r A)/dlog p = -r A, weighted 1/2 per sample token (sample 0) and 1/3 (sample 1), over 2 samples
    close(lp[0].grad, [-1 / 4, -1 / 4])
    close(lp[1].grad, [0.0, 0.5 / 6, 0.5 / 6])  # the clipped token gets no gradient


def test_tis_and_mismatch_metrics_in_the_policy_loss():
    lp, ent, batch = _policy_batch()
    batch["rollout_log_probs"] = [t(-1.0, -2.5), t(-0.5, -1.0, -3.0)]
    args = Namespace(use_tis=True, tis_clip=1.5)
    _, m = loss_function(args, batch, PolicyOutputs(lp, ent))
    # train/rollout ratio of sample 0, token 1: exp(-2.0 + 2.5) = 1.65 -> clamped to 1.5
    close(m["pg_loss"], ((-1 - 1.5) / 2 + (0.4 + 0.5 + 0.5) / 3) / 2)
    close(m["tis_clipfrac"], (1 / 2 + 0) / 2)
    close(m["tis"], ((1 + math.exp(0.5)) / 2 + 1) / 2)
    close(m["ois"], ((1 + 1) / 2 + (math.exp(-0.3) + 1 + 1) / 3) / 2)
    close(m["train_rollout_logprob_abs_diff"], ((0 + 0.5) / 2 + 0) / 2)
    close(m["train_rollout_kl"], ((math.exp(0.5) - 1 - 0.5) / 2 + 0) / 2)  # k3 of KL(rollout || train)
    with pytest.raises(KeyError, match="rollout_log_probs"):
        del batch["rollout_log_probs"]
        loss_function(args, batch, PolicyOutputs(lp, ent))


def test_micro_batches_with_the_step_normalizer_add_up_to_the_step():
    lp, ent, batch = _policy_batch()
    lp.append(torch.tensor([-0.2, -0.4, -0.6, -0.8], requires_grad=True))
    ent.append(t(1.0, 1.0, 1.0, 1.0))
    for key, value in [
        ("response_lengths", 4),
        ("total_lengths", 6),
        ("loss_masks", t(1, 1, 0, 1)),
        ("advantages", t(2.0, 2.0, 2.0, 2.0)),
        ("log_probs", t(-0.3, -0.4, -0.5, -0.6)),
        ("ref_log_probs", t(-0.2, -0.4, -0.6, -0.8)),
    ]:
        batch[key].append(value)
    for per_token in (False, True):
        args = Namespace(calculate_per_token_loss=per_token, entropy_coef=0.1)
        whole, _ = loss_function(args, batch, PolicyOutputs(lp, ent))
        norm = step_normalizer(batch["loss_masks"], per_token)
        parts = []
        for idx in ([0, 2], [1]):
            micro = {k: [v[i] for i in idx] for k, v in batch.items()}
            loss, _ = loss_function(
                args, micro, PolicyOutputs([lp[i] for i in idx], [ent[i] for i in idx]), normalizer=norm
            )
            parts.append(loss)
        close(sum(parts), whole.item())


def test_sft_loss_is_the_masked_nll():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0], [1.0, 3.0]])
    batch = {"tokens": [torch.tensor([0, 1, 0, 1])], "response_lengths": [3], "loss_masks": [t(1, 0, 1)]}
    loss, m = loss_function(Namespace(loss_type="sft_loss"), batch, logits)
    nll = -(log_softmax_at([0.0, 1.0], 1) + log_softmax_at([0.0, 0.0], 1)) / 2
    close(loss, nll)
    close(m["loss"], nll)


def test_value_loss_function_slices_a_value_head_like_logits():
    head = t(9.0, 1.0, 0.5, 9.0, 9.0, 9.0).reshape(
        1, 6, 1
    )  # packed: sample of 3 tokens (response 2), of 3 (1)
    batch = {
        "total_lengths": [3, 3],
        "response_lengths": [2, 1],
        "loss_masks": [t(1, 1), t(1)],
        "values": [t(0.5, 0.4), t(9.0)],
        "returns": [t(0.0, 1.0), t(9.0)],
    }
    _, m = loss_function(Namespace(loss_type="value_loss", value_clip=0.2), batch, head)
    # sample 0 reads positions 0, 1 -> values (9.0, 1.0): clipped to 0.7 / 0.6 -> max((.7)^2, 81), max(.16, 0)
    close(m["value_loss"], ((81.0 + 0.16) / 2 + 0.0) / 2)
    close(m["value_clipfrac"], ((1 + 1) / 2 + 0) / 2)


def test_custom_loss_function_is_loaded_by_path(tmp_path, monkeypatch):
    (tmp_path / "my_objectives.py").write_text(
        "import torch\n"
        "def halved_nll(args, batch, logits, sum_of_sample_mean):\n"
        "    lp = torch.log_softmax(logits[0], -1)[1:2]\n"
        "    loss = -0.5 * sum_of_sample_mean(lp)\n"
        "    return loss, {'halved': loss.detach()}\n"
        "def wrong(args, batch):\n"
        "    return 0, {}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    batch = {"tokens": [torch.tensor([0, 1])], "response_lengths": [1], "loss_masks": [t(1)]}
    logits = torch.tensor([[0.0, 1.0], [5.0, 5.0]])
    args = Namespace(loss_type="custom_loss", custom_loss_function_path="my_objectives.halved_nll")
    loss, m = loss_function(args, batch, logits)
    close(loss, -0.5 * log_softmax_at([0.0, 1.0], 1))
    assert set(m) == {"halved"}
    with pytest.raises(PluginError, match="wrong signature"):
        loss_function(
            Namespace(loss_type="custom_loss", custom_loss_function_path="my_objectives.wrong"), batch, logits
        )
    sys.modules.pop("my_objectives", None)


def test_options_are_validated_with_clear_messages():
    args = resolve_objective_args(Namespace(eps_clip=0.3))
    assert args.eps_clip_high == 0.3 and args.tis_clip == 2.0 and args.kl_loss_type == "k1"
    with pytest.raises(ObjectiveConfigError, match="eps_clip_c = 0.9: Input should be greater than 1"):
        resolve_objective_args(Namespace(eps_clip_c=0.9))
    with pytest.raises(ObjectiveConfigError, match="kl_loss_type = 'k5': Input should be 'k1', 'k2'"):
        resolve_objective_args(Namespace(kl_loss_type="k5"))
    with pytest.raises(ObjectiveConfigError, match="loss_type=custom_loss needs custom_loss_function_path"):
        resolve_objective_args(Namespace(loss_type="custom_loss"))
    with pytest.raises(
        ValueError, match=r"batch\['advantages'\]\[1\] has 1 entries but response_length is 3"
    ):
        lp, ent, batch = _policy_batch()
        batch["advantages"][1] = t(1.0)
        loss_function(Namespace(), batch, PolicyOutputs(lp, ent))


# ---- learning -----------------------------------------------------------------------------------

VOCAB, TARGET, PROMPT_LEN, RESPONSE_LEN, GROUP = 8, 3, 2, 6, 8


class BagLM(torch.nn.Module):
    """Causal bag-of-tokens LM: position t sees the mean embedding of tokens 0..t."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        counts = torch.arange(1, tokens.size(1) + 1, dtype=torch.float32).view(1, -1, 1)
        return self.head(torch.tanh(self.embed(tokens).cumsum(1) / counts))


def count_validations(monkeypatch) -> list:
    """The list that every validation of ObjectiveOptions appends to from now on."""
    validated: list = []
    validate = ObjectiveOptions.model_validate.__func__

    def counting(cls, *args, **kwargs):
        validated.append(cls)
        return validate(cls, *args, **kwargs)

    monkeypatch.setattr(ObjectiveOptions, "model_validate", classmethod(counting))
    return validated


def test_resolved_options_are_passed_down_as_they_are(monkeypatch):
    options = ObjectiveOptions.from_args(Namespace(entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1))
    with pytest.raises(ValueError, match="frozen"):
        options.kl_loss_coef = 0.2
    validated = count_validations(monkeypatch)
    lp, ent, batch = _policy_batch()
    loss, _ = loss_function(Namespace(), batch, PolicyOutputs(lp, ent), options=options)
    adv, _ = compute_advantages_and_returns(
        options, t(1.0, 0.0), loss_masks=[t(1), t(1)], response_lengths=[1, 1], n_samples_per_prompt=2
    )
    assert validated == []
    close(torch.cat(adv), [0.7071, -0.7071], tol=1e-4)
    expected, _ = loss_function(
        Namespace(entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1), batch, PolicyOutputs(lp, ent)
    )
    assert validated == [ObjectiveOptions]  # a namespace is resolved on the call
    close(loss, expected.item())


def test_grpo_raises_the_reward_of_a_tiny_policy():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = BagLM()
    optim = torch.optim.Adam(model.parameters(), lr=0.02)
    prompts = torch.tensor([[0, 1], [2, 5]])
    args = Namespace(advantage_estimator="grpo", n_samples_per_prompt=GROUP, entropy_coef=0.0)
    mean_rewards = []
    for _ in range(20):
        seqs = prompts.repeat_interleave(GROUP, dim=0)
        rollout_lp = []
        with torch.no_grad():
            for _ in range(RESPONSE_LEN):
                logp = torch.log_softmax(model(seqs)[:, -1], -1)
                nxt = torch.multinomial(logp.exp(), 1, generator=gen)
                rollout_lp.append(logp.gather(1, nxt))
                seqs = torch.cat([seqs, nxt], dim=1)
        rollout_lp = torch.cat(rollout_lp, dim=1)
        rewards = (seqs[:, PROMPT_LEN:] == TARGET).float().mean(1)
        mean_rewards.append(rewards.mean().item())
        n = seqs.size(0)
        masks = [torch.ones(RESPONSE_LEN)] * n
        advantages, _ = compute_advantages_and_returns(
            args, rewards, loss_masks=masks, response_lengths=[RESPONSE_LEN] * n, n_samples_per_prompt=GROUP
        )
        batch = {
            "tokens": list(seqs),
            "total_lengths": [seqs.size(1)] * n,
            "response_lengths": [RESPONSE_LEN] * n,
            "loss_masks": masks,
            "advantages": advantages,
            "rollout_log_probs": list(rollout_lp),
        }
        norm = step_normalizer(masks, False)
        optim.zero_grad()
        for half in (slice(0, n // 2), slice(n // 2, n)):  # two micro-batches, one step
            micro = {k: v[half] for k, v in batch.items()}
            loss, metrics = loss_function(args, micro, model(seqs[half]), normalizer=norm)
            loss.backward()
            # same weights, same model: the trainer's log-probs match the sampler's token for token
            assert metrics["train_rollout_logprob_abs_diff"].item() < 1e-5
        optim.step()
    before, after = sum(mean_rewards[:3]) / 3, sum(mean_rewards[-3:]) / 3
    assert before < 0.25 and after > before + 0.4, mean_rewards  # chance level is 1/8
