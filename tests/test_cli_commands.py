"""fastseg train / evaluate / predict end to end, as a user runs them (in a subprocess), on small
data written in the real formats; the files they write, and the errors a user can act on."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fastseg.data import make_synthetic_2d, write_image
from fastseg.engine.checkpoint import checkpoint_payload, load_checkpoint, save_checkpoint
from fastseg.models import LGMSNet

ROOT = Path(__file__).resolve().parents[1]


def fastseg(*args, cwd=None, expect=0, env=None):
    """Run ``python -m fastseg *args``; return (stdout, stderr); check the exit status."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "fastseg", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, env=full_env, timeout=600)
    assert done.returncode == expect, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout, done.stderr


def snapshot(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short LGMSNet run on a folder of PNG pairs: (data folder, run folder, stdout)."""
    tmp = tmp_path_factory.mktemp("cli")
    data = make_synthetic_2d(tmp / "polyps", n=12, size=(48, 40), image_format="png", mask_format="png")
    before = snapshot(data)
    out, _ = fastseg("train", "--model", "lgmsnet", "--data", data, "--epochs", 2, "--batch-size", 4,
                     "--size", 32, "--backend", "cpu", "--out", tmp / "run", "--quiet")
    assert snapshot(data) == before, "train wrote into the data folder"
    return data, tmp / "run", out


def test_train_writes_everything_and_says_what_it_does(trained):
    data, run, out = trained
    for name in ("last.pt", "best.pt", "log.jsonl", "loss.png", "metrics.png", "splits.json"):
        assert (run / name).is_file(), name
    assert list((run / "overlays").glob("*.png"))
    assert "data:" in out and "split" in out and "model: lgmsnet" in out and "done in" in out
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    payload = load_checkpoint(run / "best.pt")
    assert payload["model"]["name"] == "lgmsnet" and payload["preprocessing"]["size"] == [32, 32]
    assert sorted(sum(payload["splits"].values(), [])) == sorted(p.stem for p in (data / "images").iterdir())


def test_resume_continues_and_refuses_another_model(trained, tmp_path):
    data, run, _ = trained
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("last.pt", "splits.json"):
        (copy / name).write_bytes((run / name).read_bytes())
    args = ["--data", data, "--batch-size", 4, "--size", 32, "--backend", "cpu", "--out", copy, "--quiet",
            "--resume"]
    fastseg("train", "--model", "lgmsnet", "--epochs", 3, *args)
    assert [json.loads(l)["epoch"] for l in (copy / "log.jsonl").read_text().splitlines()][-1] == 3
    _, err = fastseg("train", "--model", "lightawnet", "--epochs", 4, *args, expect=2)
    assert "checkpoint of a lgmsnet model" in err and "Traceback" not in err


def test_evaluate_the_test_split(trained, tmp_path):
    data, run, _ = trained
    out, _ = fastseg("evaluate", "--checkpoint", run / "best.pt", "--data", data, "--quiet")
    test_ids = load_checkpoint(run / "best.pt")["splits"]["test"]
    csv = (run / "evaluate-test.csv").read_text().splitlines()
    assert csv[0].startswith("case_id,shape,dice,iou")
    assert [line.split(",")[0] for line in csv[1:-3]] == test_ids
    assert [line.split(",")[1] for line in csv[1:-3]] == ["48x40"] * len(test_ids)  # at the file's size
    assert "MONAI" in out and "dice" in out
    fastseg("evaluate", "--checkpoint", run / "best.pt", "--data", data, "--split", "all", "--quiet",
            "--csv", tmp_path / "all.csv")
    assert len((tmp_path / "all.csv").read_text().splitlines()) == 12 + 1 + 3
    _, err = fastseg("evaluate", "--checkpoint", run / "best.pt", "--data", data, "--csv", data / "m.csv",
                     expect=2)
    assert "never writes into input data" in err and not (data / "m.csv").exists()


def test_predict_images_of_any_size_with_overlays(trained, tmp_path):
    data, run, _ = trained
    inputs = tmp_path / "in"
    g = np.random.default_rng(0)
    write_image(inputs / "a.png", g.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    write_image(inputs / "sub" / "b.jpg", g.integers(0, 255, (33, 31, 3), dtype=np.uint8))
    before = snapshot(inputs)
    out, _ = fastseg("predict", "--checkpoint", run / "best.pt", "--input", inputs, "--output",
                     tmp_path / "out", "--overlay", "--tta")
    assert snapshot(inputs) == before
    a = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "out" / "a_pred.png"))
    b = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "out" / "sub" / "b_pred.png"))
    assert a.shape == (50, 70) and b.shape == (33, 31)
    assert set(np.unique(a)) <= {0, 255} and set(np.unique(b)) <= {0, 255}
    assert (tmp_path / "out" / "a_pred_overlay.png").is_file()
    assert out.count("->") == 2
    _, err = fastseg("predict", "--checkpoint", run / "best.pt", "--input", inputs, "--output",
                     inputs / "masks", expect=2)
    assert "never writes into input data" in err


def test_predict_nifti_keeps_affine_and_shape(tmp_path):
    torch.manual_seed(0)
    model = LGMSNet(in_channels=1)
    payload = checkpoint_payload(model, name="lgmsnet", kwargs={"in_channels": 1, "num_classes": 1},
                                 preprocessing={"size": [32, 32], "channels": 1, "intensity": "zscore",
                                                "kind": "volume"},
                                 labels={"num_classes": 1, "values": None, "names": None})
    save_checkpoint(tmp_path / "vol.pt", payload)
    affine = np.array([[0, -0.7, 0, 120.0], [0.9, 0, 0, -80.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    volume = np.random.default_rng(1).normal(0, 100, (40, 36, 5)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "ct.nii.gz")
    fastseg("predict", "--checkpoint", tmp_path / "vol.pt", "--input", tmp_path / "ct.nii.gz",
            "--output", tmp_path / "ct_seg.nii.gz")
    seg = nib.load(tmp_path / "ct_seg.nii.gz")
    assert seg.shape == (40, 36, 5)
    np.testing.assert_allclose(seg.affine, affine)
    assert np.issubdtype(seg.get_data_dtype(), np.integer)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}

    two_channels = np.zeros((8, 8, 3, 2), np.float32)
    nib.save(nib.Nifti1Image(two_channels, affine), tmp_path / "two.nii.gz")
    _, err = fastseg("predict", "--checkpoint", tmp_path / "vol.pt", "--input", tmp_path / "two.nii.gz",
                     "--output", tmp_path / "o" / "two_seg.nii.gz", expect=2)
    assert "two.nii.gz" in err and "channel" in err and "Traceback" not in err


def test_user_errors_are_one_line(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    cases = [
        (["train", "--model", "unet", "--data", "synthetic-2d"], "invalid choice: 'unet'"),
        (["train", "--model", "lgmsnet", "--data", tmp_path / "nowhere", "--out", tmp_path / "r"], "not a folder"),
        (["train", "--model", "lgmsnet", "--data", tmp_path / "empty", "--out", tmp_path / "r"], "empty"),
        (["evaluate", "--checkpoint", tmp_path / "broken.pt", "--data", tmp_path / "empty"], "broken.pt"),
        (["predict", "--checkpoint", tmp_path / "missing.pt", "--input", tmp_path, "--output", tmp_path / "o"],
         "no image or NIfTI files"),
        (["train", "--model", "lgmsnet", "--data", "synthetic-2d", "--epochs", "0"], "positive integer"),
    ]
    for args, message in cases:
        _, err = fastseg(*args, expect=2)
        assert message in err and "Traceback" not in err, (args, err)
        assert err.strip().splitlines()[-1].startswith(f"fastseg {args[0]}: error: "), err


@pytest.mark.slow
def test_train_under_torchrun_unchanged(trained, tmp_path):
    """The same command under torchrun: two gloo processes, one set of outputs, one report."""
    data = trained[0]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "fastseg", "train", "--model", "lgmsnet", "--data", str(data), "--epochs", "1",
         "--batch-size", "4", "--size", "32", "--backend", "cpu", "--out", str(tmp_path / "ddp"), "--quiet"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("model: lgmsnet") == 1 and done.stdout.count("done in") == 1, done.stdout
    assert "2 process(es)" in done.stdout
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["world_size"] == 2


def test_backend_choices_are_the_backends():
    from fastseg.backend import BACKENDS
    from fastseg.cli import BACKEND_NAMES

    assert BACKEND_NAMES == ("auto", *BACKENDS)


def test_bench_times_every_op_family_by_default():
    from fastseg import cli

    ops = {p.stem[len("bench_"):] for p in (ROOT / "bench").glob("bench_*.py")}
    ops -= {"models", "data", "metrics"}  # not op families: run by `make bench`
    assert set(cli.build_parser().parse_args(["bench"]).ops) == ops
