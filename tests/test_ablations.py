"""The ablation flags against hand-computed values: GSPO, truncated importance sampling, DAPO's
overlong shaping and filtering, batch-std advantages; dynamic sampling and a short learning run
with each flag on."""
import math

import pytest
import torch

import grpo
import model as M
import rl
from conftest import ThreadRanks, read_metrics
from parallel import Dist
from tiny import make_tiny_checkpoint


@pytest.mark.parametrize("kind", ["ppo", "gspo", "gspo-token"])
def test_gspo_ratios_and_gradients_by_hand(kind):
    """Two completions of 2 and 3 tokens, averaged per sequence (seq-mean-token-mean weights 1/2
    and 1/3). Sequence 1: mean log-ratio 0.2, s = e^0.2 = 1.2214 > 1 + 4e-4 with A = +1:
    clipped, no gradient. Sequence 2: mean 1e-4, s = 1.0001 inside the range with A = -1: loss
    +s on each token, and d/d(log pi_t) = s / 3 (gspo through the mean of 3 copies; gspo-token
    through the token's own, weighted 1/3: the same, as GSPO-token is built to be)."""
    lengths, adv = [2, 3], torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0])
    weights = torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3])
    old = torch.zeros(5)
    lp = torch.tensor([0.1, 0.3, 1e-4, -1e-4, 3e-4], requires_grad=True)
    clip = (0.2, 0.2) if kind == "ppo" else (3e-4, 4e-4)
    loss, clipped = grpo.clipped_surrogate(grpo.policy_log_ratio(lp, old, lengths, kind), adv,
                                           *clip)
    (loss * weights).sum().backward()
    if kind == "ppo":  # per token: e^0.1 inside the range, e^0.3 clipped at 1.2
        assert loss[:2].tolist() == pytest.approx([-math.exp(0.1), -1.2], abs=1e-6)
        expected = [-math.exp(0.1) / 2, 0] + [math.exp(x) / 3 for x in (1e-4, -1e-4, 3e-4)]
        assert lp.grad.tolist() == pytest.approx(expected, abs=1e-6)
        return
    s2 = math.exp(1e-4)
    assert loss.tolist() == pytest.approx([-1.0004, -1.0004, s2, s2, s2], abs=1e-6)
    assert clipped.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert lp.grad.tolist() == pytest.approx([0, 0, s2 / 3, s2 / 3, s2 / 3], abs=1e-6)


def test_gspo_and_gspo_token_differ_with_per_token_advantages():
    """With advantages that vary inside a sequence, gspo's gradient mixes them through the mean
    (every token gets mean(A) * s / n), gspo-token keeps each token's A * s."""
    lp = torch.tensor([0.0, 0.0], requires_grad=True)
    grads = {}
    for kind in ("gspo", "gspo-token"):
        lp.grad = None
        loss, _ = grpo.clipped_surrogate(grpo.policy_log_ratio(lp, torch.zeros(2), [2], kind),
                                         torch.tensor([1.0, 3.0]), 3e-4, 4e-4)
        loss.sum().backward()
        grads[kind] = lp.grad.tolist()
    assert grads["gspo"] == pytest.approx([-2.0, -2.0])  # -(1 + 3) * 1 / 2 each
    assert grads["gspo-token"] == pytest.approx([-1.0, -3.0])


def rollout_with(sampler, old, reward=0.0, finish="stop", group=0):
    n = len(sampler)
    return rl.Completion(None, group, [1, 2], [3] * n, torch.tensor(sampler), finish, reward=reward,
                         old_logprobs=torch.tensor(old), advantages=torch.full((n,), 1.0))


def test_mismatch_metrics_and_truncated_weights_by_hand():
    # pi_old / pi_sampler = 3, 0.5, 1 -> capped at 2: weights 2, 0.5, 1
    r = rollout_with([0.0, 0.0, -1.0], [math.log(3), math.log(0.5), -1.0])
    m = rl.mismatch_metrics([r], 2.0, Dist())
    assert m["mismatch_mean_abs"] == pytest.approx((math.log(3) + math.log(2)) / 3)
    assert m["mismatch_max_abs"] == pytest.approx(math.log(3))
    assert m["tis_capped_frac"] == pytest.approx(1 / 3)
    assert m["tis_ess"] == pytest.approx(3.5 ** 2 / (3 * (4 + 0.25 + 1)))


def test_tis_weights_the_policy_loss(tmp_path):
    """On-policy the surrogate is -A per token; with --tis-cap 2 each token's term is multiplied
    by min(pi_old / pi_sampler, 2), pi_old being the trainer's own log-prob."""
    policy = M.load_model(make_tiny_checkpoint(str(tmp_path / "m"), seed=2))
    args = grpo.get_args(["--model", "tiny", "--tis-cap", "2"])
    r = rl.Completion(None, 0, [5, 6, 7], [8, 9, 10], torch.zeros(3), "stop",
                      advantages=torch.full((3,), 0.5))
    mb = rl.micro_batches([r], 100, "cpu")[0]
    with torch.no_grad():
        lp, _ = rl.logprobs(policy, mb)
    offsets = torch.tensor([math.log(3), math.log(0.5), 0.0])  # pi_old / pi_sampler
    mb.sampler_logprobs = lp - offsets
    weights = torch.tensor([1.0, 2.0, 3.0])
    loss, _ = grpo.policy_loss(policy, mb, weights, args, kl_coef=0.0)
    assert loss.item() == pytest.approx(-0.5 * (2 * 1.0 + 0.5 * 2.0 + 1 * 3.0), abs=1e-5)


def test_overlong_penalty_by_hand():
    assert [rl.overlong_penalty(n, 100, 20, 1.0) for n in (50, 80, 90, 100)] == \
        pytest.approx([0.0, 0.0, -0.5, -1.0])
    assert rl.overlong_penalty(95, 100, 20, 0.5) == pytest.approx(-0.375)
    assert rl.overlong_penalty(100, 100, 0, 1.0) == 0.0  # off


def test_mask_truncated_keeps_them_out_of_the_loss():
    kept, cut = rollout_with([0.0], [0.0]), rollout_with([0.0], [0.0], finish="length")
    args = grpo.get_args(["--model", "tiny", "--mask-truncated"])
    assert rl.in_loss([kept, cut], args) == [kept]
    assert rl.in_loss([kept, cut], grpo.get_args(["--model", "tiny"])) == [kept, cut]


def test_batch_std_advantages_over_two_ranks():
    """Rank 0's group rewards [1, 0], rank 1's [1, 1]: every reward [1, 0, 1, 1] has mean 0.75
    and unbiased std sqrt(0.75 / 3) = 0.5, so rank 0's advantages are +-0.5 / 0.5 = +-1
    (with the group's own std they would be +-0.707)."""
    ranks = [[rollout_with([0.0], [0.0], 1.0), rollout_with([0.0], [0.0], 0.0)],
             [rollout_with([0.0], [0.0], 1.0, group=1), rollout_with([0.0], [0.0], 1.0, group=1)]]
    ThreadRanks(2).run(lambda d: grpo.set_group_advantages(ranks[d.rank], "batch-std", d))
    assert [r.advantages.item() for r in ranks[0]] == pytest.approx([1.0, -1.0], abs=1e-5)
    assert [r.advantages.item() for r in ranks[1]] == [0.0, 0.0]
    grpo.set_group_advantages(ranks[0], "std", Dist())
    assert ranks[0][0].advantages.item() == pytest.approx(0.5 / math.sqrt(0.5), abs=1e-5)


SHORT = ["--model", "tiny", "--steps", "40", "--batch-prompts", "8", "--num-samples", "8",
         "--lr", "4e-3", "--save-every", "0"]


@pytest.mark.parametrize("flags", [
    # gspo and gspo-token coincide on the demo (one advantage per completion): one run for both;
    # their tiny clip range learns from the second mini-batch little, so 50 steps
    ["--policy-loss", "gspo-token", "--loss-agg", "seq-mean-token-mean", "--mini-batches", "2",
     "--steps", "50"],
    ["--tis-cap", "2"],
    ["--dynamic-sampling"],
    ["--overlong-buffer", "4", "--mask-truncated"],
    ["--adv-norm", "batch-std"],
], ids=["gspo", "tis", "dynamic-sampling", "overlong", "batch-std"])
def test_the_demo_still_learns_with_each_ablation(tmp_path, flags):
    out = str(tmp_path / "run")
    grpo.main(SHORT + flags + ["--out", out])
    rows = read_metrics(out)
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert last >= first + 0.1, [round(r["reward_mean"], 2) for r in rows]
    if "--dynamic-sampling" in flags:
        assert max(r["sampling_rounds"] for r in rows) > 1
    if "--tis-cap" in flags:
        assert all(0 < r["tis_ess"] <= 1 and r["mismatch_max_abs"] < 1e-3 for r in rows)


# ----------------------------------------------------------------------------- ablation points

def test_a_new_advantage_free_term_gets_its_forward(monkeypatch):
    """The update skips a zero-advantage completion only while every term of the loss that does not
    scale with the advantage is off: a researcher's new term (in grpo.advantage_free_terms, which
    policy_loss adds) turns the skip off without touching needs_forward."""
    args = grpo.get_args(["--model", "tiny", "--kl-coef", "0", "--entropy-coef", "0"])
    dead = rl.Completion(None, 0, [1], [2, 3], torch.zeros(2), "stop", advantages=torch.zeros(2))
    live = rl.Completion(None, 1, [1], [2, 3], torch.zeros(2), "stop", advantages=torch.ones(2))
    assert not grpo.needs_forward(args)(dead) and grpo.needs_forward(args)(live)
    for flags in (["--kl-coef", "0.01"], ["--entropy-coef", "0.01"]):
        assert grpo.needs_forward(grpo.get_args(["--model", "tiny"] + flags))(dead)
    real = grpo.advantage_free_terms
    monkeypatch.setattr(grpo, "advantage_free_terms", lambda a, kl: dict(real(a, kl), sft=0.1))
    assert grpo.needs_forward(args)(dead)


def test_policy_loss_returns_each_term_it_adds(tmp_path, monkeypatch):
    """Every advantage-free term is a statistic of the loss (logged by rl.policy_metrics), and
    one named in advantage_free_terms but not computed by policy_loss is an error, not a silent
    zero."""
    policy = M.load_model(make_tiny_checkpoint(str(tmp_path / "m"), seed=2))
    args = grpo.get_args(["--model", "tiny", "--entropy-coef", "0.01"])
    r = rl.Completion(None, 0, [5, 6, 7], [8, 9, 10], torch.zeros(3), "stop",
                      advantages=torch.full((3,), 0.5))
    mb = rl.pack([r], "cpu")
    _, stats = grpo.policy_loss(policy, mb, torch.ones(3), args, kl_coef=0.0)
    assert "entropy" in stats and "kl" not in stats  # KL off: not computed, not logged
    mb.ref_logprobs = torch.zeros(3)
    _, stats = grpo.policy_loss(policy, mb, torch.ones(3), args, kl_coef=0.1)
    assert set(grpo.advantage_free_terms(args, 0.1)) <= set(stats)
    real = grpo.advantage_free_terms
    monkeypatch.setattr(grpo, "advantage_free_terms", lambda a, kl: dict(real(a, kl), sft=0.1))
    with pytest.raises(KeyError, match="sft"):
        grpo.policy_loss(policy, mb, torch.ones(3), args, kl_coef=0.0)


def test_the_trainer_reads_the_temperature_from_the_rollouts(tmp_path):
    """Log-probs divide the logits by the temperature each rollout was sampled at (rl.collect
    records it), whatever --temperature says: a schedule changes the sampling settings only."""
    ckpt = make_tiny_checkpoint(str(tmp_path / "m"), seed=2)
    policy = M.load_model(ckpt)
    args = grpo.get_args(["--model", "tiny", "--temperature", "1.0", "--micro-tokens", "100"])
    completions = [rl.Completion(None, 0, [5, 6, 7], [8, 9, 10], torch.zeros(3), "stop",
                                 temperature=0.5)]
    scored = rl.score(policy, completions, args, Dist())[0]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    ref = torch.log_softmax(policy(ids)[0, 2:5] / 0.5, -1).gather(-1, ids[0, 3:, None])[:, 0]
    assert (scored - ref).abs().max() < 1e-5
    other = rl.Completion(None, 1, [1], [2], torch.zeros(1), "stop", temperature=1.0)
    mixed = completions + [other]
    with pytest.raises(ValueError, match="temperatures"):
        rl.pack(mixed, "cpu")
