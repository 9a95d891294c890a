"""Processes and devices: the process group, FSDP2 sharding, gathered weights for generation.

One setup for every entry point (grpo.py, ppo.py, evaluate.py). torchrun sets WORLD_SIZE and RANK;
without it, one CPU process is one rank with no process group, and one GPU is a one-rank NCCL
group (so FSDP2's bf16 mixed precision applies there too). Every collective lives behind `Dist`,
so the rest of medrl never imports torch.distributed.
"""
import ctypes
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

import model as M


@dataclass
class Dist:
    """This process's place among the ranks, and the few collectives medrl needs."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    # Inference, gathered weights and the compute dtype of FSDP2's mixed precision: bf16 on CUDA,
    # fp32 on CPU (where bf16 is slow). A field, not a device test, so a CPU test can run bf16.
    dtype: torch.dtype = torch.float32

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        """A process group exists (torchrun, or one GPU as a one-rank group)."""
        return torch_dist.is_initialized()

    def sum(self, values: list[float] | torch.Tensor) -> list[float]:
        """All-reduce a list of floats, or a 1-D tensor on this device (then the host reads the
        device once, after the collective): one collective, the same length on every rank."""
        if isinstance(values, torch.Tensor):
            t = values.to(torch.float64)
        else:
            t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch_dist.all_reduce(t)
        return t.tolist()

    def max(self, value: int | float) -> int | float:
        """The largest of every rank's `value`, of its type (float64 holds any count exactly)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return type(value)(t.item())

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0, in rank order (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        torch_dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world > 1:
            torch_dist.barrier()

    def close(self):
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def setup_dist(timeout_minutes: float = 120) -> Dist:
    """torchrun's environment -> Dist; NCCL on CUDA, gloo on CPU. Plain `python` is one rank.
    A collective waits up to `timeout_minutes` for the other ranks (NCCL's default, 10 minutes,
    is shorter than rank 0 writing a 16 GB checkpoint while the others wait, or than the
    difference in generation time between ranks)."""
    cuda = torch.cuda.is_available()
    if not cuda:
        give_back_freed_memory()
    if "WORLD_SIZE" not in os.environ:
        if not cuda:
            return Dist()
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)  # before the group: its communicator binds this device
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if cuda else "gloo",
                                      timeout=datetime.timedelta(minutes=timeout_minutes),
                                      device_id=device if cuda else None)
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), device,
                torch.bfloat16 if cuda else torch.float32)


def give_back_freed_memory():
    """CPU tensors come from glibc malloc, whose mmap threshold rises with every large free, after
    which big tensors come from the heap and fragment it, and a real-model GRPO step's resident
    memory grows by a third (bench/README.md). A fixed threshold keeps every tensor above 128 KiB
    mmapped, given back to the system when freed. No-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def shard(module: torch.nn.Module, dist: Dist, compute_dtype: torch.dtype | None = None):
    """FSDP2: each block, then the root. Compute in `compute_dtype` (default dist.dtype: bf16 on
    CUDA) with fp32 gradient reduction. FSDP2 does not cast forward inputs: before torch 2.13 it
    cast them in the forward but not when an activation-checkpointed block is recomputed in the
    backward, so the fp32 RoPE tables came back in another dtype and the first backward raised
    CheckpointError. The model makes each input in the dtype it computes in (CausalLM.forward),
    the same both times."""
    if not torch_dist.is_initialized():  # one CPU process
        return module.to(dist.device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    compute_dtype = compute_dtype or dist.dtype
    policy = MixedPrecisionPolicy(cast_forward_inputs=False)
    if compute_dtype != torch.float32:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                      cast_forward_inputs=False)
    for block in module.model.layers:
        fully_shard(block, mp_policy=policy)
    return fully_shard(module, mp_policy=policy)


def load_sharded(path: str, dist: Dist, dtype: torch.dtype, value_head: bool = False,
                 compute_dtype: torch.dtype | None = None):
    """A model from an HF checkpoint, sharded, from one host copy of the weights: every rank builds
    it on the meta device, shards it and allocates only its own shards; rank 0 reads the checkpoint
    and broadcasts it tensor by tensor, each rank keeping its slice. Host memory holds rank 0's
    copy only; each device its shards plus one full tensor in flight. Weights are stored in
    `dtype` and computed in `compute_dtype` (shard's default: dist.dtype)."""
    if not torch_dist.is_initialized():
        return M.load_model(path, dist.device, dtype, value_head=value_head)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    model, path, head_new = M.build_model(path, value_head, dtype)
    state, error = {}, None
    if dist.main:
        try:
            state = M.read_weights(model, path, head_new)
        except (OSError, ValueError) as e:
            error = e
    error = dist.broadcast(error)  # every rank raises rank 0's error; none waits forever
    if error is not None:
        raise error
    shard(model, dist, compute_dtype)
    model.to_empty(device=dist.device)
    # strict=False: a tied lm_head has no key of its own; read_weights has checked every key.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, state, options=options)
    if dist.sum([len(M.nonfinite_weights(model))])[0]:  # every rank raises, none waits
        raise ValueError(f"{path}: non-finite weights (NaN or inf)")
    return M.finish_loading(model, path, dist.device)


class Gathered:
    """Context: every FSDP parameter gathered for generation, as a plain model over the gathered
    tensors (no copy): no FSDP hooks run in a decode step and no collective, so ranks may decode
    different numbers of steps. Resharded on exit, after which that model must not be used.
    Unsharded, the module itself."""

    def __init__(self, module):
        from torch.distributed.fsdp import FSDPModule
        self.module = module
        self.fsdp = [m for m in module.modules() if isinstance(m, FSDPModule)]

    def __enter__(self):
        if not self.fsdp:
            return self.module
        for m in self.fsdp:
            m.unshard()  # waits: every parameter is now the full tensor (in the compute dtype)
        return plain_model(self.module)

    def __exit__(self, *exc):
        for m in self.fsdp:
            m.reshard()


def plain_model(module: M.CausalLM) -> M.CausalLM:
    """A CausalLM of `module`'s config holding `module`'s current parameter tensors (shared)."""
    with torch.device("meta"):
        plain = M.CausalLM(module.config)
    state = {name: p.detach() for name, p in module.named_parameters()}
    missing = plain.load_state_dict(state, strict=False, assign=True).missing_keys
    plain.tie_weights()
    tied = module.config.tie_word_embeddings and not module.config.value_head
    assert missing == (["lm_head.weight"] if tied else []), missing  # a tied head has no key
    plain.inv_freq, plain.generation_config = module.inv_freq, module.generation_config
    return plain
