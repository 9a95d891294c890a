"""grpo.py's math against hand-computed references."""
import math

import pytest
import torch

import grpo
import model as M
from tiny import make_tiny_checkpoint


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv = grpo.group_advantages(r, "std")
    # group 0: mean 0.5, unbiased std sqrt(1/3): +-0.5 / 0.57735 = +-0.8660
    assert torch.allclose(adv[0], torch.tensor([0.8660, -0.8660, -0.8660, 0.8660]), atol=1e-4)
    assert torch.equal(adv[1], torch.zeros(4))  # constant group: no signal
    assert torch.allclose(adv.sum(dim=1), torch.zeros(3), atol=1e-6)
    # group 2: mean 0.25, std 0.5: (1 - 0.25) / 0.5 = 1.5, (0 - 0.25) / 0.5 = -0.5
    assert torch.allclose(adv[2], torch.tensor([-0.5, -0.5, -0.5, 1.5]), atol=1e-4)
    plain = grpo.group_advantages(r, "none")
    assert torch.allclose(plain[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]))


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # log ratio = log 2
    assert torch.allclose(grpo.kl_estimate(logp, ref, "k1"), torch.tensor([math.log(2)]))
    assert torch.allclose(grpo.kl_estimate(logp, ref, "k2"), torch.tensor([0.5 * math.log(2) ** 2]))
    assert torch.allclose(grpo.kl_estimate(logp, ref, "k3"), torch.tensor([0.5 + math.log(2) - 1]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g)
    y = x + 1e-4 * torch.randn(100_000, generator=g)  # near-equal: where rounding bites
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(grpo.kl_estimate(x, x, kind), torch.zeros_like(x))
    assert (grpo.kl_estimate(x, y, "k3") >= 0).all()


@pytest.mark.parametrize("ratio,adv,dual,loss,clipped", [
    (1.5, 1.0, 0.0, -1.2, 1.0),   # above 1 + eps with A > 0: clipped at 1.2
    (0.5, 1.0, 0.0, -0.5, 0.0),   # below 1 - eps with A > 0: the unclipped (worse) value
    (0.5, -1.0, 0.0, 0.8, 1.0),   # below 1 - eps with A < 0: clipped at 0.8
    (1.5, -1.0, 0.0, 1.5, 0.0),   # above 1 + eps with A < 0: unclipped
    (1.1, 2.0, 0.0, -2.2, 0.0),   # inside the range
    (5.0, -1.0, 3.0, 3.0, 0.0),   # dual clip bounds a negative advantage's loss at c * |A|
    (5.0, 1.0, 3.0, -1.2, 1.0),   # dual clip leaves positive advantages alone
])
def test_clipped_surrogate(ratio, adv, dual, loss, clipped):
    logp = torch.tensor([math.log(ratio)])
    out, clip = grpo.clipped_surrogate(logp, torch.zeros(1), torch.tensor([adv]), 0.2, 0.2, dual)
    assert out.item() == pytest.approx(loss, abs=1e-6) and clip.item() == clipped


def test_clip_higher_is_asymmetric():
    out, _ = grpo.clipped_surrogate(torch.tensor([math.log(1.25)]), torch.zeros(1),
                                    torch.tensor([1.0]), 0.2, 0.28)
    assert out.item() == pytest.approx(-1.25)  # 1.25 < 1.28: not clipped


def test_token_weights_each_mode():
    lengths = [2, 4]  # this rank's sequences; globally 3 sequences, 10 tokens
    w = grpo.token_weights(lengths, "token-mean", 10, 3, 8)
    assert torch.allclose(w, torch.full((6,), 0.1))
    w = grpo.token_weights(lengths, "seq-mean-token-mean", 10, 3, 8)
    assert torch.allclose(w, torch.tensor([1 / 6] * 2 + [1 / 12] * 4))  # 1 / (len * 3)
    w = grpo.token_weights(lengths, "seq-mean-token-sum", 10, 3, 8)
    assert torch.allclose(w, torch.full((6,), 1 / 24))  # 1 / (max_new_tokens * 3)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return M.load_model(make_tiny_checkpoint(str(tmp_path_factory.mktemp("m") / "t"), seed=4))


def make_items(seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(5):
        prompt = torch.randint(0, 384, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        resp = torch.randint(0, 384, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
        items.append(grpo.Rollout(None, prompt.tolist(), resp.tolist(), [0.0] * len(resp), "stop",
                                  advantage=float(i) - 2.0))
    return items


def args_for(**kw):
    a = grpo.get_args(["--model", "tiny", "--temperature", "0.8"])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def grads_of(policy, items, args, micro_tokens):
    policy.zero_grad()
    mbs = grpo.micro_batches(items, micro_tokens, "cpu")
    tot = sum(len(it.response_ids) for it in items)
    for mb in mbs:
        loss, _ = grpo.policy_loss(policy, mb, tot, len(items), True, False, args=args,
                                   kl_coef=args.kl_coef)
        loss.backward()
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_one_update_is_the_plain_policy_gradient(policy, agg):
    """Ratio 1 on-policy: the clipped loss's gradient is that of -sum(w * A * log pi), however
    the batch is cut into micro-batches."""
    items, args = make_items(), args_for(loss_agg=agg)
    g_small = grads_of(policy, items, args, micro_tokens=10)  # several micro-batches
    g_big = grads_of(policy, items, args, micro_tokens=10_000)
    policy.zero_grad()
    mb = grpo.micro_batches(items, 10_000, "cpu")[0]
    lp, _ = grpo.logprobs(policy, mb, args.temperature)
    w = grpo.token_weights(mb.lengths, agg, sum(mb.lengths), len(items), args.max_new_tokens)
    adv = torch.cat([torch.full((n,), it.advantage) for it, n in zip(items, mb.lengths)])
    (-(w * adv * lp)).sum().backward()
    g_ref = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
    assert g_ref.abs().sum() > 0
    assert torch.allclose(g_small, g_ref, atol=1e-6) and torch.allclose(g_big, g_ref, atol=1e-6)
    assert len(grpo.micro_batches(items, 10, "cpu")) > 1


def test_micro_batches_respect_the_token_budget():
    items = make_items(1)
    for budget in (1, 12, 20, 10_000):
        mbs = grpo.micro_batches(items, budget, "cpu")
        assert [it for mb in mbs for it in mb.items] == items
        for mb in mbs:
            assert len(mb.items) == 1 or len(mb.ids) <= budget
            assert mb.targets.tolist() == [t for it in mb.items for t in it.response_ids]
            # the selected rows are those just before each response token
            assert mb.ids[mb.select + 1].tolist() == mb.targets.tolist()


@pytest.mark.parametrize("flags,needle", [
    (["--reward-values", "1,0"], "--reward-values"),
    (["--group-size", "1"], "--group-size 1"),
    (["--temperature", "0"], "--temperature 0"),
    (["--dual-clip", "0.5"], "--dual-clip 0.5"),
    (["--loss-agg", "sum"], "--loss-agg"),
    (["--mini-batches", "0"], "--mini-batches 0"),
])
def test_bad_flags_name_the_flag(flags, needle, capsys):
    with pytest.raises(SystemExit):
        grpo.get_args(["--model", "tiny"] + flags)
    assert needle in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        grpo.get_args(["--help"])
    out = capsys.readouterr().out
    parser_flags = [a for a in out.split() if a.startswith("--")]
    assert "--kl-estimator" in parser_flags and "--loss-agg" in parser_flags
    for action in grpo.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"
