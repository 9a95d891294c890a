"""ppo.py: GAE, KL-in-reward, value loss by hand; the CPU demo learns; resume and torchrun."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import ppo
import rl
from parallel import Dist
from conftest import ROOT, read_metrics as metrics, without_timing
from ranks import torchrun


def test_gae_hand_computed():
    adv, ret = ppo.gae([0.0, 0.0, 1.0], [0.5, 0.2, 0.8], gamma=0.9, lam=0.8)
    # delta2 = 1 - 0.8 = 0.2; delta1 = 0.9*0.8 - 0.2 = 0.52; delta0 = 0.9*0.2 - 0.5 = -0.32
    # A2 = 0.2; A1 = 0.52 + 0.72*0.2 = 0.664; A0 = -0.32 + 0.72*0.664 = 0.15808
    assert adv == pytest.approx([0.15808, 0.664, 0.2])
    assert ret == pytest.approx([0.65808, 0.864, 1.0])


def test_gae_with_gamma_and_lambda_one_is_returns_to_go_minus_values():
    rewards, values = [0.1, -0.2, 1.0], [0.3, 0.4, 0.5]
    adv, ret = ppo.gae(rewards, values, gamma=1.0, lam=1.0)
    assert adv == pytest.approx([0.9 - 0.3, 0.8 - 0.4, 1.0 - 0.5])
    assert ret == pytest.approx([0.9, 0.8, 1.0])


def test_kl_penalty_on_every_response_token_and_reward_on_the_last():
    logp = torch.tensor([-1.0, -2.0, -3.0])
    ref = torch.tensor([-1.5, -2.0, -2.5])
    kl = ppo.grpo.kl_estimate(logp, ref, "k1")  # k1 = logp - ref = [0.5, 0, -0.5]
    r = ppo.token_rewards(1.0, kl, beta=0.1)
    assert torch.allclose(r, torch.tensor([-0.05, 0.0, 0.05 + 1.0]))
    assert torch.equal(ppo.token_rewards(-1.0, torch.zeros(3), 0.1), torch.tensor([0.0, 0.0, -1.0]))


def ppo_item(reward, values, old, ref):
    return rl.Completion(None, 0, [5, 6, 7], [9] * len(values), torch.zeros(len(values)), "stop",
                       reward=reward, values=torch.tensor(values), old_logprobs=torch.tensor(old),
                       ref_logprobs=torch.tensor(ref))


def test_advantages_by_hand_over_two_ranks():
    """set_advantages on two ranks: KL in the per-token reward, GAE, whitening with the global
    mean and variance (a per-rank whitening would zero rank 1's single token)."""
    from conftest import ThreadRanks
    args = ppo.get_args(["--model", "tiny", "--gamma", "1", "--lam", "1"])
    # rank 0: k1 KL [0.5, 0] -> rewards [-0.25, 1.0] -> returns [0.75, 1.0], advantages [0.75, 0.5]
    # rank 1: KL [0] -> reward [-1] -> return [-1], advantage -1 - 0.75 = -1.75
    ranks = [[ppo_item(1.0, [0.0, 0.5], [-1.0, -2.0], [-1.5, -2.0])],
             [ppo_item(-1.0, [0.75], [-0.5], [-0.5])]]
    stats = ThreadRanks(2).run(lambda d: ppo.set_advantages(ranks[d.rank], 0.5, args, d))
    assert torch.allclose(ranks[0][0].returns, torch.tensor([0.75, 1.0]))
    assert torch.allclose(ranks[1][0].returns, torch.tensor([-1.0]))
    # all advantages [0.75, 0.5, -1.75]: mean -1/6, biased variance 3.875/3 - 1/36 = 1.2638889
    std = 1.2638889 ** 0.5
    assert torch.allclose(ranks[0][0].advantages, torch.tensor([0.9166667, 0.6666667]) / std, atol=1e-6)
    assert torch.allclose(ranks[1][0].advantages, torch.tensor([-1.5833333]) / std, atol=1e-6)
    for s in stats:  # the same global numbers on both ranks
        assert s["kl"] == pytest.approx(0.5 / 3)
        # squared errors of returns vs values 3.875 / 3; returns' variance 2.5625 / 3 - 1 / 16
        assert s["explained_variance"] == pytest.approx(1 - (3.875 / 3) / (2.5625 / 3 - 0.0625))


def test_whitening_variance_floor():
    """The whitening divides by sqrt(max(var, 1e-8)) (OpenRLHF's floor, on the variance)."""
    args = ppo.get_args(["--model", "tiny", "--gamma", "1", "--lam", "1"])
    tiny_spread = [ppo_item(0.0, [-1e-5], [0.0], [0.0]), ppo_item(0.0, [1e-5], [0.0], [0.0])]
    ppo.set_advantages(tiny_spread, 0.0, args, Dist())  # var 1e-10: floored to 1e-8
    assert [it.advantages.item() for it in tiny_spread] == pytest.approx([0.1, -0.1], rel=1e-4)
    spread = [ppo_item(0.0, [-0.5], [0.0], [0.0]), ppo_item(0.0, [0.5], [0.0], [0.0])]
    ppo.set_advantages(spread, 0.0, args, Dist())  # var 0.25: exactly standardised
    assert [it.advantages.item() for it in spread] == pytest.approx([1.0, -1.0], rel=1e-6)


@pytest.mark.parametrize("v,old,ret,expected", [
    (1.0, 0.5, 0.0, 0.5),     # clipped 0.7 is closer to R: the unclipped 0.5 * 1.0^2 counts
    (0.6, 0.5, 1.0, 0.08),    # inside the clip range: plain 0.5 * 0.4^2
    (1.0, 0.5, 1.0, 0.045),   # moved past the range onto R: the clipped 0.5 * 0.3^2 counts
])
def test_clipped_value_loss(v, old, ret, expected):
    out = ppo.clipped_value_loss(torch.tensor([v]), torch.tensor([old]), torch.tensor([ret]), 0.2)
    assert out.item() == pytest.approx(expected)
    plain = ppo.clipped_value_loss(torch.tensor([v]), torch.tensor([old]), torch.tensor([ret]), 0.0)
    assert plain.item() == pytest.approx(0.5 * (v - ret) ** 2)


def test_adaptive_kl_controller_values_over_several_updates():
    fixed = ppo.KLController(0.1, None, 1000)
    fixed.update(5.0, 100)
    assert fixed.beta == 0.1
    ctl = ppo.KLController(0.1, 0.1, 1000)
    betas = []
    for kl, n in ((0.2, 100), (0.11, 100), (0.0, 500), (0.05, 200)):
        ctl.update(kl, n)
        betas.append(ctl.beta)
    # error clip(kl / 0.1 - 1, -0.2, 0.2) = 0.2, 0.1, -0.2, -0.2; beta *= 1 + error * n / 1000
    assert betas == pytest.approx([0.102, 0.102 * 1.01, 0.102 * 1.01 * 0.9,
                                   0.102 * 1.01 * 0.9 * 0.96], rel=1e-12)


# ----------------------------------------------------------------------------- end to end

FAST = ["--model", "tiny", "--max-new-tokens", "4", "--batch-prompts", "8"]


def test_ppo_demo_learns_with_kl_on(tmp_path):
    out = str(tmp_path / "demo")
    ppo.main(["--model", "tiny", "--out", out, "--save-every", "1000"])
    rows = metrics(out)
    first = sum(r["accuracy"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert first < 0.3, f"the untrained model should be near chance, got {first}"
    assert last >= 0.9, f"reward only reached {last}: {[round(r['reward_mean'], 2) for r in rows]}"
    assert rows[-1]["kl_coef"] == 0.01 and rows[-1]["kl"] > 0  # with KL to the reference, as Med-RLVR


def test_kl_reward_is_exactly_zero_at_step_zero(tmp_path, monkeypatch):
    """Policy == reference at the first step: the KL in the reward is exactly 0 even when the
    sampler's log-probs differ from the training forward's (as bf16 decode kernels make them)."""
    import rollout
    real_generate = rollout.generate

    def perturbed(*a, **kw):
        samples = real_generate(*a, **kw)
        for s in samples:
            s.logprobs = [lp + 0.3 for lp in s.logprobs]
        return samples
    monkeypatch.setattr(rollout, "generate", perturbed)
    out = str(tmp_path / "run")
    ppo.main(FAST + ["--steps", "1", "--kl-coef", "0.5", "--out", out])
    row = metrics(out)[0]
    assert row["logprob_gap"] == pytest.approx(0.3, abs=1e-4)  # the sampler's log-probs are off
    assert row["kl"] == 0.0 and row["kl_coef"] == 0.5


def test_ppo_resume_equals_uninterrupted_critic_included(tmp_path):
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    common = FAST + ["--steps", "4", "--save-every", "2", "--keep-last", "5", "--kl-coef", "0.05",
                     "--kl-target", "0.01", "--mini-batches", "2"]
    ppo.main(common + ["--out", straight])
    os.makedirs(broken)
    shutil.copytree(os.path.join(straight, "step-000002"), os.path.join(broken, "step-000002"))
    ppo.main(common + ["--out", broken, "--resume", "auto"])
    for sub in ("", "critic"):
        a = load_file(os.path.join(straight, "step-000004", sub, "model.safetensors"))
        b = load_file(os.path.join(broken, "step-000004", sub, "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "score.weight" in load_file(os.path.join(straight, "step-000004", "critic", "model.safetensors"))
    assert without_timing(metrics(straight))[2:] == without_timing(metrics(broken))


def test_ppo_torchrun_two_ranks_matches_one(tmp_path):
    args = FAST + ["--steps", "2", "--kl-coef", "0.05", "--micro-tokens", "150"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ppo.main(args + ["--out", one])
    torchrun(ROOT / "ppo.py", args + ["--out", two], tmp_path)
    for r1, r2 in zip(metrics(one), metrics(two)):
        assert r1["reward_mean"] == r2["reward_mean"]
        for key in ("loss", "value_loss", "kl", "explained_variance"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), key
    for sub in ("", "critic"):
        a = load_file(os.path.join(one, "step-000002", sub, "model.safetensors"))
        b = load_file(os.path.join(two, "step-000002", sub, "model.safetensors"))
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
