"""Deterministic splits and k-fold, and their JSON file."""
import pytest

from fastseg.data import kfold_splits, load_splits, make_splits, save_splits

IDS = [f"case_{i}" for i in range(10)]


def test_split_is_pinned_across_runs_and_machines():
    # Hash-ordered: this exact answer must never change, or saved experiments stop being reproducible.
    assert make_splits(IDS, seed=0) == {
        "train": ["case_0", "case_3", "case_4", "case_6", "case_7", "case_8", "case_9"],
        "val": ["case_1"], "test": ["case_2", "case_5"]}


def test_split_is_a_partition_independent_of_input_order():
    splits = make_splits(IDS, (0.6, 0.2, 0.2), seed=5)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(sum(splits.values(), [])) == sorted(IDS)
    assert make_splits(list(reversed(IDS)), (0.6, 0.2, 0.2), seed=5) == splits
    assert make_splits(IDS, (0.6, 0.2, 0.2), seed=6) != splits


def test_small_datasets_and_invalid_arguments():
    small = make_splits(["a", "b", "c"], (0.8, 0.1, 0.1))  # a positive fraction gets at least one case
    assert [len(small[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    assert make_splits(IDS, (0.8, 0.2, 0.0))["test"] == []
    with pytest.raises(ValueError, match="too few"):
        make_splits(["a", "b"], (0.8, 0.1, 0.1))
    with pytest.raises(ValueError, match="sum to 1"):
        make_splits(IDS, (0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="unique"):
        make_splits(["a", "a", "b"])


def test_kfold_every_case_validated_once():
    folds = kfold_splits(IDS, k=3, seed=1)
    assert sorted(sum((f["val"] for f in folds), [])) == sorted(IDS)
    assert [len(f["val"]) for f in folds] == [4, 3, 3]
    for fold in folds:
        assert sorted(fold["train"] + fold["val"]) == sorted(IDS)
    assert folds[0]["val"] == ["case_0", "case_3", "case_6", "case_7"]
    with pytest.raises(ValueError, match="between 2 and"):
        kfold_splits(IDS, k=11)


def test_splits_file_round_trip(tmp_path):
    holdout = make_splits(IDS, seed=3)
    folds = kfold_splits(IDS, k=5, seed=3)
    path = save_splits(tmp_path / "run" / "splits.json", holdout, seed=3, dataset="kvasir")
    assert load_splits(path) == holdout
    assert load_splits(save_splits(tmp_path / "folds.json", folds, seed=3, k=5)) == folds
    assert '"seed": 3' in path.read_text()
