"""setup.py's choice of the CUDA sources: off unless a CUDA device is visible or FASTSEG_CUDA=1
forces them (CI), so a first build on a machine without a GPU does not spend minutes in nvcc."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _cuda_choice(**env) -> str:
    """The line setup.py prints about the CUDA sources (``setup.py --version`` builds nothing)."""
    base = {k: v for k, v in os.environ.items() if k not in ("FASTSEG_CUDA", "FASTSEG_BUILD_EXT")}
    result = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True, text=True,
                            cwd=REPO, env={**base, **env}, timeout=300)
    assert result.returncode == 0, result.stderr
    return next(line for line in result.stderr.splitlines() if line.startswith("fastseg: CUDA sources"))


@pytest.mark.parametrize("env, expected", [
    ({"CUDA_VISIBLE_DEVICES": ""}, "fastseg: CUDA sources OFF ("),
    ({"CUDA_VISIBLE_DEVICES": "", "FASTSEG_CUDA": "1"}, "fastseg: CUDA sources ON (FASTSEG_CUDA=1)"),
    ({"FASTSEG_CUDA": "0"}, "fastseg: CUDA sources OFF (FASTSEG_CUDA=0)"),
])
def test_cuda_sources_need_a_visible_device_or_fastseg_cuda_1(env, expected):
    if env.get("FASTSEG_CUDA") == "1" and torch.version.cuda is None:
        pytest.skip("a CPU build of torch: FASTSEG_CUDA=1 makes setup.py fail, as it should")
    assert _cuda_choice(**env).startswith(expected)
