"""Peak memory of one benchmark call, measured honestly: in a fresh process.

A benchmark script defines ``run_once(impl, shape)`` (build the inputs; with ``impl`` None, only
that) and ends with ``if __name__ == "__main__": peak_memory.child_main(run_once)``. Then
:func:`peak_mb` runs the script in a subprocess per implementation: the child warms every
implementation up at a tiny shape (so loading libraries, JIT kernels and thread pools counts for
none of them), builds the inputs, resets its peak resident set size (``VmHWM``) and runs one
call; the result is that peak minus the peak of a child that only builds the inputs.
"""
import json
import subprocess
import sys

_baselines = {}


def reset_high_water() -> None:
    """Reset ``VmHWM`` to the current resident set size (Linux ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def high_water_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def peak_mb(script: str, impl: str, shape) -> float:
    """Extra peak memory (MB) of one call of ``impl`` at ``shape``, run by ``script``'s child."""
    def child(name):
        out = subprocess.run([sys.executable, script, "--peak", json.dumps([name, list(shape)])],
                             capture_output=True, text=True, check=True, timeout=900)
        return int(out.stdout.split()[-1]) / 1024  # KiB
    key = (script, tuple(shape))
    if key not in _baselines:
        _baselines[key] = child(None)
    return child(impl) - _baselines[key]


def child_main(run_once) -> None:
    """The child side: ``script --peak '[impl, shape]'`` prints the peak RSS in KiB."""
    if sys.argv[1:2] == ["--peak"]:
        name, shape = json.loads(sys.argv[2])
        run_once(name, tuple(shape))
        print(high_water_kib())
