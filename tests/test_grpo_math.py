"""grpo.py's math against hand-computed references."""
import functools
import math

import pytest
import torch

import flags
import grpo
import model as M
import rl
from parallel import Dist
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


def test_kl_estimator_gradients():
    """d/d(log pi) of each estimator, r = log pi - log pi_ref: k1 -> 1 (zero in expectation: no
    regularisation), k2 -> r (the true KL gradient), k3 -> 1 - exp(-r)."""
    r = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0])
    for kind, expected in (("k1", torch.ones(5)), ("k2", r), ("k3", 1 - torch.exp(-r))):
        logp = (r + 0.5).requires_grad_()
        grpo.kl_estimate(logp, torch.full((5,), 0.5), kind).sum().backward()
        assert torch.allclose(logp.grad, expected, atol=1e-6), kind


@pytest.mark.parametrize("log_ratio", [-100.0, -90.0, -21.0, 21.0, 90.0, 100.0])
def test_extreme_log_ratios_give_finite_losses_and_gradients(log_ratio):
    for kind in ("k1", "k2", "k3"):
        logp = torch.tensor([log_ratio], requires_grad=True)
        value = grpo.kl_estimate(logp, torch.zeros(1), kind)
        value.sum().backward()
        assert torch.isfinite(value).all() and torch.isfinite(logp.grad).all(), kind
    for adv in (1.0, -1.0):
        for dual in (0.0, 3.0):
            logp = torch.tensor([log_ratio], requires_grad=True)
            loss, _ = grpo.clipped_surrogate(logp, torch.tensor([adv]), 0.2, 0.2, dual)
            loss.sum().backward()
            assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all(), (adv, dual)
            # beyond the clamp the ratio is exp(20): a huge but finite loss, and no gradient
            assert loss.abs().item() <= math.exp(20) + 1 and logp.grad.item() == 0.0


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
    out, clip = grpo.clipped_surrogate(logp, torch.tensor([adv]), 0.2, 0.2, dual)
    assert out.item() == pytest.approx(loss, abs=1e-6) and clip.item() == clipped


def test_clip_higher_is_asymmetric():
    out, _ = grpo.clipped_surrogate(torch.tensor([math.log(1.25)]), torch.tensor([1.0]), 0.2,
                                    0.28)
    assert out.item() == pytest.approx(-1.25)  # 1.25 < 1.28: not clipped


def test_token_weights_each_mode():
    lengths = [2, 4]  # this rank's sequences; globally 3 sequences, 10 tokens
    w = rl.token_weights(lengths, "token-mean", 10, 3, 8)
    assert torch.allclose(w, torch.full((6,), 0.1))
    w = rl.token_weights(lengths, "seq-mean-token-mean", 10, 3, 8)
    assert torch.allclose(w, torch.tensor([1 / 6] * 2 + [1 / 12] * 4))  # 1 / (len * 3)
    w = rl.token_weights(lengths, "seq-mean-token-sum", 10, 3, 8)
    assert torch.allclose(w, torch.full((6,), 1 / 24))  # 1 / (max_new_tokens * 3)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return M.load_model(make_tiny_checkpoint(str(tmp_path_factory.mktemp("m") / "t"), seed=4))


def make_items(seed=0, group_sizes=(1, 3, 1, 2)):
    """Rollouts of random prompts and responses, `group_sizes[i]` adjacent ones per prompt (a
    group's responses share one packed copy of its prompt)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for group, size in enumerate(group_sizes):
        prompt = torch.randint(0, 384, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        for _ in range(size):
            resp = torch.randint(0, 384, (int(torch.randint(1, 7, (1,), generator=g)),),
                                 generator=g)
            a = float(len(items)) - 3.0
            items.append(rl.Completion(None, group, prompt.tolist(), resp.tolist(),
                                       torch.zeros(len(resp)), "stop", temperature=0.8,
                                       advantages=torch.full((len(resp),), a)))
    return items


def args_for(**kw):
    a = grpo.get_args(["--model", "tiny", "--temperature", "0.8"])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def naive_logprobs(policy, it, temperature):
    """Per-response-token log-probs and entropies from one unpacked sequence and a full
    log-softmax: nothing shared with the packed, chunked path under test."""
    logits = policy(torch.tensor([it.prompt_ids + it.response_ids]))[0] / temperature  # (L, V)
    p = len(it.prompt_ids)
    rows = logits[p - 1:p - 1 + len(it.response_ids)].log_softmax(-1)  # (R, V)
    lp = rows.gather(-1, torch.tensor(it.response_ids)[:, None]).squeeze(-1)
    return lp, -(rows.exp() * rows).sum(-1)


def reference_loss(policy, items, args, kl_coef):
    """GRPO's loss written out by hand, sequence by sequence."""
    total_tokens, n, loss = sum(len(it.response_ids) for it in items), len(items), 0.0
    for it in items:
        lp, ent = naive_logprobs(policy, it, args.temperature)
        old = lp.detach() if it.old_logprobs is None else it.old_logprobs
        ratio = torch.exp(lp - old)
        a = it.advantages
        clipped = ratio.clamp(1 - args.clip_low, 1 + args.clip_high)
        surrogate = torch.maximum(-a * ratio, -a * clipped)
        tok = surrogate - args.entropy_coef * ent
        if kl_coef:
            d = it.ref_logprobs - lp
            tok = tok + kl_coef * (torch.exp(d) - d - 1)  # k3
        if args.loss_agg == "token-mean":
            loss = loss + tok.sum() / total_tokens
        elif args.loss_agg == "seq-mean-token-mean":
            loss = loss + tok.mean() / n
        else:
            loss = loss + tok.sum() / (args.max_new_tokens * n)
    return loss


def grads(policy, loss_fn):
    policy.zero_grad()
    loss_fn()
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])


def packed_loss(policy, items, args, micro_tokens, kl_coef):
    tot = sum(len(it.response_ids) for it in items)
    for mb in rl.micro_batches(items, micro_tokens, "cpu"):
        weights = rl.token_weights(mb.lengths, args.loss_agg, tot, len(items), args.max_new_tokens)
        loss, _ = grpo.policy_loss(policy, mb, weights, args, kl_coef)
        loss.backward()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("off_policy", [False, True])
def test_policy_loss_gradient_equals_the_hand_written_loss(policy, agg, off_policy):
    """policy_loss over packed micro-batches (however cut) has the gradient of GRPO's loss written
    by hand: on-policy (ratio 1) and off-policy (old log-probs from an earlier policy, so some
    ratios fall outside the clip range), with k3 KL in the loss and an entropy bonus."""
    items, args = make_items(), args_for(loss_agg=agg, entropy_coef=0.01, clip_high=0.28)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for it in items:
            lp, _ = naive_logprobs(policy, it, args.temperature)
            it.ref_logprobs = lp + 0.2 * torch.randn(len(lp), generator=g)
            if off_policy:
                it.old_logprobs = lp + 0.4 * torch.randn(len(lp), generator=g)
    if off_policy:
        ratios = torch.cat([torch.exp(naive_logprobs(policy, it, 0.8)[0] - it.old_logprobs)
                            for it in items])
        assert ((ratios < 0.8) | (ratios > 1.28)).any() and ((ratios > 0.8) & (ratios < 1.28)).any()
    g_ref = grads(policy, lambda: reference_loss(policy, items, args, 0.05).backward())
    g_small = grads(policy, lambda: packed_loss(policy, items, args, 10, 0.05))  # several batches
    g_big = grads(policy, lambda: packed_loss(policy, items, args, 10_000, 0.05))
    assert g_ref.abs().sum() > 0 and len(rl.micro_batches(items, 10, "cpu")) > 1
    assert torch.allclose(g_small, g_ref, atol=1e-6) and torch.allclose(g_big, g_ref, atol=1e-6)


class Mirrored(Dist):
    """Two ranks holding identical data: every all-reduced sum doubles."""

    def __init__(self):
        super().__init__(0, 2)

    def sum(self, values):
        return [2 * v for v in values]

    def max(self, value):
        return value


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_update_sums_to_the_global_gradient_over_ranks(tmp_path, agg):
    """FSDP averages gradients over ranks while the loss weights are global: each rank must scale
    its loss by the world size. With two ranks holding the same items, one plain-SGD step equals
    the one-rank step on those items."""
    path = make_tiny_checkpoint(str(tmp_path / "m"), seed=5)
    args = args_for(loss_agg=agg, grad_clip=0.0, micro_tokens=12)
    weights = []
    for d in (Dist(), Mirrored()):
        module = M.load_model(path)
        opt = torch.optim.SGD(module.parameters(), lr=1.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        part = rl.Trainable("policy", module, opt, schedule, lr=1.0)
        rl.update(part, make_items(), functools.partial(grpo.policy_loss, module, args=args,
                                                        kl_coef=0.0), args, d)
        weights.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    before = torch.cat([p.flatten() for p in M.load_model(path).parameters()])
    assert (weights[0] - before).abs().max() > 1e-4
    assert torch.allclose(weights[0], weights[1], atol=1e-7)


def test_micro_batches_respect_the_token_budget():
    items = make_items(1)
    shared = 0
    for budget in (1, 12, 20, 10_000):
        mbs = rl.micro_batches(items, budget, "cpu")
        assert [it for mb in mbs for it in mb.completions] == items
        for mb in mbs:
            assert len(mb.completions) == 1 or len(mb.ids) <= budget
            assert mb.targets.tolist() == [t for it in mb.completions for t in it.response_ids]
            # each packed token once; a sequence's keys, gathered, are its prompt + response
            unique = sum(len(it.response_ids) + len(it.prompt_ids) for it in mb.completions)
            att = mb.attention
            shared += att is not None
            keys = mb.ids if att is None else mb.ids[att.kv_index]
            cu_k = mb.cu_seqlens if att is None else att.cu_k
            seqs = [keys[a:b].tolist() for a, b in zip(cu_k[:-1], cu_k[1:])]
            assert seqs == [it.prompt_ids + it.response_ids for it in mb.completions]
            assert len(mb.ids) < unique if att is not None else len(mb.ids) == unique
            # a selected row is the token just before its target in that sequence
            pos = mb.positions[mb.select]
            assert (mb.positions[mb.select] + 1).tolist() == [
                len(it.prompt_ids) + j for it in mb.completions
                for j in range(len(it.response_ids))]
            assert mb.ids[mb.select].tolist() == [
                (it.prompt_ids + it.response_ids)[q] for it, q in zip(
                    [it for it in mb.completions for _ in it.response_ids], pos.tolist())]
    assert shared


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_shared_prompt_packing_equals_one_sequence_per_rollout(policy, backend, monkeypatch):
    """A group's responses attending to one packed copy of its prompt give the log-probs and
    gradients of every rollout packed whole, on both attention backends (flash: the double),
    with activation checkpointing too."""
    if backend == "flash":
        import flash_attn_double
        monkeypatch.setattr(M, "FLASH", flash_attn_double)
    items = make_items(3, group_sizes=(4, 1, 3))
    shared = rl.pack(items, "cpu")
    used = M.attention_backend("cpu", torch.float32)
    assert shared.attention is not None and (used == "flash-attn") == (backend == "flash")
    alone = [rl.pack([it], "cpu") for it in items]
    assert all(mb.attention is None for mb in alone)
    assert len(shared.ids) < sum(len(mb.ids) for mb in alone)
    weights = torch.randn(len(shared.targets), generator=torch.Generator().manual_seed(0))

    def run(mbs):
        policy.zero_grad()
        lp = torch.cat([rl.logprobs(policy, mb, entropy=True)[0] for mb in mbs])
        (lp * weights).sum().backward()
        return lp.detach(), torch.cat([p.grad.flatten() for p in policy.parameters()])
    (lp_s, g_s), (lp_a, g_a) = run([shared]), run(alone)
    assert torch.allclose(lp_s, lp_a, atol=1e-5)
    assert g_a.abs().sum() > 0 and torch.allclose(g_s, g_a, atol=1e-5)
    monkeypatch.setattr(policy, "gradient_checkpointing", True)  # the record survives recompute
    lp_c, g_c = run([shared])
    assert torch.allclose(lp_c, lp_s, atol=1e-6) and torch.allclose(g_c, g_s, atol=1e-6)


@pytest.mark.parametrize("flags,needle", [
    (["--reward-values", "1,0"], "--reward-values"),
    (["--group-size", "1"], "--num-samples 1"),
    (["--num-samples", "0"], "--num-samples 0"),
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
    for action in flags.build_parser("")._actions:
        assert action.help, f"{action.option_strings} has no help text"


def test_skipping_dead_completions_changes_nothing_but_the_work(tmp_path):
    """Zero-advantage completions (no KL, no entropy term) get no forward or backward but still
    count in the normaliser: the weights after an update equal those of the full update, also
    for a later update where every completion is dead (AdamW's moments still move them)."""
    path = make_tiny_checkpoint(str(tmp_path / "m"), seed=6)
    args = args_for(loss_agg="token-mean", micro_tokens=12)
    live = make_items()  # advantages -2 .. 2, one of them 0
    dead = make_items(3)
    for it in dead:
        it.advantages = torch.zeros_like(it.advantages)
    results = []
    for needs_forward in (None, lambda r: bool(r.advantages.any())):
        module = M.load_model(path)
        part = rl.Trainable.load("policy", path, 1e-3, args, Dist())
        part.module.load_state_dict(module.state_dict())
        stats = []
        for batch in (live + dead, dead):
            loss_fn = functools.partial(grpo.policy_loss, part.module, args=args, kl_coef=0.0)
            stats += rl.update(part, batch, loss_fn, args, Dist(), needs_forward)
        results.append((torch.cat([p.detach().flatten() for p in part.module.parameters()]), stats))
    (full, full_stats), (skipped, skip_stats) = results
    assert torch.allclose(full, skipped, atol=1e-6)
    assert [s["skipped_tokens"] for s in full_stats] == [0, 0]
    dead_tokens = sum(len(it.response_ids) for it in dead)
    zero = sum(len(it.response_ids) for it in live if not it.advantages.any())
    assert [s["skipped_tokens"] for s in skip_stats] == [dead_tokens + zero, dead_tokens]
    assert full_stats[0]["loss"] == pytest.approx(skip_stats[0]["loss"], abs=1e-7)


def test_update_reads_the_device_once_per_optimizer_step(tmp_path):
    """The host reads the device (.item(), .tolist(), .cpu()) a fixed number of times per
    optimizer step, not per micro-batch: on a GPU each read waits for every queued kernel, and
    FSDP cannot prefetch across it."""
    from torch.utils._python_dispatch import TorchDispatchMode
    path = make_tiny_checkpoint(str(tmp_path / "m"), seed=6)
    reads = {}

    class Reads(TorchDispatchMode):  # every way a CPU tensor becomes host numbers goes here
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads[self.key] = reads.get(self.key, 0) + 1
            return func(*args, **(kwargs or {}))
    for micro_tokens in (10_000, 12):
        args = args_for(loss_agg="token-mean", micro_tokens=micro_tokens)
        part = rl.Trainable.load("policy", path, 1e-3, args, Dist())
        items = make_items()
        loss_fn = functools.partial(grpo.policy_loss, part.module, args=args, kl_coef=0.0)
        mode = Reads()
        mode.key = len(rl.micro_batches(items, micro_tokens, "cpu"))
        with mode:
            rl.update(part, items, loss_fn, args, Dist())
    assert len(reads) == 2 and min(reads) == 1 and max(reads) >= 4  # 1 and >= 4 micro-batches
    assert len(set(reads.values())) == 1, reads
