"""Checkpoint files: the payload contract, atomic writes, refusal of corrupt files and of files that
need arbitrary pickled objects, rebuilding a model from a checkpoint alone."""
import os

import numpy as np
import pytest
import torch

import fastseg
from fastseg.engine.checkpoint import (CheckpointError, checkpoint_payload, load_checkpoint,
                                       model_from_checkpoint, save_checkpoint)
from fastseg.models import from_original, to_original

PREPROCESSING = {"size": [32, 32], "channels": 1, "intensity": "minmax", "kind": "image"}
LABELS = {"num_classes": 1, "values": [0, 255], "names": ["background", "lesion"]}


class Opaque:
    """A class weights_only loading must refuse."""


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return fastseg.create_model("lightawnet", in_channels=1, num_classes=1, backend="reference")


@pytest.fixture()
def payload(model):
    return checkpoint_payload(model, name="lightawnet",
                              kwargs={"in_channels": 1, "num_classes": 1, "backend": "cpu"},
                              preprocessing=PREPROCESSING, labels=LABELS, epoch=3,
                              metrics={"dice": 0.5}, optimizer={"state": {}, "param_groups": []})


def test_round_trip_predicts_with_nothing_else(tmp_path, model, payload):
    path = save_checkpoint(tmp_path / "run" / "last.pt", payload)
    assert path == tmp_path / "run" / "last.pt" and os.listdir(path.parent) == ["last.pt"]
    loaded = load_checkpoint(path)
    assert loaded["format"] == "fastseg-checkpoint" and loaded["version"] == 1
    assert loaded["model"] == {"name": "lightawnet", "kwargs": {"in_channels": 1, "num_classes": 1}}
    assert loaded["preprocessing"] == PREPROCESSING and loaded["labels"] == LABELS
    assert loaded["epoch"] == 3 and loaded["metrics"] == {"dice": 0.5}
    rebuilt = model_from_checkpoint(path, backend="reference")
    assert not rebuilt.training
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))


def test_save_refuses_objects_weights_only_cannot_load(tmp_path, payload):
    with pytest.raises(ValueError, match=r"payload\['extra'\]\['a'\] is a numpy.ndarray"):
        save_checkpoint(tmp_path / "c.pt", {**payload, "extra": {"a": np.zeros(2)}})
    with pytest.raises(ValueError, match="format"):
        save_checkpoint(tmp_path / "c.pt", {"model_state": {}})
    assert not list(tmp_path.iterdir())


def test_failed_write_keeps_the_previous_file(tmp_path, payload, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", payload)
    good = path.read_bytes()

    def crash(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {**payload, "epoch": 4})
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "zeroed"])
def test_corrupt_files_are_refused(tmp_path, payload, damage):
    data = save_checkpoint(tmp_path / "good.pt", payload).read_bytes()
    bad = tmp_path / "bad.pt"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "garbage":
        bad.write_bytes(b"not a checkpoint at all")
    else:  # a zeroed run inside the pickled structure
        start = data.index(b"data.pkl") + 64
        bad.write_bytes(data[:start] + bytes(32) + data[start + 32:])
    with pytest.raises(CheckpointError, match=r"bad\.pt: truncated or corrupt checkpoint"):
        load_checkpoint(bad)


def test_arbitrary_objects_are_refused(tmp_path, payload):
    path = tmp_path / "evil.pt"
    torch.save({**payload, "extra": Opaque()}, path)
    with pytest.raises(CheckpointError, match="evil.pt: refusing to unpickle arbitrary objects "
                       r"\(.*Opaque"):
        load_checkpoint(path)


def test_other_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt: not a fastseg checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    assert issubclass(CheckpointError, ValueError)


def test_unknown_model_names_are_refused(payload):
    custom = {**payload, "model": {"name": "mynet", "kwargs": {}}}
    with pytest.raises(CheckpointError, match="'mynet' is not one fastseg builds"):
        model_from_checkpoint(custom)


def test_from_original_reads_files_weights_only(tmp_path, model):
    torch.save(to_original("lightawnet", model), tmp_path / "authors.pth")
    loaded = from_original("lightawnet", tmp_path / "authors.pth", backend="reference")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    torch.save({"state": Opaque()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle arbitrary objects"):
        from_original("lightawnet", str(tmp_path / "evil.pth"))
