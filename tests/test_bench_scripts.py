"""The interleaved benchmark scripts of bench/ (run by hand for bench/RESULTS.md, not by
`pytest bench`) run end to end at tiny sizes and print their tables."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_interleaved_dynamic_conv_floor(mode):
    out = run("interleaved_dynamic_conv.py", "--shapes", "2x4x6x8x8", "--rounds", "2", "--mode",
              mode, "--impls", "static-conv", "cpu", "--floor")
    header = next(line for line in out.splitlines() if line.startswith("| C → C"))
    assert "products ms (/ static)" in header and "floor / static" in header, out
    row = next(line for line in out.splitlines() if line.startswith("| 4 → 6 at 8×8 (batch 2)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 7 and float(cells[-1].rstrip("×")) > 0, out


def test_interleaved_times_counts_calls():
    """One warm-up call each, then per round one untimed call and `calls` timed ones (one call a
    round by default), each round's time the mean of the timed ones."""
    sys.path.insert(0, str(BENCH))
    try:
        from interleave import interleaved_times
    finally:
        sys.path.remove(str(BENCH))
    counts = {"a": 0, "b": 0}

    def counter(name):
        def run():
            counts[name] += 1
        return run

    times = interleaved_times({name: counter(name) for name in counts}, rounds=3, calls=2)
    assert counts == {"a": 1 + 3 * 3, "b": 1 + 3 * 3} and all(len(t) == 3 for t in times.values())
    counts.update(a=0, b=0)
    times = interleaved_times({name: counter(name) for name in counts}, rounds=4)
    assert counts == {"a": 5, "b": 5} and all(len(t) == 4 for t in times.values())
    with pytest.raises(ValueError, match="calls must be at least 1"):
        interleaved_times({"a": counter("a")}, rounds=1, calls=0)


def test_interleaved_dynamic_conv_steady_state_calls():
    out = run("interleaved_dynamic_conv.py", "--shapes", "2x4x8x8", "--rounds", "2", "--calls", "2",
              "--impls", "static-conv", "cpu")
    assert "one untimed call and the mean of 2 timed ones" in out, out
    row = next(line for line in out.splitlines() if line.startswith("| 4 at 8×8 (batch 2)"))
    assert row.count("|") == 5, out
    result = script("interleaved_dynamic_conv.py", "--calls", "0")
    assert result.returncode == 2 and "--calls must be at least 1" in result.stderr


def test_interleaved_dynamic_conv_retains_freed_memory():
    out = run("interleaved_dynamic_conv.py", "--shapes", "2x4x8x8", "--rounds", "2",
              "--retain-freed-memory", "--impls", "static-conv", "reference", "cpu")
    assert "freed memory retained" in out, out
    row = next(line for line in out.splitlines() if line.startswith("| 4 at 8×8 (batch 2)"))
    assert row.count("|") == 6, out


def test_interleaved_dynamic_conv_runs_with_the_experts_asked_for(monkeypatch):
    """--experts K reaches the implementations' inputs; K < 1 is refused."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_dynamic_conv
        import interleaved_dynamic_conv
    finally:
        sys.path.remove(str(BENCH))
    seen = set()

    def recording(x, experts, routing):
        seen.add((experts.shape[0], routing.shape[1]))
        return bench_dynamic_conv.static_conv(x, experts, routing)

    monkeypatch.setitem(bench_dynamic_conv.IMPLS, "cpu", recording)
    interleaved_dynamic_conv.main(["--shapes", "2x4x8x8", "--rounds", "1", "--experts", "3",
                                   "--impls", "static-conv", "cpu", "--floor"])
    assert seen == {(3, 3)}
    out = run("interleaved_dynamic_conv.py", "--shapes", "2x4x8x8", "--rounds", "2", "--experts",
              "1", "--impls", "static-conv", "cpu")
    assert "K = 1 experts" in out, out
    result = script("interleaved_dynamic_conv.py", "--experts", "0")
    assert result.returncode == 2 and "--experts must be at least 1" in result.stderr


def test_interleaved_dynamic_conv_rejects_a_bad_shape():
    result = script("interleaved_dynamic_conv.py", "--shapes", "8x16")
    assert result.returncode == 2 and "NxCxHxW" in result.stderr


def test_interleaved_models():
    out = run("interleaved_models.py", "--model", "lightawnet", "--mode", "inference",
              "--batch", "1", "--size", "32", "--rounds", "2", "--impls", "reference", "cpu-folded")
    assert "| reference |" in out and "| cpu-folded |" in out, out


def test_interleaved_models_against_a_second_implementation():
    out = run("interleaved_models.py", "--model", "lightawnet", "--mode", "inference",
              "--batch", "1", "--size", "32", "--rounds", "2", "--impls", "reference", "cpu-folded",
              "--against", "cpu-folded")
    assert "speedup vs cpu-folded (median of rounds)" in out, out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines()
            if line.startswith(("| reference |", "| cpu-folded |"))}
    assert rows["cpu-folded"].rstrip().endswith("| 1.00× |"), out  # itself, every round
    assert all(row.count("|") == 6 for row in rows.values()), out
    result = script("interleaved_models.py", "--impls", "reference", "--against", "cpu")
    assert result.returncode == 2 and "must be one of --impls" in result.stderr


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


def test_gate_floor_counts_the_backward_gradients():
    """The gates' floor bytes: forward, inputs read and the output written; forward + backward,
    the backward also reads the inputs and grad_y and writes one gradient per input."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        from bench_attention_gates import op_bytes
    finally:
        sys.path.remove(str(BENCH))
    a, b = torch.empty(2, 3, 4, 4), torch.empty(2, 3, 2, 2)  # 96 and 24 values
    assert op_bytes([a, b, True], 96, "forward") == (96 + 24 + 96) * 4
    assert op_bytes([a, b, True], 96, "forward+backward") == (3 * (96 + 24) + 2 * 96) * 4


def test_summary_shows_each_kind_of_peak_memory_in_its_own_column(tmp_path):
    """bench/summary.py: ratios to the eager and compiled references, the floor's share, and
    peak memory under the header of how it was measured (the gates' profiler bytes held, the
    other benchmarks' fresh-process RSS), '–' where a case has none."""
    def case(op, impl, median, **peak):
        return {"stats": {"median": median},
                "extra_info": {"op": op, "impl": impl, "mode": "forward", "shape": [1, 2, 3, 4],
                               "bytes": 22e6, "flops": 0, **peak}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}},
                                "benchmarks": [
        case("gate", "reference", 0.004, peak_bytes=3 * 2**20),
        case("gate", "reference-compiled", 0.002, peak_bytes=2**20),
        case("gate", "cpu", 0.001, peak_bytes=2**19),
        case("conv", "reference", 0.002, peak_mb=12.5),
        case("conv", "reference-compiled", 0.002),
        case("conv", "cpu", 0.004, peak_mb=7.25)]}))
    out = run("summary.py", str(path))
    assert "Test CPU, 2 logical cores" in out
    lines = {tuple(c.strip() for c in line.split("|")[1:-1]) for line in out.splitlines()
             if line.startswith("| gate") or line.startswith("| conv")}
    assert ("gate", "1×2×3×4", "forward", "cpu", "1.00", "4.00×", "2.00×", "100%", "0.5", "–") in lines
    assert ("gate", "1×2×3×4", "forward", "reference", "4.00", "1.00×", "0.50×", "25%", "3.0",
            "–") in lines
    assert ("conv", "1×2×3×4", "forward", "cpu", "4.00", "0.50×", "0.50×", "25%", "–", "7.2") in lines
    assert ("conv", "1×2×3×4", "forward", "reference-compiled", "2.00", "1.00×", "1.00×", "50%", "–",
            "–") in lines
    header = next(line for line in out.splitlines() if line.startswith("| op |"))
    assert header.endswith("| % of floor | peak MiB held | peak MB RSS |")


def test_interleaved_gates():
    out = run("interleaved_gates.py", "--cases", "cross_gate-8x128x32x32", "spatial_gate-8x512",
              "--rounds", "2", "--impls", "reference", "cpu")
    stages = out.split("Per op")[0]
    rows = [line for line in stages.splitlines() if line.startswith(("| cross_gate |",
                                                                     "| spatial_gate |"))]
    assert len(rows) == 2 and all(row.count("|") == 6 for row in rows), out


def test_interleaved_gates_floor_and_the_time_the_targets_allow():
    out = run("interleaved_gates.py", "--cases", "cross_gate-8x128x32x32", "--rounds", "2")
    row = next(line for line in out.splitlines() if line.startswith("| cross_gate |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    reference, compiled = (float(c.split()[0]) for c in cells[3:5])
    # a and b [8, 128, 32, 32] (4 MiB each), the output 4 MiB: 3 × 8 + 2 × 4 MiB at 22 GB/s
    floor = (3 * 2 ** 23 + 2 * 2 ** 22) / 22e9 * 1e3
    assert cells[5] == f"{floor:.2f}", row
    allowed = min(reference / 3, compiled / 1.5)
    assert abs(float(cells[6].split()[0]) - allowed) <= 0.011, row
    assert abs(float(cells[6].split("(")[1].rstrip("×)")) - allowed / floor) <= 0.011, row


def test_interleaved_gates_sums_each_op_over_its_stages():
    out = run("interleaved_gates.py", "--cases", "cross_gate-8x128", "spatial_gate-8x512",
              "--rounds", "2", "--impls", "reference", "cpu")
    lines = out.splitlines()
    split = next(i for i, line in enumerate(lines) if line.startswith("Per op"))
    stages = [line.split("|")[1:-1] for line in lines[:split] if line.startswith("| cross_gate |")]
    totals = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in lines[split:]
              if line.startswith(("| cross_gate |", "| spatial_gate |"))}
    assert len(stages) == 2 and set(totals) == {"cross_gate", "spatial_gate"}, out
    stage_count, cpu, reference = totals["cross_gate"]
    assert int(stage_count) == 2
    # each total is the sum of its stages' medians (each printed to 0.01 ms: 3 roundings)
    assert abs(float(cpu) - sum(float(s[2]) for s in stages)) <= 0.016, out
    assert abs(float(reference.split()[0]) - sum(float(s[3].split()[0]) for s in stages)) <= 0.016
    ratio = float(reference.split("(")[1].rstrip("×) "))
    expected = float(reference.split()[0]) / float(cpu)
    assert abs(ratio - expected) <= 0.006 + 0.02 * expected, out


def test_interleaved_gates_rejects_an_unknown_case():
    result = script("interleaved_gates.py", "--cases", "no_such_gate")
    assert result.returncode == 2 and "no case starts with" in result.stderr


def test_gpu_ops_checks_times_and_renders_on_the_cpu_backend(tmp_path):
    """bench/gpu_ops.py (the GPU session's tables) on the cpu backend: every implementation is
    checked against the float64 reference, timed, and the tables render again from its JSON."""
    log = tmp_path / "rows.json"
    out = run("gpu_ops.py", "--device", "cpu", "--max-cases", "1", "--families", "dynamic_conv2d",
              "models", "--model-batch", "1", "--model-size", "32", "--json", str(log))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert {(r["family"], r["impl"], r["mode"]) for r in rows} == {
        (f, i, m) for f, impls in (("dynamic_conv2d", ("reference", "static-conv", "cpu")),
                                   ("models", ("reference", "cpu")))
        for i in impls for m in ("forward", "forward+backward")}, rows
    assert all("failed" not in r and r["ms"] > 0 for r in rows), rows
    assert all(r["error"] < 1e-4 for r in rows if r["impl"] != "static-conv" and
               (r["family"], r["mode"]) != ("models", "forward+backward")), rows
    # a model's float32 gradients: the train-mode BatchNorms of the coarsest stages amplify
    # rounding, but not past 5 %
    assert all(r["error"] < 5e-2 for r in rows if "error" in r), rows
    table = [line for line in out.splitlines() if line.startswith("| 8x16x128x128 | forward |")]
    assert len(table) == 1 and table[0].count("|") == 10, out
    rendered = run("gpu_ops.py", "--render", str(log))
    assert table[0] in rendered, rendered


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_ops_without_a_gpu_says_so():
    result = script("gpu_ops.py")
    assert result.returncode == 2 and "needs a CUDA device" in result.stderr
