"""The fused ops under torch.autocast: inputs cast to one dtype (at least float32 on CPU), autocast
off inside, so models of fastseg layers train with mixed precision on every backend."""
import pytest
import torch

import fastseg
from fastseg.ops import dilated_attention2d, mixed_depthwise_conv2d

BACKENDS = [b for b in ("reference", "cpu") if b in fastseg.available_backends("cpu")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_promote_under_autocast(backend):
    x = torch.randn(2, 8, 6, 6).bfloat16()
    weights = [torch.randn(4, 1, 3, 3), torch.randn(4, 1, 5, 5)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixed_depthwise_conv2d(x, weights, backend=backend)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, mixed_depthwise_conv2d(x.float(), weights, backend="reference"))
    with pytest.raises(ValueError, match="dtype"):  # outside autocast mixed dtypes stay an error
        mixed_depthwise_conv2d(x, weights, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_inputs_compute_in_float32_on_cpu(backend):
    q, k, v = (torch.randn(1, 4, 4, 2, 8, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dilated_attention2d(q, k, v, backend=backend)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()

