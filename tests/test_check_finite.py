"""The ops' shared NaN/inf check: exact, although it first looks only at each tensor's sum."""
import pytest
import torch

from fastseg.ops._registry import check_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_finite_values_whose_sum_overflows_pass(dtype):
    big = torch.finfo(dtype).max
    check_finite([("x", torch.full((5, 3), big, dtype=dtype)), ("y", None), ("i", torch.arange(4))])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_any_non_finite_element_is_named(bad):
    x = torch.randn(4, 7)
    y = torch.randn(3, 33, 5)
    y[2, 31, 4] = bad
    with pytest.raises(ValueError, match="^y contains NaN or inf$"):
        check_finite([("x", x), ("y", y)])


def test_opposite_infinities_are_caught():
    x = torch.zeros(10)
    x[1], x[8] = float("inf"), -float("inf")
    with pytest.raises(ValueError, match="x contains"):
        check_finite([("x", x)])


def test_leaves_no_autograd_record():
    x = torch.randn(3, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        check_finite([("x", x)])
    assert saved == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_cpu_kernels_check_finds_every_position(dtype, bad):
    """The cpu kernels' own check (csrc/cpu/finite.h: four vector sums of 64 bytes each, then a
    tail) through cross_gate's forward, which checks each plane of a and b: a non-finite value at
    any position of a 13 × 23 plane (299 values: 4 or 9 whole steps and a partial tail) is found."""
    from fastseg.backend import unavailable_reason
    why = unavailable_reason("cpu", "cpu")
    if why:
        pytest.skip(why)
    from fastseg.ops import attention_gates  # noqa: F401  (registers the op)
    a = torch.randn(1, 1, 13, 23, dtype=dtype)
    b = torch.randn(1, 1, 13, 23, dtype=dtype)
    torch.ops.fastseg.cross_gate(a, b, True)  # finite: no error
    for i in range(a.numel()):
        bad_a = a.clone()
        bad_a.view(-1)[i] = bad
        with pytest.raises(ValueError, match="a contains NaN or inf"):
            torch.ops.fastseg.cross_gate(bad_a, b, True)


def test_tensors_off_the_cpu_are_not_checked():
    """A GPU tensor's check would wait for the device on every call; the meta device stands in
    for one here (its values cannot be read at all)."""
    check_finite([("x", torch.empty(3, 4, device="meta"))])
