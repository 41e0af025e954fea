"""Static GPU profile: compile every fused kernel for real GPUs, without a GPU, and report what
decides its speed there (registers, spills, shared memory, theoretical occupancy).

    python -m fastseg gpu-report [--arch 80 90] [--dtype float32 float16 bfloat16 float64]
                                 [--ops ...] [--no-cuda]

Triton kernels: each op family's launchers run on ``meta`` tensors of the two models' real shapes
inside :func:`fastseg.kernels._launch.record_launches`, so the block sizes, ``num_warps`` and
argument specialisations are exactly the ones a GPU run would compile. Each distinct launch is
compiled ahead of time for an explicit target (``triton.compile`` with a ``GPUTarget``; no driver is
needed) and its PTX is assembled by the ``ptxas`` that ships with Triton, whose ``-v`` output gives
registers and spill bytes. CUDA C++ kernels: each ``csrc/cuda/*.cu`` is compiled with nvcc
``-Xptxas -v`` for each architecture; the template instances the models use are the checked ones.

A launch fails the check when it does not compile, spills, or needs more registers per thread than
its family allows (128 by default: with 4 warps per block that keeps ≥ 25 % of an SM's warp slots).
By default every element type a run can use is compiled: the models' float32, float16 and bfloat16
(autocast) are checked as above; float64 (the tests' gradchecks and model comparisons, no model
trains in it) needs only compile: its values take two registers each, and its spills are reported,
not failed.

The Triton interpreter used by the tests accepts code the compiler rejects, so only this check
proves that a Triton kernel compiles.

Must run in a process without ``TRITON_INTERPRET=1`` (under the interpreter, kernels are not
compilable ``JITFunction``\\ s); the command line removes it from the environment and re-executes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]

# Per SM, identical for sm_80 and sm_90: 64K 32-bit registers, at most 64 resident warps and 32
# blocks; registers are allocated per warp in units of 256. Shared memory per SM differs.
_REGISTERS_PER_SM = 65536
_MAX_WARPS_PER_SM = 64
_MAX_BLOCKS_PER_SM = 32
_SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
_SHARED_RESERVED_PER_BLOCK = 1024


def occupancy(arch: int, registers: int, warps: int, shared: int) -> float:
    """Theoretical occupancy (resident warps / 64) of a kernel on an SM of ``arch``."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = min(_MAX_BLOCKS_PER_SM, _MAX_WARPS_PER_SM // warps,
                 _REGISTERS_PER_SM // (regs_per_warp * warps))
    if shared:
        blocks = min(blocks, _SHARED_PER_SM[arch] // (shared + _SHARED_RESERVED_PER_BLOCK))
    return blocks * warps / _MAX_WARPS_PER_SM


# --- what each op family launches at the models' shapes -----------------------------------------

@dataclasses.dataclass(frozen=True)
class Family:
    """An op family's kernels as the models use them.

    ``cases(dtype)`` yields ``(label, call)``: ``call()`` runs the family's Triton launchers
    (forward and backward) on ``meta`` tensors of one model shape. ``cuda_source`` is the family's
    CUDA file; ``cuda_model_instance`` matches the demangled names of the template instances the
    models use for a dtype (``cuda_type`` below). ``max_registers`` is the family's per-thread bound.
    """
    name: str
    cases: Callable[[torch.dtype], Iterable[tuple[str, Callable[[], object]]]]
    cuda_source: str
    cuda_model_instance: Callable[[str, str], bool]
    max_registers: int = 128


CUDA_TYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16",
              torch.float64: "double"}

# What a report compiles by default: the models' element types and the tests' float64.
DTYPES = ("float32", "float16", "bfloat16", "float64")

# The models run at batch 8 on 128² and 256² inputs.
BATCH = 8
INPUT_SIZES = (128, 256)


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _mixed_depthwise_conv_cases(dtype):
    from fastseg.kernels import mixed_depthwise_conv as kernels

    kernel_sizes = (3, 5, 7, 9)
    # LGMSNet's LMS blocks: C=16 at 1/1 and 1/2, C=32 at 1/4, four equal groups.
    for size in INPUT_SIZES:
        for channels, scale in ((16, 1), (16, 2), (32, 4)):
            hw = size // scale
            x = _meta(BATCH, channels, hw, hw, dtype=dtype)
            weights = [_meta(channels // 4, 1, k, k, dtype=dtype) for k in kernel_sizes]
            bias = _meta(channels, dtype=dtype)
            label = f"{BATCH}x{channels}x{hw}x{hw}"
            # The LMS block adds its input before the norm: bias and fused residual.
            yield label + " fwd", lambda x=x, w=weights, b=bias: kernels.forward(x, w, b, True)
            yield label + " bwd", lambda x=x, w=weights: kernels.backward(x, x, w, True)


def _mixed_depthwise_conv_instance(name: str, cuda_type: str) -> bool:
    return re.search(rf"<(3|5|7|9), {re.escape(cuda_type)}>", name) is not None


# LightAWNet's dynamic convs (k = 3, K = 4 experts, padding 1, no bias): (C_in, C_out, scale),
# the encoder blocks, the decoder stages and the head.
LIGHTAWNET_DYNAMIC_CONVS = ((1, 16, 1), (16, 32, 2), (32, 64, 4), (64, 128, 8), (128, 256, 16),
                            (128, 128, 8), (64, 64, 4), (32, 32, 2), (16, 16, 1), (16, 1, 1))


def _dynamic_conv_cases(dtype):
    from fastseg.kernels import dynamic_conv as kernels

    for size in INPUT_SIZES:
        for c_in, c_out, scale in LIGHTAWNET_DYNAMIC_CONVS:
            hw = size // scale
            x = _meta(BATCH, c_in, hw, hw, dtype=dtype)
            experts = _meta(4, c_out, c_in, 3, 3, dtype=dtype)
            routing = _meta(BATCH, 4, dtype=dtype)
            label = f"{BATCH}x{c_in}x{hw}x{hw}→{c_out}"
            conv = ((1, 1), (1, 1), (1, 1), 1)
            yield label + " fwd", lambda x=x, e=experts, r=routing: kernels.forward(x, e, r, None, *conv)
            yield label + " bwd", lambda x=x, e=experts, r=routing, c_out=c_out: kernels.backward(
                _meta(x.shape[0], c_out, *x.shape[2:], dtype=x.dtype), x, e, r, None, *conv)


# (tokens per side, heads, d_qk, d_v, dilation) of the models' attention at 128² and 256² inputs:
# LGMSNet's GMS transformers (4 heads × 8, parity groups) at 1/4, 1/8 and 1/16; LightAWNet's
# bottleneck self-attention (one head, q/k of C/8 = 32, v of C = 256, full attention) at 1/16.
def _model_attention_shapes():
    for size in INPUT_SIZES:
        for scale in (4, 8, 16):
            yield size // scale, 4, 8, 8, 2
        yield size // 16, 1, 32, 256, 1


def _dilated_attention_cases(dtype):
    from fastseg.kernels import dilated_attention as kernels

    for side, heads, d_qk, d_v, dilation in sorted(set(_model_attention_shapes())):
        q = _meta(BATCH, side, side, heads, d_qk, dtype=dtype)
        v = _meta(BATCH, side, side, heads, d_v, dtype=dtype)
        lse = _meta(BATCH, side, side, heads, dtype=torch.float32)
        label = f"{BATCH}x{side}x{side}x{heads}x{d_qk}/{d_v} s={dilation}"
        yield label + " fwd", lambda q=q, v=v, s=dilation: kernels.forward(q, q, v, s, 1.0)
        yield label + " bwd", lambda q=q, v=v, lse=lse, s=dilation: kernels.backward(
            v, q, q, v, v, lse, s, 1.0)


def _template_instance_of(name: str, cuda_type: str) -> bool:
    return re.search(rf"<[^()]*\b{re.escape(cuda_type)}\b[^()]*>", name) is not None


def _dilated_attention_instance(name: str, cuda_type: str) -> bool:
    # The models run float, half and bfloat16; the float64 instances serve the tests' gradchecks.
    return cuda_type != "double" and _template_instance_of(name, cuda_type)
# LightAWNet's gates. Encoder blocks Block(C_in) at 1/scale: gated_pointwise on a = 4·C_in
# channels → C_in (spatial_gate, not in LightAWNet, is checked on the same a). Decoder stages
# De(→ C) at 1/scale: upsample ×2 → SE (C/8 hidden) → + skip (an Attention U-Net gate, not in
# LightAWNet either, is checked at the same skip with C_i = C/2). The two-branch cross gates:
# (C, a's scale, b's scale).
LIGHTAWNET_BLOCKS = ((1, 1), (16, 2), (32, 4), (64, 8), (128, 16))
LIGHTAWNET_DECODER = ((128, 16), (64, 8), (32, 4), (16, 2))
LIGHTAWNET_CROSS_GATES = ((128, 16, 8), (128, 8, 8), (256, 16, 8), (256, 8, 16))


def _attention_gates_cases(dtype):
    from fastseg.kernels import attention_gates as kernels

    def m(*shape):
        return _meta(*shape, dtype=dtype)

    for size in INPUT_SIZES:
        for c_in, scale in LIGHTAWNET_BLOCKS:
            hw = size // scale
            a, w_s, b_s, w, bias = m(BATCH, 4 * c_in, hw, hw), m(1, 4 * c_in), m(1), m(c_in, 4 * c_in), m(c_in)
            label = f"{BATCH}x{4 * c_in}x{hw}x{hw}"
            yield label + "→" + str(c_in) + " gated_pointwise fwd", \
                lambda a=a, w_s=w_s, b_s=b_s, w=w, bias=bias: kernels.gated_pointwise_forward(
                    a, w_s, b_s, w, w, bias)
            yield label + "→" + str(c_in) + " gated_pointwise bwd", \
                lambda a=a, w_s=w_s, b_s=b_s, w=w: kernels.gated_pointwise_backward(
                    m(BATCH, w.shape[0], *a.shape[2:]), a, w_s, b_s, w, w)
            yield label + " spatial_gate fwd", lambda a=a, w_s=w_s, b_s=b_s: kernels.spatial_gate_forward(a, w_s, b_s)
            yield label + " spatial_gate bwd", lambda a=a, w_s=w_s, b_s=b_s: kernels.spatial_gate_backward(a, a, w_s, b_s)
        for c, scale in LIGHTAWNET_DECODER:
            hw = size // scale
            x, skip, w1, w2 = m(BATCH, c, hw, hw), m(BATCH, c, 2 * hw, 2 * hw), m(c // 8, c), m(c, c // 8)
            label = f"{BATCH}x{c}x{hw}x{hw}→{2 * hw}"
            yield label + " channel_gate fwd", \
                lambda x=x, skip=skip, w1=w1, w2=w2: kernels.channel_gate_forward(x, w1, w2, skip, True)
            yield label + " channel_gate bwd", \
                lambda x=x, skip=skip, w1=w1, w2=w2: kernels.channel_gate_backward(skip, x, w1, w2, True)
            ag = (skip, skip, m(c // 2, c), m(c // 2, c), m(c // 2), m(1, c // 2), m(1))
            label = f"{BATCH}x{c}x{2 * hw}x{2 * hw}"
            yield label + " attention_gate fwd", lambda ag=ag: kernels.attention_gate_forward(*ag)
            yield label + " attention_gate bwd", lambda ag=ag: kernels.attention_gate_backward(ag[0], *ag)
        for c, a_scale, b_scale in LIGHTAWNET_CROSS_GATES:
            a, b = m(BATCH, c, size // a_scale, size // a_scale), m(BATCH, c, size // b_scale, size // b_scale)
            label = f"{BATCH}x{c}x{a.shape[2]}² gated by {b.shape[2]}²"
            yield label + " cross_gate fwd", lambda a=a, b=b: kernels.cross_gate_forward(a, b, True)
            yield label + " cross_gate bwd", lambda a=a, b=b: kernels.cross_gate_backward(a, a, b, True)


FAMILIES: dict[str, Family] = {
    "mixed_depthwise_conv2d": Family("mixed_depthwise_conv2d", _mixed_depthwise_conv_cases,
                                     "csrc/cuda/mixed_depthwise_conv.cu",
                                     _mixed_depthwise_conv_instance),
    "dynamic_conv2d": Family("dynamic_conv2d", _dynamic_conv_cases, "csrc/cuda/dynamic_conv.cu",
                             _template_instance_of),
    "dilated_attention2d": Family("dilated_attention2d", _dilated_attention_cases,
                                  "csrc/cuda/dilated_attention.cu", _dilated_attention_instance),
    "attention_gates": Family("attention_gates", _attention_gates_cases,
                              "csrc/cuda/attention_gates.cu", _template_instance_of),
}


# --- Triton -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    """One compiled kernel configuration and what ptxas says of it."""
    family: str
    kernel: str
    config: str
    dtype: str
    arch: int
    cases: list[str]
    warps: int = 0
    registers: int = 0
    spill_bytes: int = 0
    shared: int = 0
    error: str = ""
    checked: bool = True  # False: a CUDA instance the models do not use (reported only)
    max_registers: int = 128

    @property
    def occupancy(self) -> Optional[float]:
        if self.error or not self.warps:
            return None
        return occupancy(self.arch, self.registers, self.warps, self.shared)

    @property
    def findings(self) -> list[str]:
        """Spills and registers past the bound, whatever the dtype."""
        found = []
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} B")
        if self.registers > self.max_registers:
            found.append(f"{self.registers} > {self.max_registers} registers")
        return found

    @property
    def problems(self) -> list[str]:
        """What fails the check: a compile error, or (except in float64) the findings."""
        if not self.checked:
            return []
        if self.error:
            return ["compile error"]
        return [] if self.dtype == "float64" else self.findings


_PTXAS_FUNCTION = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SHARED = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict]:
    """``{mangled function: {"registers", "spill_bytes", "shared"}}`` from ``ptxas -v`` output."""
    result: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if m := _PTXAS_FUNCTION.search(line):
            current = result.setdefault(m.group(1), {"registers": 0, "spill_bytes": 0, "shared": 0})
        elif current is not None:
            if m := _PTXAS_SPILLS.search(line):
                current["spill_bytes"] = int(m.group(1)) + int(m.group(2))
            if m := _PTXAS_REGISTERS.search(line):
                current["registers"] = int(m.group(1))
            if m := _PTXAS_SHARED.search(line):
                current["shared"] = int(m.group(1))
    return result


def _record(family: Family, dtype: torch.dtype):
    """Distinct launches of ``family`` at the models' shapes: ``{key: (launch, [case labels])}``."""
    from fastseg.kernels._launch import record_launches

    distinct: dict = {}
    for label, call in family.cases(dtype):
        with record_launches() as launches:
            call()
        for launch in launches:
            key = _launch_key(launch)
            distinct.setdefault(key, (launch, []))[1].append(label)
    return distinct


def _specialize(launch, backend):
    """What ``kernel[grid](...)`` would compile for ``launch``: options, signature, constants,
    attributes (Triton's own binder, so ints equal to 1 and 16-divisible values specialise as on a
    GPU; meta tensors have data pointer 0, i.e. aligned like fresh allocations)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps, debug=False,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def _launch_key(launch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    options, signature, constexprs, attrs = _specialize(launch, make_backend(GPUTarget("cuda", 90, 32)))
    return (launch.kernel.fn.__qualname__, launch.num_warps, tuple(signature.items()),
            tuple(sorted((k, str(v)) for k, v in constexprs.items())),
            tuple(sorted((k, str(v)) for k, v in attrs.items())))


def _ptxas() -> str:
    from triton import knobs

    return knobs.nvidia.ptxas.path


def compile_triton(launch, arch: int) -> dict:
    """Compile one recorded launch for ``sm_<arch>``; return ptxas's figures (or an error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    try:
        options, signature, constexprs, attrs = _specialize(launch, make_backend(target))
        with contextlib.redirect_stdout(io.StringIO()):  # Triton prints failing PTX in full
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                                      target=target, options=options.__dict__)
        ptx = compiled.asm["ptx"]
        gpu_name = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            # The flags Triton's own cubin step passes to ptxas.
            out = subprocess.run([_ptxas(), "-v", "-lineinfo", "--regAllocOptLevel=2",
                                  f"--gpu-name={gpu_name}", path, "-o", os.path.join(tmp, "k.o")],
                                 capture_output=True, text=True, check=True)
        (figures,) = parse_ptxas(out.stderr + out.stdout).values()
        return dict(figures, warps=compiled.metadata.num_warps, shared=max(
            figures["shared"], compiled.metadata.shared))
    except Exception as exc:  # noqa: BLE001 - every failure is reported as that config's result
        message = str(exc).strip().splitlines()
        return {"error": f"{type(exc).__name__}: {message[0] if message else ''}"[:300]}


def _config_text(launch) -> str:
    """Compile-time constants (flags named when set), warps, and the integer arguments Triton specialised (``=1``: compiled in as
    the constant 1; ``÷16``: known divisible by 16), which can change the generated code."""
    shown = [k if v is True else f"{k}={v}" for k, v in launch.constexprs.items()
             if v is not False and not k.endswith("DTYPE")]
    text = " ".join(shown) + f" warps={launch.num_warps}"
    ints = [(p.name, a) for p, a in zip(launch.kernel.params, launch.args)
            if not p.is_constexpr and isinstance(a, int) and not isinstance(a, bool)]
    ones = [name for name, a in ints if a == 1]
    div16 = [name for name, a in ints if a != 1 and a % 16 == 0]
    return text + "".join(f" {tag}:{','.join(names)}" for tag, names in (("=1", ones), ("÷16", div16))
                          if names)


def triton_rows(families: Iterable[Family], dtypes, archs, jobs: int = 1,
                progress: Callable[[str], None] = lambda s: None) -> list[Row]:
    """Compile every distinct Triton launch of ``families`` for each dtype and architecture."""
    todo = []
    for family in families:
        for dtype in dtypes:
            for launch, cases in _record(family, dtype).values():
                for arch in archs:
                    todo.append((Row(family.name, launch.kernel.fn.__name__, _config_text(launch),
                                     str(dtype).removeprefix("torch."), arch, cases,
                                     max_registers=family.max_registers), launch))
    progress(f"compiling {len(todo)} Triton kernel configurations")
    global _TODO
    _TODO = todo
    if jobs > 1 and len(todo) > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = pool.map(_compile_todo, range(len(todo)))
    else:
        results = [_compile_todo(i) for i in range(len(todo))]
    rows = []
    for (row, _), figures in zip(todo, results):
        for name, value in figures.items():
            setattr(row, name, value)
        rows.append(row)
    return rows


_TODO: list = []


def _compile_todo(index: int) -> dict:
    row, launch = _TODO[index]
    return compile_triton(launch, row.arch)


# --- CUDA C++ -----------------------------------------------------------------------------------

def _nvcc() -> Optional[str]:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(cuda_home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else shutil.which("nvcc")


def _nvcc_flags() -> list[str]:
    """The flags setup.py's build passes to nvcc for device code (torch's common flags included)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return ["-O3", "-std=c++20", f"-I{ROOT / 'csrc'}", *COMMON_NVCC_FLAGS]


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


_CUDA_KERNEL = re.compile(r"(\w+)(<[^()]*>)?\(")
_PTX_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\((.*?)\)\s*(\.maxntid\s+(\d+),\s*(\d+),\s*(\d+))?",
                        re.S)


def _cuda_kernel_text(demangled: str) -> tuple[str, str]:
    """``(kernel name, template arguments)`` from a demangled ``void ns::kernel<args>(params)``."""
    m = _CUDA_KERNEL.search(demangled.removeprefix("void ").replace("(anonymous namespace)", "anon"))
    return (m.group(1), m.group(2) or "") if m else (demangled, "")


def _launch_bounds(ptx: str) -> dict[str, int]:
    """``{mangled entry: threads per block}`` for the entries declared with ``__launch_bounds__``."""
    return {m.group(1): int(m.group(4)) * int(m.group(5)) * int(m.group(6))
            for m in _PTX_ENTRY.finditer(ptx) if m.group(3)}


def cuda_rows(families: Iterable[Family], dtypes, archs, jobs: int = 1,
              progress: Callable[[str], None] = lambda s: None) -> list[Row]:
    """Compile each family's CUDA file for each architecture and read ptxas's figures."""
    nvcc = _nvcc()
    jobs_list = [(family, arch) for family in families for arch in archs
                 if (ROOT / family.cuda_source).exists()]
    if nvcc is None:
        return [Row(f.name, Path(f.cuda_source).name, "", "", a, [], error="nvcc not found")
                for f, a in jobs_list]
    progress(f"compiling {len(jobs_list)} CUDA files (nvcc -Xptxas -v)")
    cuda_types = {CUDA_TYPES[d]: str(d).removeprefix("torch.") for d in dtypes}

    def compile_one(family: Family, arch: int) -> list[Row]:
        with tempfile.TemporaryDirectory() as tmp:
            # -keep leaves the PTX beside the cubin: its .maxntid gives each kernel's launch bound.
            out = subprocess.run([nvcc, *_nvcc_flags(), "-cubin", "-keep", f"-keep-dir={tmp}",
                                  f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
                                  str(ROOT / family.cuda_source), "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
            bounds = {}
            for ptx in Path(tmp).glob("*.ptx"):
                bounds.update(_launch_bounds(ptx.read_text()))
        if out.returncode != 0:
            return [Row(family.name, Path(family.cuda_source).name, "", "", arch, [],
                        error=(out.stderr.strip().splitlines() or ["nvcc failed"])[-1][:300],
                        max_registers=family.max_registers)]
        figures = parse_ptxas(out.stderr + out.stdout)
        rows = []
        for mangled, demangled in zip(figures, _demangle(list(figures))):
            kernel, args = _cuda_kernel_text(demangled)
            dtype = next((d for t, d in cuda_types.items() if family.cuda_model_instance(demangled, t)),
                         None)
            threads = bounds.get(mangled)
            rows.append(Row(family.name, kernel, args + (f" ≤{threads} threads" if threads else ""),
                            dtype or "", arch, ["models"] if dtype else [],
                            warps=-(-threads // 32) if threads else 0,
                            registers=figures[mangled]["registers"],
                            spill_bytes=figures[mangled]["spill_bytes"],
                            shared=figures[mangled]["shared"], checked=dtype is not None,
                            max_registers=family.max_registers))
        return rows

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        results = list(pool.map(lambda fa: compile_one(*fa), jobs_list))
    return [row for rows in results for row in rows]


# --- output -------------------------------------------------------------------------------------

def markdown_table(rows: list[Row], kind: str) -> str:
    """The rows as a Markdown table (``kind``: "triton" or "cuda")."""
    lines = [f"| op | {kind} kernel | config | dtype | sm | registers | spill bytes | shared B "
             "| occupancy | cases | result |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in sorted(rows, key=lambda r: (r.family, r.kernel, r.config, r.dtype, r.arch)):
        occ = r.occupancy
        if r.error:
            result = f"FAILED: {r.error}"
        elif not r.checked:
            result = "not used by the models"
        elif r.problems:
            result = "; ".join(r.problems)
        elif r.findings:
            result = "; ".join(r.findings) + " (float64: compiles; not checked)"
        else:
            result = "ok"
        occ_text = f"{occ:.0%}" if occ is not None else "–"
        lines.append(f"| {r.family} | {r.kernel} | {r.config.replace('|', '/')} | {r.dtype or '–'} "
                     f"| {r.arch} | {r.registers if not r.error else '–'} "
                     f"| {r.spill_bytes if not r.error else '–'} | {r.shared if not r.error else '–'} "
                     f"| {occ_text} | {', '.join(r.cases) or '–'} | {result} |")
    return "\n".join(lines)


def run_report(ops: Optional[list[str]] = None, archs=(80, 90),
               dtypes: Optional[Iterable[str]] = None, cuda: bool = True, jobs: int = 2,
               out=sys.stdout, markdown: Optional[str] = None, cuda_all: bool = False) -> int:
    """Compile, print the tables, return 0 if every checked configuration passes, else 1.
    ``dtypes``: names of element types (default ``DTYPES``)."""
    dtypes = list(dtypes or DTYPES)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("gpu-report must run without TRITON_INTERPRET=1 (kernels compile only "
                           "as JIT functions); `python -m fastseg gpu-report` removes it itself")
    unknown = sorted(set(ops or []) - set(FAMILIES))
    if unknown:
        raise ValueError(f"ops: unknown op families {unknown}; known: {sorted(FAMILIES)}")
    families = [FAMILIES[name] for name in (ops or FAMILIES)]
    torch_dtypes = []
    for name in dtypes:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or dtype not in CUDA_TYPES:
            raise ValueError(f"dtype: expected some of {[str(d)[6:] for d in CUDA_TYPES]}, got {name!r}")
        torch_dtypes.append(dtype)
    progress = lambda s: print(f"gpu-report: {s}", file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    triton = triton_rows(families, torch_dtypes, archs, jobs, progress)
    cuda_table = cuda_rows(families, torch_dtypes, archs, jobs, progress) if cuda else []
    if not cuda_all:
        cuda_table = [r for r in cuda_table if r.checked or r.error]
    text = ("### Triton kernels\n\n" + markdown_table(triton, "triton") + "\n")
    if cuda:
        text += "\n### CUDA kernels\n\n" + markdown_table(cuda_table, "cuda") + "\n"
    failures = [r for r in triton + cuda_table if r.problems]
    unchecked = [r for r in triton + cuda_table if r.checked and not r.problems and r.findings]
    summary = (f"{len(triton)} Triton and {len(cuda_table)} CUDA kernel configurations for sm "
               f"{', '.join(map(str, archs))}, {', '.join(dtypes)}: "
               + (f"{len(failures)} FAILED" if failures else "all compile, no spills, registers "
                  "within bounds" + (f" but for {len(unchecked)} float64 ones (float64 needs only "
                                     "compile)" if unchecked else ""))
               + f" ({time.perf_counter() - start:.0f} s)")
    print(text + "\n" + summary, file=out)
    if markdown:
        Path(markdown).write_text(text + "\n" + summary + "\n")
    for r in failures:
        print(f"FAILED: {r.family} {r.kernel} [{r.config}] {r.dtype} sm_{r.arch}: "
              f"{'; '.join(r.problems)} {r.error}", file=sys.stderr)
    return 1 if failures else 0
