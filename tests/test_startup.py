"""What importing fastseg and starting its command line cost: ``fastseg --help`` imports neither
torch nor the data readers, ``import fastseg`` no torch, and the ops and layers no torch._dynamo
(≈ 2 s on top of torch) and no triton. Each check runs in a fresh interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fastseg.backend import _assume_constant_result, resolve_backend

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torch._dynamo", "triton", "numpy", "nibabel", "PIL")


def _modules_after(code: str) -> set[str]:
    """The HEAVY modules loaded once ``code`` has run in a fresh interpreter."""
    script = f"import json, sys\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_help_imports_nothing_heavy():
    loaded = _modules_after(
        "import runpy\nsys.argv = ['fastseg', '--help']\n"
        "try:\n    runpy.run_module('fastseg', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exit:\n    assert exit.code == 0\n")
    assert loaded == set()


def test_import_fastseg_is_lazy_and_ops_do_not_load_dynamo():
    assert _modules_after("import fastseg\nassert fastseg.__version__") == set()
    loaded = _modules_after("import fastseg\nfastseg.ops, fastseg.layers, fastseg.models, fastseg.use_backend")
    assert "torch" in loaded and not loaded & {"torch._dynamo", "triton"}


def test_data_inspect_does_not_need_torch():
    assert "torch" not in _modules_after("from fastseg.data import find_cases, inspect_dataset, read_case")


def test_resolve_backend_carries_torchs_constant_result_mark():
    """fastseg marks resolve_backend itself, so that importing it needs no torch._dynamo: the mark
    must stay the one torch's decorator sets."""
    def by_torch():
        pass

    def by_fastseg():
        pass

    torch.compiler.assume_constant_result(by_torch)
    _assume_constant_result(by_fastseg)
    assert vars(by_torch) == vars(by_fastseg) != {}
    assert vars(resolve_backend).items() >= vars(by_fastseg).items()
