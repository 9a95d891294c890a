"""Run by tests/test_parallel.py under torchrun (2 ranks, gloo): a bf16 mixed-precision update with
activation checkpointing, as on CUDA, under torch <= 2.12's FSDP2 recompute.

    torchrun --nproc_per_node 2 tests/fsdp_mixed_check.py CHECKPOINT OUT.json

Before torch 2.13, FSDP2 cast a module's forward inputs to the compute dtype in the forward but
not when activation checkpointing recomputed the module in the backward (pytorch#159359): here
its casts are skipped while a module is in PRE_BACKWARD, as 2.11 and 2.12 do, on any torch.
Then each rank samples under parallel.Gathered, whose model must be a plain one (no FSDP hooks),
against a plain bf16 model of the updated weights. Rank 0 writes OUT.json: per rank, the update's
loss and grad norm, whether every weight stayed finite and changed, the sampling comparison, and
the error if something raised.
"""
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402
import model as M  # noqa: E402
import rl  # noqa: E402
import rollout  # noqa: E402
from parallel import Gathered, setup_dist  # noqa: E402


def recompute_without_casts():
    """FSDP2's input and output casts skipped during a recompute in the backward (torch <= 2.12)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    cast_inputs, cast_output = FSDPState._cast_forward_inputs, FSDPState._cast_output_dtype

    def inputs(self, args, kwargs):
        if self._training_state == TrainingState.PRE_BACKWARD:
            return args, kwargs
        return cast_inputs(self, args, kwargs)

    def output(self, out):
        return out if self._training_state == TrainingState.PRE_BACKWARD else cast_output(self, out)
    FSDPState._cast_forward_inputs, FSDPState._cast_output_dtype = inputs, output


def completions(rank: int, n: int = 4):
    g = torch.Generator().manual_seed(rank)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 300, (7,), generator=g).tolist()
        response = torch.randint(0, 300, (5,), generator=g).tolist()
        out.append(rl.Completion(None, i, prompt, response, torch.zeros(5), "stop",
                                 advantages=torch.full((5,), i - 1.5)))
    return out


def sample_gathered(sharded, ckpt: str, rank: int) -> dict:
    """Sampling with the gathered weights against a plain bf16 model of the same weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    plain = M.load_model(ckpt, dtype=torch.bfloat16)
    plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in full.items()})
    g = torch.Generator().manual_seed(rank)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3 + rank, 9)]
    sampling = rollout.Sampling(n=2, max_new_tokens=6 + 3 * rank, seed=rank)
    with Gathered(sharded) as m:
        hooks = sum(isinstance(x, FSDPModule) for x in m.modules())
        dtype = str(m.model.embed_tokens.weight.dtype)
        ours = rollout.generate(m, prompts, sampling, stop_ids=[], progress=False)
    ref = rollout.generate(plain, prompts, sampling, stop_ids=[], progress=False)
    return dict(gathered_fsdp_modules=hooks, gathered_dtype=dtype,
                same_tokens=[s.response_ids for s in ours] == [s.response_ids for s in ref],
                logprob_max_diff=max(abs(a - b) for s, r in zip(ours, ref)
                                     for a, b in zip(s.logprobs, r.logprobs)))


def main(ckpt: str, out: str):
    recompute_without_casts()
    d = setup_dist()
    d.dtype = torch.bfloat16  # what setup_dist picks on CUDA
    args = grpo.get_args(["--model", "tiny", "--micro-tokens", "30", "--lr", "1e-3",
                          "--grad-ckpt"])
    part = rl.Trainable.load("policy", ckpt, args.lr, args, d)
    before = [p.detach().to_local().clone() for p in part.module.parameters()]
    seen = set()  # the dtype each linear layer computes in
    for m in part.module.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, inp, res: seen.add(str(mod.weight.dtype)))
    report = {}
    try:
        def loss_fn(mb, weights):
            return grpo.policy_loss(part.module, mb, weights, args, kl_coef=0.0)
        steps = rl.update(part, completions(d.rank), loss_fn, args, d)
        after = [p.detach().to_local() for p in part.module.parameters()]
        report = dict(loss=steps[0]["loss"], grad_norm=steps[0]["grad_norm"],
                      finite=all(bool(torch.isfinite(p).all()) for p in after),
                      changed=sum(not torch.equal(a, b) for a, b in zip(before, after)),
                      params=len(after), compute_dtypes=sorted(seen))
        report.update(sample_gathered(part.module, ckpt, d.rank))
    except Exception as e:  # the report says what failed; the test shows it
        report = dict(error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:])
    reports = d.gather(report)
    if d.main:
        Path(out).write_text(json.dumps(reports))
    d.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
