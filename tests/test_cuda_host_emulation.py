"""The CUDA kernels of dilated_attention2d, run on the CPU.

No GPU runs here, so ``csrc/cuda/dilated_attention.cu`` itself is compiled by the host compiler
under ``tests/cuda_host/emulation.h`` (a block's threads become std::threads meeting at a barrier
for ``__syncthreads``; ``__shared__`` arrays become statics shared by the block), with its
``<<<grid, block, 0, stream>>>`` launches rewritten into calls of the emulator. What runs is the
kernels' real indexing, tiling, chunking, masking and arithmetic, launched by the real host
launchers; it is checked against a dense masked softmax in float64.

Not covered: what the emulation cannot show — nvcc's code generation, warps, the GPU memory
model beyond the block barrier, and the rounding of the GPU's own exp2f/log2f.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HOST_DIR = Path(__file__).resolve().parent / "cuda_host"

_LAUNCH = re.compile(r"([\w<>]+)<<<(.+?),\s*(\w+),\s*0,\s*stream>>>\(", re.S)


def _cuda_include() -> Path | None:
    include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    return include if (include / "cuda_fp16.h").exists() else None


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    include, compiler = _cuda_include(), shutil.which(os.environ.get("CXX", "c++"))
    if include is None or compiler is None:
        pytest.skip("needs the CUDA toolkit's headers (CUDA_HOME) and a host C++ compiler")
    tmp = tmp_path_factory.mktemp("cuda_host")
    source = (ROOT / "csrc" / "cuda" / "dilated_attention.cu").read_text()
    rewritten, launches = _LAUNCH.subn(r"fastseg_emu::launch(\2, \3, \1, ", source)
    assert launches == source.count("<<<") > 0, "a launch the rewrite does not understand"
    kernel_file = tmp / "dilated_attention_kernels.cpp"
    kernel_file.write_text(rewritten)
    library = tmp / "dilated_attention_host.so"
    subprocess.run(
        [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w",
         # The flags torch's extension build gives nvcc: half types convert only explicitly.
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
         f"-I{ROOT / 'csrc'}", f"-I{include}", f"-I{HOST_DIR}", f'-DKERNEL_FILE="{kernel_file}"',
         str(HOST_DIR / "dilated_attention.cpp"), "-o", str(library)],
        check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(library))


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def run_kernels(lib, q, k, v, grad_out, dilation, scale):
    """Forward, then backward from the kernels' own out and lse: (out, lse, dq, dk, dv)."""
    dtype = str(q.dtype).removeprefix("torch.")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, grad_out = (t.contiguous() for t in (q, k, v, grad_out))
    dims = (ctypes.c_int64 * 7)(*q.shape, v.shape[-1], dilation)
    # NaN-filled: every element must be written by the kernels.
    out = torch.full_like(v, float("nan"))
    lse = torch.full(q.shape[:4], float("nan"), dtype=acc)
    getattr(lib, f"forward_{dtype}")(dims, ctypes.c_double(scale), _ptr(q), _ptr(k), _ptr(v),
                                     _ptr(out), _ptr(lse))
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    delta = torch.full_like(lse, float("nan"))
    getattr(lib, f"backward_{dtype}")(dims, ctypes.c_double(scale), _ptr(grad_out), _ptr(q),
                                      _ptr(k), _ptr(v), _ptr(out), _ptr(lse), _ptr(delta),
                                      *map(_ptr, grads))
    return (out, lse, *grads)


def dense_reference(q, k, v, grad_out, dilation, scale):
    """(out, lse, dq, dk, dv) in float64 from the full score matrix, masked to parity groups."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    N, H, W, heads, _ = q.shape
    r = torch.arange(H).repeat_interleave(W)
    c = torch.arange(W).repeat(H)
    same = ((r[:, None] - r[None, :]) % dilation == 0) & ((c[:, None] - c[None, :]) % dilation == 0)
    tokens = lambda t: t.reshape(N, H * W, heads, -1).transpose(1, 2)  # noqa: E731
    scores = (scale * tokens(q) @ tokens(k).transpose(-1, -2)).masked_fill(~same, float("-inf"))
    out = (torch.softmax(scores, -1) @ tokens(v)).transpose(1, 2).reshape(v.shape)
    lse = torch.logsumexp(scores, -1).transpose(1, 2).reshape(q.shape[:4])
    out.backward(grad_out.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


# N, H, W, heads, d_qk, d_v, dilation, scale: dilations 1-3, d_qk ≠ d_v, a single token per
# group, group sizes that leave tails in the staged tiles (16 or 8 rows) and span two 128-row
# blocks, column counts that leave tails in the 8-column chunks or take several chunks, and
# LightAWNet's and LGMSNet's head shapes.
CASES = [
    (1, 6, 9, 2, 3, 5, 3, 0.7),
    (2, 4, 6, 1, 8, 8, 2, 8 ** -0.5),
    (1, 5, 7, 1, 13, 21, 1, 1.0),
    (1, 12, 12, 2, 8, 8, 1, 0.35),
    (1, 34, 10, 1, 32, 17, 2, 1.0),
    (2, 3, 3, 3, 1, 1, 3, 2.0),
    (1, 8, 8, 1, 32, 64, 1, 1.0),
    (1, 16, 16, 4, 8, 8, 2, 8 ** -0.5),
]

TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernels_match_dense_attention(kernels, case, dtype):
    N, H, W, heads, d_qk, d_v, dilation, scale = case
    gen = torch.Generator().manual_seed(hash(case) % 2 ** 31)
    q, k = (torch.randn(N, H, W, heads, d_qk, generator=gen).to(dtype) for _ in range(2))
    v, grad_out = (torch.randn(N, H, W, heads, d_v, generator=gen).to(dtype) for _ in range(2))
    got = run_kernels(kernels, q, k, v, grad_out, dilation, scale)
    want = dense_reference(q, k, v, grad_out, dilation, scale)
    for name, g, w in zip(("out", "lse", "grad_q", "grad_k", "grad_v"), got, want):
        assert torch.isfinite(g).all(), f"{name}: not every element written or not finite"
        err = (g.double() - w).abs().max().item()
        assert err <= TOLERANCES[dtype] * (1 + w.abs().max().item()), (name, err)
        # With one token per group the softmax is constant: q and k get no gradient.
        if H * W > dilation ** 2 or name not in ("grad_q", "grad_k"):
            assert w.abs().max() > 0.1, f"{name}: a check on near-zeros"


def test_large_scores_stay_finite_and_exact(kernels):
    """Scores of magnitude ~1e4: the online softmax and the recomputed P must not overflow."""
    gen = torch.Generator().manual_seed(0)
    q, k = (100 * torch.randn(1, 8, 6, 2, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    v, grad_out = (torch.randn(1, 8, 6, 2, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    got = run_kernels(kernels, q, k, v, grad_out, 2, 1.0)
    want = dense_reference(q, k, v, grad_out, 2, 1.0)
    assert want[1].abs().max() > 1e3
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert (g - w).abs().max() <= 1e-9 * (1 + w.abs().max())
