"""The interleaved benchmark scripts of bench/ (run by hand for bench/RESULTS.md, not by
`pytest bench`) run end to end at tiny sizes and print their tables."""
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def script(*args):
    """The finished process of ``python *args`` run in bench/."""
    return subprocess.run([sys.executable, *args], cwd=BENCH, capture_output=True, text=True,
                          timeout=600)


def run(*args):
    """stdout of ``python *args`` run in bench/, which must succeed."""
    result = script(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_interleaved_dynamic_conv():
    out = run("interleaved_dynamic_conv.py", "--shapes", "2x4x8x8", "3x5x6x7", "--rounds", "2",
              "--impls", "static-conv", "reference", "cpu")
    rows = [line for line in out.splitlines() if line.startswith("| 4 at 8×8 (batch 2)")
            or line.startswith("| 5 at 6×7 (batch 3)")]
    assert len(rows) == 2 and all(row.count("|") == 6 for row in rows), out


def test_interleaved_dynamic_conv_forces_each_plan_and_3x3_algorithm():
    out = run("interleaved_dynamic_conv.py", "--shapes", "1x16x32x32", "2x16x24x16x16",
              "--rounds", "2", "--mode", "forward", "--impls", "static-conv", "cpu",
              "cpu-direct3x3", "cpu-winograd3x3", "cpu-gemm-plan")
    rows = [line for line in out.splitlines() if line.startswith("| 16 at 32×32 (batch 1)")
            or line.startswith("| 16 → 24 at 16×16 (batch 2)")]
    assert len(rows) == 2 and all(row.count("|") == 8 for row in rows), out


def test_interleaved_dynamic_conv_rejects_a_bad_shape():
    result = script("interleaved_dynamic_conv.py", "--shapes", "8x16")
    assert result.returncode == 2 and "NxCxHxW" in result.stderr


def test_interleaved_models():
    out = run("interleaved_models.py", "--model", "lightawnet", "--mode", "inference",
              "--batch", "1", "--size", "32", "--rounds", "2", "--impls", "reference", "cpu-folded")
    assert "| reference |" in out and "| cpu-folded |" in out, out


def test_interleaved_pointwise_conv():
    out = run("bench_pointwise_conv.py", "--mode", "forward+backward", "--rounds", "2", "--calls",
              "1", "--shapes", "2", "9", "5", "7", "4", "--impls", "reference", "gemm", "cpu")
    rows = [line for line in out.splitlines() if line.startswith("| 2×9×5×7 → 4 |")]
    assert len(rows) == 1 and rows[0].count("|") == 7, out


def test_compiled_references_stay_compiled_past_eight_shapes():
    """The benchmarks' compile_static compiles a graph for every shape, where plain
    torch.compile(dynamic=False) runs the function eagerly from the ninth graph on."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        from compiled import compile_static
    finally:
        sys.path.remove(str(BENCH))
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def scaled(x):
        return x * 2 + 1

    fn = compile_static(scaled, backend=counting_backend)
    for n in range(1, 13):
        assert torch.equal(fn(torch.ones(n)), torch.full((n,), 3.0))
    assert len(graphs) == 12
