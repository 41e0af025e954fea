"""Where a model's step spends its time, per backend: the profiler's self CPU time of every ATen
and fastseg op in one step, summed into categories (dense convolutions, depthwise convolutions,
attention matmuls, norms, activations, ...), for the reference backend and the fused one side by
side.

    .venv/bin/python bench/profile_models.py                        # both models, train 8×128²
    .venv/bin/python bench/profile_models.py --model lgmsnet --mode train --size 256
    .venv/bin/python bench/profile_models.py --mode inference --batch 1 --size 256

Each implementation is built and warmed up as in ``bench_models.py`` (the same weights, inputs and
step); the profiled step is the fastest of ``--rounds`` profiled steps (the least disturbed by
other processes). The profiler adds a few per cent of overhead to every op, alike for both
backends; the plain wall time of the best unprofiled round is printed too.
``FASTSEG_RETAIN_FREED_MEMORY=1`` profiles as ``fastseg train`` runs (see ``bench_models.py``).
"""
import argparse
import re
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench_models import MODELS, RETAINED, make_step

# (category, pattern on the op name); the first match wins. Convolutions are split by their
# weight's shape afterwards (see `category`).
CATEGORIES = [
    ("fastseg fused ops", r"fastseg"),
    ("convolution", r"^aten::(mkldnn_convolution|convolution_backward|_slow_conv2d_\w+|"
                    r"thnn_conv2d|_nnpack\w*|slow_conv\w*|_convolution)$"),
    ("attention matmuls, softmax", r"^aten::(bmm|mm|addmm|baddbmm|matmul|_softmax|"
                                   r"_softmax_backward_data|_safe_softmax)$"),
    ("norms", r"^aten::native_(batch|layer|group)_norm(_backward)?$"),
    ("activations", r"^aten::(gelu|silu|relu|relu_|clamp_min|threshold_backward|sigmoid|"
                    r"sigmoid_backward|gelu_backward|silu_backward|hardtanh\w*)$"),
    ("resampling, pooling", r"^aten::(upsample\w*|max_pool\w*|avg_pool\w*|adaptive_avg_pool\w*|"
                            r"_adaptive_avg_pool\w*|mean)$"),
    ("copies, concat, fill", r"^aten::(copy_|cat|clone|contiguous|fill_|zero_|_to_copy|empty\w*|"
                             r"new_\w+|constant_pad_nd|narrow_copy|index\w*|_unsafe_view)$"),
    ("elementwise arithmetic, sums", r"^aten::(add|add_|mul|mul_|sub|sub_|div|div_|sum|neg|"
                                     r"addcmul_|addcdiv_|lerp_|sqrt|rsqrt|pow|exp)$"),
    ("input checks (finite)", r"^aten::(eq|ne|all|abs|isfinite|isnan|isinf|any|item|"
                              r"_local_scalar_dense)$"),
    ("optimizer", r"^aten::_foreach_\w+$"),
]


def category(name: str, shapes) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name):
            if label == "convolution":
                # the weight: the backward ops' third input, the forward ops' second
                index = 2 if name.endswith("_backward") else 1
                weight = shapes[index] if len(shapes) > index else []
                if len(weight) == 4 and weight[1] == 1 and weight[2] * weight[3] > 1:
                    return "depthwise convolutions"
                if len(weight) == 4 and weight[2] * weight[3] == 1:
                    return "1×1 convolutions"
                return "dense k×k convolutions" if weight else "convolutions (shape not recorded)"
            return label
    return "other"


def profile_step(name, impl, mode, batch, size, rounds):
    """(best unprofiled wall seconds, {category: self CPU ms}) of the fastest profiled step."""
    step = make_step(name, impl, mode, batch, size)
    step()
    wall = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        wall.append(time.perf_counter() - start)
    best = None
    for _ in range(rounds):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        totals = defaultdict(float)
        for event in prof.key_averages(group_by_input_shape=True):
            if event.self_cpu_time_total > 0:
                totals[category(event.key, event.input_shapes)] += event.self_cpu_time_total / 1e3
        if best is None or sum(totals.values()) < sum(best.values()):
            best = totals
    return min(wall), best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), nargs="+", default=list(MODELS))
    parser.add_argument("--mode", choices=["train", "inference"], default="train")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--impls", nargs="+", default=["reference", "cpu"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.mode}, batch "
          f"{args.batch}, {args.size}²; self CPU ms of the fastest of {args.rounds} profiled steps; "
          f"{'freed memory retained' if RETAINED else 'default allocator settings'}")
    for name in args.model:
        results = {impl: profile_step(name, impl, args.mode, args.batch, args.size, args.rounds)
                   for impl in args.impls}
        cats = sorted({c for _, t in results.values() for c in t},
                      key=lambda c: -max(t.get(c, 0) for _, t in results.values()))
        print(f"\n{name}\n")
        print("| category | " + " | ".join(f"{i} ms" for i in args.impls) + " |")
        print("|---|" + "---:|" * len(args.impls))
        for c in cats:
            print(f"| {c} | " + " | ".join(f"{results[i][1].get(c, 0):.0f}" for i in args.impls) + " |")
        print("| **total (profiled)** | " + " | ".join(f"**{sum(results[i][1].values()):.0f}**"
                                                  for i in args.impls) + " |")
        print("| wall, best unprofiled step | " + " | ".join(f"{results[i][0] * 1e3:.0f}"
                                                           for i in args.impls) + " |")


if __name__ == "__main__":
    main()
