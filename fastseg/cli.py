"""Command line: ``fastseg train | evaluate | predict | data inspect | info | bench | gpu-report``
(also ``python -m fastseg ...``)."""
# Building the parser imports nothing beyond the standard library: each command imports what it
# needs when it runs, so ``fastseg --help`` and a mistyped option answer at once.
from __future__ import annotations

import argparse
import os
import sys


def _info(args) -> int:
    import torch

    import fastseg
    from fastseg.backend import BACKENDS, unavailable_reason

    print(f"fastseg {fastseg.__version__}, torch {torch.__version__}")
    for device in ("cpu", "cuda"):
        for name in BACKENDS:
            why = unavailable_reason(name, device)
            print(f"  {device:4s} {name:9s} {'available' if why is None else 'unavailable: ' + why}")
    return 0


def _bench(args) -> int:
    import subprocess
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    if not (bench / "summary.py").exists():
        print(f"fastseg bench runs from a checkout: {bench} not found", file=sys.stderr)
        return 2
    out = Path(args.json).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           *[str(bench / f"bench_{op}.py") for op in args.ops], f"--benchmark-json={out}"]
    if args.k:
        cmd += ["-k", args.k]
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=bench.parent)
    if rc != 0:
        return rc
    sys.path.insert(0, str(bench))
    from summary import main as summary

    return summary([str(out)])


def _gpu_report(args) -> int:
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Under the interpreter kernels are not compilable JIT functions: start afresh without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "fastseg", *sys.argv[1:]], env)
    from fastseg.gpu_report import run_report

    try:
        return run_report(args.ops, archs=args.arch, dtypes=args.dtype, cuda=not args.no_cuda,
                          jobs=args.jobs, markdown=args.markdown, cuda_all=args.cuda_all)
    except ValueError as exc:
        print(f"fastseg gpu-report: {exc}", file=sys.stderr)
        return 2


def _data(args) -> int:
    from fastseg.data.inspect import run_inspect

    return run_inspect(args)


class _LayoutNames:
    """The registered dataset layouts, looked up only when argparse checks a ``--layout`` value or
    prints the choices (the layouts module imports the image and NIfTI readers)."""

    @staticmethod
    def _names() -> list[str]:
        from fastseg.data.layouts import LAYOUTS

        return list(LAYOUTS)

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _label_values(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, e.g. 0,205,420; got {text!r}")


def _train(args) -> int:
    from fastseg.commands import run_train

    return run_train(args)


def _evaluate(args) -> int:
    from fastseg.commands import run_evaluate

    return run_evaluate(args)


def _predict(args) -> int:
    from fastseg.commands import run_predict

    return run_predict(args)


MODELS = ("lgmsnet", "lightawnet")
OP_BENCHMARKS = ("mixed_depthwise_conv", "dynamic_conv", "dilated_attention", "attention_gates",
                 "batch_norm_act", "max_pool", "pointwise_conv")
# fastseg.backend.BACKENDS with "auto", spelled out: importing fastseg.backend imports torch
# (tests/test_cli_commands.py keeps the two equal).
BACKEND_NAMES = ("auto", "reference", "cpu", "cuda", "triton")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by fastseg train (best.pt, last.pt)")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="auto", help="op backend (default: auto)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images or slices per forward pass")
    p.add_argument("--tta", action="store_true", help="average the predictions of the input and its flips")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train LGMSNet or LightAWNet on a dataset folder or built-in data",
                       description="Train a seed model with its paper's recipe (options override it) on a "
                       "dataset folder (any layout `fastseg data inspect` knows) or on built-in synthetic "
                       "data. Splits the cases into train/val/test (test is never used for training or "
                       "model selection), shows progress, and writes last.pt, best.pt, log.jsonl, "
                       "loss.png, metrics.png, overlays/ and splits.json under --out. Ctrl-C saves "
                       "last.pt; --resume continues. Runs under torchrun unchanged.")
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--data", required=True, help="dataset folder, or synthetic-2d / synthetic-3d "
                   "(generated under OUT/data on first use)")
    p.add_argument("--layout", choices=_LayoutNames(), metavar="LAYOUT", help="force a layout: %(choices)s")
    p.add_argument("--label-values", type=_label_values, help="raw label values in class order, e.g. 0,205,420")
    p.add_argument("--num-classes", type=_positive_int, default=1,
                   help="1: binary (label > 0); K > 1: K classes (default 1)")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int, help="images per optimizer step, over all processes")
    p.add_argument("--size", type=_positive_int, help="train at SIZE×SIZE (LGMSNet: a multiple of 32, "
                   "LightAWNet: of 16)")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--backend", choices=BACKEND_NAMES, help="op backend: reference (plain PyTorch) or the "
                   "fused kernels (default: auto)")
    p.add_argument("--amp", choices=("bfloat16", "float16"), help="mixed precision (float16: CUDA only)")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="torch device (default: this process's GPU, else CPU)")
    p.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)
    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a dataset folder (per case, summary, CSV)",
                       description="Predict every case of a dataset folder whole (volumes slice by slice, "
                       "scored in 3-D with their voxel spacing) and print Dice, IoU, precision, recall, "
                       "HD95 and ASSD per case and summarised; write them as CSV.")
    _add_inference_options(p)
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--split", choices=("test", "val", "train", "all"), default="test",
                   help="cases to score: a split recorded in the checkpoint, or all (default: test)")
    p.add_argument("--layout", choices=_LayoutNames(), metavar="LAYOUT", help="force a layout: %(choices)s")
    p.add_argument("--label-values", type=_label_values, help="raw label values in class order")
    p.add_argument("--empty", choices=("monai", "perfect"), default="monai",
                   help="scores of empty masks: MONAI's (NaN/inf) or perfect when both are empty")
    p.add_argument("--csv", default=None, help="where to write the table (default: next to the checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("predict", help="label maps for images or volumes (NIfTI in, NIfTI out; PNG/JPEG in, PNG out)",
                       description="Segment one file or every file of a folder with a checkpoint. NIfTI "
                       "volumes give NIfTI label maps with the input's affine and header; 2-D images give "
                       "PNG masks. Inputs of any size: resized to the training size and back, or padded "
                       "to the model's multiple and cropped back.")
    _add_inference_options(p)
    p.add_argument("--input", required=True, help="a file, or a folder (searched recursively)")
    p.add_argument("--output", required=True, help="a file (for one input) or a folder")
    p.add_argument("--overlay", action="store_true", help="also write the prediction over the image as PNG")
    p.set_defaults(func=_predict)
    p = sub.add_parser("info", help="versions and which backends can run here")
    p.set_defaults(func=_info)
    p = sub.add_parser("bench", help="time the fused ops against the references; print ratios")
    p.add_argument("--ops", nargs="+", choices=OP_BENCHMARKS, default=list(OP_BENCHMARKS),
                   help="op families to time (files bench/bench_<op>.py; default: all)")
    p.add_argument("-k", default=None, help="pytest -k expression selecting cases")
    p.add_argument("--json", default=".benchmarks/ops.json", help="where to write the raw results")
    p.set_defaults(func=_bench)
    p = sub.add_parser("gpu-report", help="compile every kernel for real GPUs (no GPU needed): "
                       "registers, spills, shared memory, occupancy; exit 1 on a failure",
                       description="Compile each op family's Triton kernels, at the block sizes "
                       "their launchers pick for the models' shapes (batch 8, 128² and 256²), and "
                       "its CUDA kernels for real GPU targets, and print what ptxas reports. Exits "
                       "1 if a configuration the models use fails to compile, spills, or exceeds "
                       "its register bound (float64 ones, run only by the tests, need only "
                       "compile).")
    p.add_argument("--ops", nargs="+", default=None, help="op families (default: all)")
    p.add_argument("--arch", nargs="+", type=int, default=[80, 90], choices=[80, 90],
                   help="compute capabilities to compile for")
    p.add_argument("--dtype", nargs="+", default=None,
                   help="element types (default: float32 float16 bfloat16 float64)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels")
    p.add_argument("--cuda-all", action="store_true",
                   help="also list CUDA template instances the models do not use")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                   help="parallel compiles (default: the number of cores)")
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    p.set_defaults(func=_gpu_report)
    p = sub.add_parser("data", help="inspect a dataset folder")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("inspect", help="detected layout, case counts, shapes, spacing, labels")
    p.add_argument("path", help="dataset folder, as unpacked")
    p.add_argument("--layout", choices=_LayoutNames(), metavar="LAYOUT",
                   help="skip detection and read the folder as this layout: %(choices)s")
    p.add_argument("--label-values", type=_label_values,
                   help="raw label values in class order, e.g. 0,205,420 (default: the layout's)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_data)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
