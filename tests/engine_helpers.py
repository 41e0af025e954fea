"""Shared by the engine tests: a tiny segmentation network (any nn.Module trains) and a training
script the tests run in subprocesses, alone or under torchrun.

    python tests/engine_helpers.py DATA OUT [--epochs E] [--accumulate A] [--batch-size B]
                                   [--resume] [--pause-at EPOCH STEP]

writes OUT/final.pt (the final state_dict) and OUT/history.json on rank 0. ``--pause-at`` makes
the run write OUT/paused after that step and sleep, so a test can signal it mid-epoch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn


class TinySegNet(nn.Module):
    """conv-BN-ReLU-conv, ``[N, in_channels, H, W]`` → logits ``[N, num_classes, H, W]``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8),
                                 nn.ReLU(), nn.Conv2d(8, num_classes, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def datasets(root, size=32):
    from fastseg.data import ImageDataset

    common = dict(size=size, channels=1, intensity="minmax")
    ids = [f"synthetic_{i:04d}" for i in range(16)]
    return (ImageDataset(root, case_ids=ids[:12], **common),
            ImageDataset(root, case_ids=ids[12:], **common))


def recipe(**changes):
    from fastseg.engine import Recipe

    base = dict(optimizer="sgd", lr=0.05, schedule="poly", loss="dice_bce", epochs=2,
                batch_size=4, augment=True, overlays=2, seed=3)
    return Recipe(**{**base, **changes})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause-at", type=int, nargs=2, default=None)
    args = parser.parse_args(argv)

    from fastseg.engine import Interrupted, Trainer

    torch.set_num_threads(1)
    out = Path(args.out)

    def pause(trainer, epoch, step):
        if [epoch, step] == args.pause_at:
            (out / "paused").write_text("")
            deadline = time.monotonic() + 60
            while trainer._stop_signal is None and time.monotonic() < deadline:
                time.sleep(0.05)  # until the test's signal arrives; then the step ends

    torch.manual_seed(0)
    train_set, val_set = datasets(args.data)
    trainer = Trainer(TinySegNet(), train_set, val_set,
                      recipe(epochs=args.epochs, accumulate=args.accumulate,
                             batch_size=args.batch_size),
                      out, progress=False, hooks=[pause] if args.pause_at else [])
    try:
        result = trainer.fit(resume=args.resume)
    except Interrupted:
        return 3
    if trainer.context.is_main:
        torch.save(trainer.model.state_dict(), out / "final.pt")
        (out / "history.json").write_text(json.dumps(result["history"]))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
