"""The CPU kernels' output cache (csrc/cpu/output_cache.h, fastseg.memory): large outputs reuse the
storage of earlier outputs no tensor holds any more, never one that is held, and every kernel writes
all of a reused storage."""
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

from fastseg import memory
from fastseg.backend import extension
from fastseg.ops import (attention_gate, batch_norm_act, channel_gate, cross_gate, dilated_attention2d,
                         dynamic_conv2d, gated_pointwise, max_pool2x2, mixed_depthwise_conv2d,
                         pointwise_conv2d, spatial_gate)

pytestmark = pytest.mark.skipif(extension() is None, reason="needs the C++ extension")

MIB = 1 << 20


@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test starts from an empty cache with a 1 GiB limit, and leaves the limit it found."""
    previous = memory.set_output_cache_limit(0)
    memory.set_output_cache_limit(1 << 30)
    yield
    memory.set_output_cache_limit(0)
    memory.set_output_cache_limit(previous)


def _bn(x):
    return batch_norm_act(x, torch.ones(x.shape[1]), torch.zeros(x.shape[1]), None, None, True,
                          activation="silu", backend="cpu")


def test_a_dropped_output_is_reused_and_a_held_one_is_not():
    x = torch.randn(2, 16, 96, 96)  # 1.2 MB, above the cache's 1 MiB minimum
    held = _bn(x)
    kept = held.clone()
    second = _bn(x)
    assert second.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, kept, rtol=0, atol=0)
    ptr = second.data_ptr()
    used, unused = memory.cached_output_bytes()
    assert (used, unused) == (2 * x.nbytes, 0)
    del second
    assert memory.cached_output_bytes() == (x.nbytes, x.nbytes)
    third = _bn(x)
    assert third.data_ptr() == ptr
    torch.testing.assert_close(third, kept, rtol=0, atol=0)
    # a view keeps the storage in use
    view = third[:, :4]
    del third
    other = _bn(x)
    assert other.data_ptr() != ptr
    del view
    assert _bn(x).data_ptr() == ptr


def test_small_outputs_are_not_cached():
    _bn(torch.randn(2, 16, 32, 32))  # 128 KiB
    assert memory.cached_output_bytes() == (0, 0)


def test_limit_and_release():
    x = torch.randn(2, 16, 96, 96)
    y = _bn(x)
    _bn(x)  # dropped at once: unused in the cache
    assert memory.cached_output_bytes() == (x.nbytes, x.nbytes)
    assert memory.release_cached_outputs() == x.nbytes
    assert memory.cached_output_bytes() == (x.nbytes, 0)
    # the limit bounds what the cache references, least recently used dropped first
    assert memory.set_output_cache_limit(x.nbytes + x.nbytes // 2) == 1 << 30
    z = _bn(x)
    assert memory.cached_output_bytes() == (x.nbytes, 0)  # y is forgotten, z is referenced
    del y, z
    assert memory.cached_output_bytes() == (0, x.nbytes)
    # an output above the limit is never cached
    big = _bn(torch.randn(4, 16, 96, 96))
    assert memory.cached_output_bytes() == (0, x.nbytes)
    del big
    # 0 switches the cache off and releases everything
    memory.set_output_cache_limit(0)
    assert memory.cached_output_bytes() == (0, 0)
    _bn(x)
    assert memory.cached_output_bytes() == (0, 0)
    with pytest.raises(ValueError, match="limit_bytes"):
        memory.set_output_cache_limit(-1)


def test_channels_last_outputs_keep_their_layout_on_reuse():
    x = torch.randn(2, 16, 96, 96).contiguous(memory_format=torch.channels_last)
    ptr = _bn(x).data_ptr()
    y = _bn(x.contiguous())  # NCHW, the same bytes: reuses the channels-last output's storage
    assert y.data_ptr() == ptr and y.is_contiguous()
    del y
    z = _bn(x)
    assert z.data_ptr() == ptr and z.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(z, _bn(x.contiguous()))


def test_concurrent_calls_never_share_an_output():
    inputs = [torch.randn(2, 16, 96, 96) for _ in range(4)]
    expected = [_bn(x) for x in inputs]
    failures = []

    def work(i):
        for _ in range(6):
            y = _bn(inputs[i])
            if not torch.equal(y, expected[i]):
                failures.append(i)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


# Every op's forward and backward, at sizes whose outputs and input gradients are ≥ 1 MiB, built
# from a seeded generator so that two calls compute the same values.
def _leaf(g, *shape, scale=1.0, channels_last=False):
    t = torch.randn(*shape, generator=g) * scale
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_()


def _case(name):
    def build(g):
        if name == "batch_norm_act_nchw" or name == "batch_norm_act_cl":
            x = _leaf(g, 2, 16, 96, 96, channels_last=name.endswith("cl"))
            return [x], lambda: batch_norm_act(x, torch.ones(16), torch.zeros(16), None, None, True,
                                               activation="identity", pre_activation="gelu",
                                               backend="cpu")
        if name.startswith("mixed_depthwise_conv2d"):
            x = _leaf(g, 2, 16, 96, 96, channels_last=name.endswith("cl"))
            ws = [_leaf(g, 8, 1, 3, 3), _leaf(g, 8, 1, 5, 5)]
            return [x, *ws], lambda: mixed_depthwise_conv2d(x, ws, residual=True, backend="cpu")
        if name == "pointwise_conv2d":
            x, w = _leaf(g, 2, 16, 96, 96), _leaf(g, 32, 16, 1, 1, scale=0.25)
            return [x, w], lambda: pointwise_conv2d(x, w, backend="cpu")
        if name == "max_pool2x2":
            x = _leaf(g, 2, 16, 192, 192)
            return [x], lambda: max_pool2x2(x, backend="cpu")
        if name == "dilated_attention2d":
            q, k, v = (_leaf(g, 2, 64, 64, 2, 16) for _ in range(3))
            return [q, k, v], lambda: dilated_attention2d(q, k, v, 2, backend="cpu")
        if name.startswith("dynamic_conv2d"):
            C, S = (16, 96) if name.endswith("16") else (256, 32)
            x, e = _leaf(g, 2, C, S, S), _leaf(g, 4, C, C, 3, 3, scale=1 / math.sqrt(9 * C))
            r = torch.sigmoid(torch.randn(2, 4, generator=g)).requires_grad_()
            return [x, e, r], lambda: dynamic_conv2d(x, e, r, backend="cpu")
        if name == "spatial_gate":
            x, w, b = _leaf(g, 2, 16, 96, 96), _leaf(g, 1, 16), _leaf(g, 1)
            return [x, w, b], lambda: spatial_gate(x, w, b, backend="cpu")
        if name == "gated_pointwise":
            a = _leaf(g, 2, 16, 96, 96)
            ws, bs, wa, wb, bias = _leaf(g, 1, 16), _leaf(g, 1), _leaf(g, 16, 16), _leaf(g, 16, 16), _leaf(g, 16)
            return [a, ws, bs, wa, wb, bias], lambda: gated_pointwise(a, ws, bs, wa, wb, bias, backend="cpu")
        if name == "channel_gate":
            # skip's gradient is grad_out itself, not a kernel's output: not checked
            x, w1, w2 = _leaf(g, 2, 32, 64, 64), _leaf(g, 8, 32), _leaf(g, 32, 8)
            skip = torch.randn(2, 32, 128, 128, generator=g)
            return [x, w1, w2], lambda: channel_gate(x, w1, w2, skip, upsample=True, backend="cpu")
        if name == "cross_gate":
            a, b = _leaf(g, 2, 16, 96, 96), _leaf(g, 2, 16, 96, 96)
            return [a, b], lambda: cross_gate(a, b, backend="cpu")
        if name == "attention_gate":
            x, gg = _leaf(g, 2, 16, 96, 96), _leaf(g, 2, 16, 96, 96)
            wx, wg, b, pw, pb = _leaf(g, 8, 16), _leaf(g, 8, 16), _leaf(g, 8), _leaf(g, 1, 8), _leaf(g, 1)
            return [x, gg, wx, wg, b, pw, pb], lambda: attention_gate(x, gg, wx, wg, b, pw, pb, backend="cpu")
        raise AssertionError(name)
    return build


CASES = ["batch_norm_act_nchw", "batch_norm_act_cl", "mixed_depthwise_conv2d_nchw",
         "mixed_depthwise_conv2d_cl", "pointwise_conv2d", "max_pool2x2", "dilated_attention2d",
         "dynamic_conv2d_16", "dynamic_conv2d_256", "spatial_gate", "gated_pointwise", "channel_gate",
         "cross_gate", "attention_gate"]


def _run(name):
    """The op's output and its inputs' gradients (those of ≥ 1 MiB), from seeded inputs."""
    g = torch.Generator().manual_seed(0)
    inputs, op = _case(name)(g)
    y = op()
    y.backward(torch.randn(y.shape, generator=g).to(memory_format=torch.channels_last)
               if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
               else torch.randn(y.shape, generator=g))
    return [t for t in [y.detach(), *(i.grad for i in inputs)] if t.nbytes >= MIB]


@pytest.mark.parametrize("name", CASES)
def test_reused_memory_is_all_written(name):
    """Reused storages are filled with NaN before the second call: a kernel that skips any value of
    its output (a column, a tile's tail, a channel) leaves a NaN there."""
    memory.set_output_cache_limit(0)
    expected = _run(name)  # nothing cached: what the op computes
    memory.set_output_cache_limit(1 << 30)
    first = _run(name)
    ptrs = set()
    for t in first:
        t.fill_(math.nan)
        ptrs.add(t.data_ptr())
    del first, t
    second = _run(name)
    # every output and gradient of this size comes from the cache, i.e. from a NaN-filled storage
    assert all(t.data_ptr() in ptrs for t in second), name
    assert len(second) == len(expected) >= 1
    for got, want in zip(second, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_environment_sets_the_first_limit():
    code = ("import torch, fastseg.ops; from fastseg import memory;"
            "y = fastseg.ops.max_pool2x2(torch.randn(2, 16, 192, 192), backend='cpu');"
            "print(memory.cached_output_bytes()[0], memory.set_output_cache_limit(0))")
    for value, expected in (("0", "0 0"), ("64", f"{2 * 16 * 96 * 96 * 4} {64 * MIB}")):
        out = subprocess.run([sys.executable, "-c", code], env={**_env(), "FASTSEG_OUTPUT_CACHE_MB": value},
                             check=True, capture_output=True, text=True, timeout=120).stdout.split()
        assert " ".join(out) == expected
    bad = subprocess.run([sys.executable, "-c", code], env={**_env(), "FASTSEG_OUTPUT_CACHE_MB": "lots"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "FASTSEG_OUTPUT_CACHE_MB" in bad.stderr


def _env():
    return {k: v for k, v in os.environ.items() if k != "FASTSEG_OUTPUT_CACHE_MB"}
