"""Run by tests/test_parallel.py under torchrun (2 ranks, gloo): what FSDP2 holds in memory.

    torchrun --nproc_per_node 2 tests/fsdp_check.py CHECKPOINT BROKEN_CHECKPOINT OUT.json

Rank 0 writes OUT.json: whether the sharded load equals a single-process load, peak RSS, the bytes
of gradient storage held between the micro-batches of one update, and the error each rank got
loading a broken checkpoint (rank 0 reads it; the others must not wait for a broadcast forever).
"""
import gc
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402
import model as M  # noqa: E402
import rl  # noqa: E402
from parallel import load_sharded, setup_dist  # noqa: E402


def tensor_bytes(module) -> int:
    """Bytes of every distinct tensor storage reachable by the garbage collector, plus the gradients
    FSDP2 holds out of Python's sight (an unsharded parameter's grad between micro-batches)."""
    from torch.distributed.fsdp import FSDPModule
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for m in module.modules():
        group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
        for p in group.fsdp_params if group else []:
            unsharded = getattr(p, "_unsharded_param", None)
            tensors += [unsharded.grad if unsharded is not None else None,
                        p.unsharded_accumulated_grad]
    seen = {}
    for t in tensors:
        if t is None or isinstance(t, torch.distributed.tensor.DTensor):
            continue  # a DTensor's local shard is a tensor of its own in the list
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # meta or other storage-less tensors
            continue
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def items(n=6):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 300, (6,), generator=g).tolist()
        response = torch.randint(0, 300, (5,), generator=g).tolist()
        out.append(rl.Completion(None, i, prompt, response, torch.zeros(5), "stop",
                                 advantages=torch.full((5,), i - 2.5)))
    return out


def load_error(path: str, d) -> str:
    try:
        load_sharded(path, d, torch.float32)
    except ValueError as e:
        return str(e)
    return "no error"


def main(ckpt: str, broken: str, out: str):
    d = setup_dist()
    policy = load_sharded(ckpt, d, torch.float32)
    peak_rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
    single = M.load_model(ckpt).state_dict()
    same = sorted(full) == sorted(single) and all(torch.equal(full[k], single[k]) for k in single)
    local = sum(p.to_local().numel() for p in policy.parameters())
    # One update in several micro-batches (all on rank 0's 6 items, rank 1's 6 others).
    args = grpo.get_args(["--model", "tiny", "--micro-tokens", "24", "--lr", "1e-3"])
    part = rl.Trainable.load("policy", ckpt, args.lr, args, d)
    param_bytes = sum(p.numel() * 4 for p in part.module.parameters())  # full size, fp32
    held = []

    def loss_fn(mb, weights):
        gc.collect()
        held.append(tensor_bytes(part.module))
        return grpo.policy_loss(part.module, mb, weights, args, kl_coef=0.0)
    rl.update(part, items()[d.rank::2] * 2, loss_fn, args, d)
    errors = d.gather(load_error(broken, d))
    if d.main:
        Path(out).write_text(json.dumps(dict(
            same_as_single_process=same, local_params=local,
            full_params=sum(v.numel() for v in single.values()),
            peak_rss_after_load=peak_rss_load,
            grad_bytes_between_micro_batches=max(h - held[0] for h in held[1:]),
            micro_batches=len(held), full_param_bytes=param_bytes, load_errors=errors)))
    d.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
