"""The static GPU check (``python -m fastseg gpu-report``): what it records, parses and computes.

Compiling for real targets needs a process without the Triton interpreter, so the compiles
themselves run in CI as ``make gpu-check`` (see .ci/run); these tests cover the parts that decide
what is compiled and how its figures are read.
"""
from pathlib import Path

import pytest
import torch

from fastseg import gpu_report
from fastseg.backend import unavailable_reason

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size, 4096 bytes smem
ptxas info    : Compile time = 1.0 ms
ptxas info    : Compiling entry function 'bar_kernel' for 'sm_90'
ptxas info    : Function properties for bar_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""


def test_parse_ptxas():
    figures = gpu_report.parse_ptxas(PTXAS_LOG)
    assert figures == {"_Z3fooPf": {"registers": 255, "spill_bytes": 20, "shared": 4096},
                       "bar_kernel": {"registers": 40, "spill_bytes": 0, "shared": 0}}


@pytest.mark.parametrize("registers,warps,shared,expected", [
    (32, 4, 0, 1.0),        # 16 blocks of 4 warps fill the 64 warp slots
    (128, 4, 0, 0.25),      # 4096 registers a warp: 16 warps
    (255, 4, 0, 0.125),     # rounded up to 256 a thread: 8 warps
    (40, 8, 0, 0.75),       # 1280 a warp → 51 warps → 6 blocks of 8
    (32, 4, 48 * 1024, 0.25),  # shared memory: 4 blocks of 49 KiB in sm_90's 228 KiB
])
def test_occupancy(registers, warps, shared, expected):
    assert gpu_report.occupancy(90, registers, warps, shared) == pytest.approx(expected)


def test_row_problems():
    row = gpu_report.Row("op", "k", "", "float32", 90, ["case"], warps=4, registers=129)
    assert row.problems == ["129 > 128 registers"]
    row.registers, row.spill_bytes = 64, 8
    assert row.problems == ["spills 8 B"]
    row.spill_bytes = 0
    assert row.problems == [] and row.occupancy == pytest.approx(0.5)  # 8 blocks of 4 warps
    row.error = "CompilationError: K >= 16"
    assert row.problems == ["compile error"] and row.occupancy is None
    unused = gpu_report.Row("op", "k", "", "", 90, [], registers=200, spill_bytes=8, checked=False)
    assert unused.problems == []


def test_float64_needs_only_compile():
    """float64 (the tests' gradchecks) fails on a compile error only; its spills are reported."""
    row = gpu_report.Row("op", "k", "cfg", "float64", 90, ["case"], warps=4, registers=172,
                         spill_bytes=76)
    assert row.problems == [] and row.findings == ["spills 76 B", "172 > 128 registers"]
    table = gpu_report.markdown_table([row], "triton")
    assert "| spills 76 B; 172 > 128 registers (float64: compiles; not checked) |" in table
    row.error = "CompilationError: out_dtype"
    assert row.problems == ["compile error"]
    assert "| FAILED: CompilationError: out_dtype |" in gpu_report.markdown_table([row], "triton")


def test_cuda_names_and_launch_bounds():
    name = ("void fastseg::mdc::cuda::(anonymous namespace)::conv_kernel<7, __half>("
            "fastseg::mdc::cuda::GroupShape, fastseg::mdc::cuda::Tiling, __half const*)")
    assert gpu_report._cuda_kernel_text(name) == ("conv_kernel", "<7, __half>")
    assert gpu_report._mixed_depthwise_conv_instance(name, "__half")
    assert not gpu_report._mixed_depthwise_conv_instance(name, "float")
    assert not gpu_report._mixed_depthwise_conv_instance(name.replace("<7,", "<11,"), "__half")
    attention = ("void fastseg::attn::cuda::(anonymous namespace)::grad_k_kernel<__nv_bfloat16>("
                 "fastseg::attn::cuda::(anonymous namespace)::PassArgs<__nv_bfloat16>)")
    assert gpu_report._cuda_kernel_text(attention) == ("grad_k_kernel", "<__nv_bfloat16>")
    assert gpu_report._dilated_attention_instance(attention, "__nv_bfloat16")
    assert not gpu_report._dilated_attention_instance(attention, "__half")
    # float64 instances serve the tests only: reported, not held to the models' bound.
    assert not gpu_report._dilated_attention_instance(
        attention.replace("__nv_bfloat16", "double"), "double")
    ptx = (".visible .entry _Z1ai(\n\t.param .u32 p\n)\n.maxntid 256, 1, 1\n{\n}\n"
           ".visible .entry _Z1bi(\n\t.param .u32 p\n)\n{\n}\n")
    assert gpu_report._launch_bounds(ptx) == {"_Z1ai": 256}


def test_every_kernel_module_has_a_family():
    """A new op family's Triton module must be added to the report, or it is never compiled."""
    modules = {p.stem for p in (Path(gpu_report.ROOT) / "kernels").glob("*.py")
               if not p.stem.startswith("_")}
    cuda = {p.stem for p in (Path(gpu_report.ROOT) / "csrc" / "cuda").glob("*.cu")}
    covered = {Path(f.cuda_source).stem for f in gpu_report.FAMILIES.values()}
    assert modules <= covered and cuda <= covered, (modules | cuda) - covered


def test_recorded_launches_are_the_launchers_choice():
    """On meta tensors the launchers record, not run, and pick launch_config's tiles."""
    if unavailable_reason("triton", "cpu"):
        pytest.skip(unavailable_reason("triton", "cpu"))
    from fastseg.kernels import mixed_depthwise_conv as kernels
    from fastseg.kernels._launch import record_launches

    x = torch.empty(8, 16, 256, 256, device="meta")
    weights = [torch.empty(4, 1, k, k, device="meta") for k in (3, 5, 7, 9)]
    with record_launches() as launches:
        y = kernels.forward(x, weights, torch.empty(16, device="meta"), True)
    assert y.device.type == "meta" and len(launches) == 4
    for launch, k in zip(launches, (3, 5, 7, 9)):
        block_h, block_w, warps = kernels.launch_config(256, 256, k)
        assert launch.constexprs["K"] == k and launch.num_warps == warps
        assert (launch.constexprs["BLOCK_H"], launch.constexprs["BLOCK_W"]) == (block_h, block_w)
        assert launch.grid == (8 * 4, 256 // block_h, 256 // block_w)
    with record_launches() as launches:
        kernels.backward(x, x, weights, True)
    assert [launch.kernel.fn.__name__ for launch in launches] == \
        ["_depthwise_conv_kernel"] * 4 + ["_depthwise_conv_grad_params_kernel"] * 4


def test_every_family_records_launches_for_the_models():
    if unavailable_reason("triton", "cpu"):
        pytest.skip(unavailable_reason("triton", "cpu"))
    from fastseg.kernels._launch import record_launches

    for family in gpu_report.FAMILIES.values():
        cases = list(family.cases(torch.float16))
        assert cases, family.name
        for label, call in cases:
            with record_launches() as launches:
                call()
            assert launches, f"{family.name} {label}: no launch recorded"


def test_report_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET=1"):
        gpu_report.run_report()


@pytest.mark.slow
def test_command_compiles_for_sm80_without_the_interpreter():
    """End to end through the command line, from a process under the interpreter (as pytest is
    here): it restarts itself without it, compiles for sm_80 (CI's gpu-check covers sm_90), and
    exits 0 only when every configuration passes."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "fastseg", "gpu-report", "--ops",
                          "mixed_depthwise_conv2d", "--arch", "80", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=900, env=env, cwd=gpu_report.ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| mixed_depthwise_conv2d | _depthwise_conv_kernel |" in out.stdout
    assert "| mixed_depthwise_conv2d | conv_kernel | <9, float>" in out.stdout
    assert "all compile, no spills" in out.stdout
