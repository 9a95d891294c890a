"""ppo.py: GAE, KL-in-reward, value loss by hand; the CPU demo learns; resume and torchrun."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import ppo
from conftest import ROOT, read_metrics as metrics, without_timing


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


def test_kl_placement_through_the_trainer_path():
    """set_advantages: beta * KL lands on response tokens only (one value per response token)."""
    item = ppo.Rollout(None, [5, 6, 7, 8], [9, 10], [-1.0, -2.0], "stop", reward=1.0,
                       ref_logprobs=torch.tensor([-1.0, -1.0]), values=torch.zeros(2))
    args = ppo.get_args(["--model", "tiny", "--gamma", "1", "--lam", "1"])
    out = ppo.set_advantages([item], beta=0.5, args=args, d=ppo.Dist())
    # rewards = [-0.5 * 0, 1 - 0.5 * (-1)] = [0, 1.5]; returns-to-go = [1.5, 1.5]
    assert torch.allclose(item.returns, torch.tensor([1.5, 1.5]))
    assert item.advantage.shape == (2,) and out["kl_reward"] == pytest.approx(-0.5)


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


def test_adaptive_kl_controller():
    fixed = ppo.KLController(0.1, None, 1000)
    fixed.update(5.0, 100)
    assert fixed.beta == 0.1
    adaptive = ppo.KLController(0.1, 0.1, 1000)
    adaptive.update(0.2, 100)  # KL twice the target: error clipped to 0.2
    assert adaptive.beta == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    adaptive.update(0.05, 100)  # below target: shrinks
    assert adaptive.beta < 0.1 * 1.02


# ----------------------------------------------------------------------------- end to end

FAST = ["--model", "tiny", "--max-new-tokens", "4", "--batch-prompts", "8"]


def test_ppo_demo_learns(tmp_path):
    out = str(tmp_path / "demo")
    ppo.main(["--model", "tiny", "--out", out, "--save-every", "1000"])
    rows = metrics(out)
    first = sum(r["accuracy"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    assert first < 0.3, f"the untrained model should be near chance, got {first}"
    assert last >= 0.9, f"reward only reached {last}: {[round(r['reward_mean'], 2) for r in rows]}"


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
    assert "value_head.weight" in load_file(os.path.join(straight, "step-000004", "critic", "model.safetensors"))
    assert without_timing(metrics(straight))[2:] == without_timing(metrics(broken))


def test_ppo_torchrun_two_ranks_matches_one(tmp_path):
    args = FAST + ["--steps", "2", "--kl-coef", "0.05", "--micro-tokens", "150"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ppo.main(args + ["--out", one])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           "29519", str(ROOT / "ppo.py")] + args + ["--out", two]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r1, r2 in zip(metrics(one), metrics(two)):
        assert r1["reward_mean"] == r2["reward_mean"]
        for key in ("loss", "value_loss", "kl_reward", "explained_variance"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), key
    for sub in ("", "critic"):
        a = load_file(os.path.join(one, "step-000002", sub, "model.safetensors"))
        b = load_file(os.path.join(two, "step-000002", sub, "model.safetensors"))
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
