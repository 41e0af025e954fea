"""Scoring one CT-sized case: Dice + HD95 + ASSD of a 512x512x100 volume with a large organ.

    PYTHONPATH=. .venv/bin/python -m pytest bench/bench_metrics.py

The organ is an ellipsoid of 252 x 210 x 175 mm at spacing (0.7, 0.7, 2.5) mm (about 10 % of
the volume); the prediction is the same ellipsoid shifted and grown by a few voxels, so both
surfaces are large and the distances non-trivial. Target on a 2-core CPU: a few seconds.
"""
import numpy as np
import pytest

from fastseg.engine.metrics import compute_metrics

SHAPE = (512, 512, 100)
SPACING = (0.7, 0.7, 2.5)


def ellipsoid(center, radii):
    grid = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


@pytest.fixture(scope="module")
def case():
    target = ellipsoid((256, 256, 50), (180, 150, 35))
    pred = ellipsoid((259, 254, 51), (183, 153, 36))
    return pred, target


def test_dice_hd95_assd_512x512x100(benchmark, capsys, case):
    row = benchmark.pedantic(compute_metrics, args=case,
                             kwargs=dict(spacing=SPACING, metrics=("dice", "hd95", "assd")),
                             rounds=3, iterations=1)
    assert 0.9 < row["dice"] < 1.0 and 0.0 < row["assd"] < row["hd95"] < 10.0
    benchmark.extra_info.update(row)
    with capsys.disabled():
        print(f"\n{benchmark.name}: {benchmark.stats.stats.mean:.2f} s per case "
              f"(dice {row['dice']:.4f}, hd95 {row['hd95']:.2f} mm, assd {row['assd']:.2f} mm)")
