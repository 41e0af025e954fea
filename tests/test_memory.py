"""fastseg.memory: freed tensor memory is reused instead of faulting in afresh; the command line
applies it unless FASTSEG_RETAIN_FREED_MEMORY=0."""
import platform
import subprocess
import sys

import pytest

from fastseg import cli, memory

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")

# Page faults per step of a small training loop whose tensors (32 MB each) sit at glibc's largest
# mmap threshold, in a fresh process (the setting is process-wide). By default every step maps
# them afresh and faults ≈ 82,000 pages of 4 KiB in again; with freed memory retained the heap
# settles within a few steps (it needs some: PyTorch's 64-byte-aligned requests do not fit an
# exactly-sized freed chunk until freed neighbours have merged) and the last steps fault nothing.
_CHILD = """
import resource, sys, torch
import fastseg
applied = fastseg.retain_freed_memory() if sys.argv[1] == "1" else False
torch.manual_seed(0)
conv = torch.nn.Conv2d(8, 8, 3, padding=1)
x = torch.randn(1, 8, 1024, 1024)
faults = []
for step in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.relu(conv(x))
    (y * y).sum().backward()
    del y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(applied), min(faults[-2:]))
"""


def _faults(retain: bool) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, "1" if retain else "0"], check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    return out[0] == "1", int(out[1])


@glibc
def test_freed_memory_is_reused():
    applied, faults = _faults(True)
    assert applied
    assert faults < 1000, faults
    # the default allocator maps the step's tensors afresh: what the setting removes
    applied, faults = _faults(False)
    assert not applied
    assert faults > 40000, faults


def test_environment_switch(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "retain_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv(memory.ENV, raising=False)
    assert memory.retain_freed_memory_from_environment(default=True) and len(calls) == 1
    assert not memory.retain_freed_memory_from_environment(default=False) and len(calls) == 1
    monkeypatch.setenv(memory.ENV, "1")
    assert memory.retain_freed_memory_from_environment(default=False) and len(calls) == 2
    monkeypatch.setenv(memory.ENV, "0")
    assert not memory.retain_freed_memory_from_environment(default=True) and len(calls) == 2
    monkeypatch.setenv(memory.ENV, "yes")
    with pytest.raises(ValueError, match=memory.ENV):
        memory.retain_freed_memory_from_environment(default=True)


def test_command_line_applies_it(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(memory, "retain_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv(memory.ENV, raising=False)
    missing = str(tmp_path / "missing.pt")
    argv = ["evaluate", "--checkpoint", missing, "--data", str(tmp_path)]
    with pytest.raises(SystemExit):  # the checkpoint does not exist; the setting came first
        cli.main(argv)
    assert calls == [1]
    monkeypatch.setenv(memory.ENV, "0")
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert calls == [1]
    monkeypatch.setenv(memory.ENV, "2")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", "--checkpoint", missing, "--input", str(tmp_path), "--output",
                  str(tmp_path / "out")])
    assert exit_.value.code == 2 and calls == [1]
    assert "fastseg predict: error: FASTSEG_RETAIN_FREED_MEMORY must be 0 or 1" in capsys.readouterr().err
