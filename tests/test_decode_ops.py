"""bench/decode_ops.py counts what a GPU would launch and wait for: checked on known code, then
on the sampler's decode step."""
import importlib.util

import torch

from conftest import ROOT


def load():
    spec = importlib.util.spec_from_file_location("decode_ops", ROOT / "bench" / "decode_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counts_kernels_and_syncs_of_known_code():
    ops = load()
    counter = ops.Counter()
    x = torch.randn(4, 6)
    with counter, ops.host_syncs(counter):
        x.view(6, 4).t()  # views: no kernel
        counter.on = True
        y = (x + 1).view(24).mul(2)  # 2 kernels, a view
        y[y > 0]  # a mask (kernel) and a select sized by its values (kernel + sync)
        y.tolist()
        torch.tensor([1, 2], device="cpu")  # built from host data on the device
        torch.tensor([1, 2])  # host only
        with counter.one_kernel("fused"):
            torch.randn(3).exp().sum()  # inside a fused kernel: one
        counter.on = False
        x.tolist()  # not counted: off
    assert counter.kernels == {"add.Tensor": 1, "mul.Tensor": 1, "gt.Scalar": 1,
                               "index.Tensor": 1, "fused": 1}, counter.kernels
    assert counter.syncs == {"index.Tensor (output size from values)": 1, ".tolist()": 1,
                             "torch.tensor(host data, device=...)": 1}, counter.syncs


def test_decode_step_of_the_sampler():
    """The paged engine's step: the attention kernel once per layer, the rest a bounded number
    of kernels per layer, and one host sync: the read of the step's results."""
    ops = load()
    for kernel, name in (("flash-attn", "flash_attn_with_kvcache"), ("varlen", "varlen_attn")):
        two, four = ops.count_step(2, kernel), ops.count_step(4, kernel)
        assert four.kernels[name] == 4 and two.kernels[name] == 2
        per_layer = (sum(four.kernels.values()) - sum(two.kernels.values())) // 2
        assert 10 <= per_layer <= 60
        assert four.syncs == {".tolist()": 1}, four.syncs
    gather = ops.count_step(2, "gather")
    assert gather.syncs == {".tolist()": 1} and not gather.kernels["varlen_attn"]
