"""A CPU test double of the CUDA-graph API that rollout.Engine captures decode steps with
(`graph_pool_handle`, `Stream`, `stream`, `current_stream`, `CUDAGraph`, `graph`), injected as
rollout.GRAPHS, with a graph's semantics where a CPU can have them:

- capture runs the body once, recording every aten op it dispatches with its arguments as they
  are: tensors by identity (their memory), Python numbers frozen at their captured values;
- replay runs the recorded ops again on those same tensors, in order, and copies each result into
  the tensor the capture produced, so that data flows only through memory that existed when the
  graph was captured (views are not re-run: they alias that memory already);
- a host sync inside capture (`.item()`, `.tolist()`, `bool()`) raises, as CUDA's capture does.

So a step that read a per-step Python value, or a tensor made outside its static buffers, replays
stale data here as on a GPU. Counters: `captures`, `replays`.
"""
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

IS_TEST_DOUBLE = True
captures, replays = 0, 0


class CUDAGraph:
    def __init__(self):
        self.ops = []  # (func, args, kwargs, output)

    def replay(self):
        global replays
        replays += 1
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            for dst, src in zip(tree_leaves(out), tree_leaves(new)):
                if isinstance(dst, torch.Tensor) and dst is not src:
                    dst.copy_(src)


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                 for r in returns)


class _Capture(TorchDispatchMode):
    def __init__(self, graph: CUDAGraph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("cuda graph double: a host sync (.item(), .tolist(), bool()) "
                               "while capturing: operation not permitted when stream is capturing")
        out = func(*args, **kwargs)
        if not _is_view(func):
            self.graph.ops.append((func, args, kwargs, out))
        return out


@contextlib.contextmanager
def graph(cuda_graph: CUDAGraph, pool=None, stream=None, capture_error_mode="global"):
    global captures
    captures += 1
    with _Capture(cuda_graph):
        yield


class Stream:
    def wait_stream(self, other):
        pass


def current_stream():
    return Stream()


@contextlib.contextmanager
def stream(s):
    yield


def graph_pool_handle():
    return object()
