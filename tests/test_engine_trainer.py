"""The training engine on synthetic data: learning, both seed models on both CPU backends, mixed
precision, multi-class, exact resume after an interruption (hook and real SIGTERM), a 2-process
gloo run against one process, corrupt checkpoints, recipes, records."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import fastseg
from fastseg.data import ImageDataset, make_synthetic_2d, make_synthetic_ct
from fastseg.engine import (CheckpointError, Interrupted, Recipe, Trainer, lgmsnet_recipe,
                            lightawnet_recipe, load_checkpoint, model_from_checkpoint, train)
from fastseg.engine.records import line_plot, nice_ticks, overlay_grid

sys.path.insert(0, str(Path(__file__).parent))
from engine_helpers import TinySegNet, datasets, recipe  # noqa: E402

HELPER = Path(__file__).parent / "engine_helpers.py"
REPO = Path(__file__).resolve().parents[1]
FUSED = "cpu" if "cpu" in fastseg.available_backends("cpu") else "reference"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the runs are tiny, and on a shared 2-core machine a second thread mostly
    waits for a core at every parallel region."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_2d(tmp_path_factory.mktemp("data"), n=16, size=(48, 48),
                             image_format="png", mask_format="png")


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_a_seed_model_learns(data, tmp_path):
    train_set, val_set = datasets(data)
    torch.manual_seed(0)
    trainer = Trainer("lightawnet", train_set, val_set,
                      lightawnet_recipe(lr=2e-3, epochs=3, batch_size=4, size=32, backend=FUSED,
                                        overlays=2),
                      tmp_path, progress=False)
    result = trainer.fit()
    history = result["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_dice"] > history[0]["val_dice"]
    assert all(r["images_per_s"] > 0 for r in history)
    # what the run leaves behind
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["val_dice"] for r in log] == pytest.approx([r["val_dice"] for r in history])
    for name in ("loss.png", "metrics.png", "overlays/epoch_003.png"):
        assert Image.open(tmp_path / name).size[0] > 100
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == result["best"]["epoch"]
    assert best["model"] == {"name": "lightawnet", "kwargs": {"in_channels": 1, "num_classes": 1}}
    assert best["preprocessing"] == {"size": [32, 32], "channels": 1, "intensity": "minmax",
                                     "kind": "image"}
    assert best["labels"]["num_classes"] == 1
    model = model_from_checkpoint(tmp_path / "last.pt", backend="reference")
    x = val_set[0]["image"][None]
    torch.testing.assert_close(model(x), trainer.model.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,amp", [("reference", None), (FUSED, "bfloat16")])
def test_lgmsnet_trains_on_each_backend(data, tmp_path, backend, amp):
    from fastseg.data import ImageDataset

    train_set = ImageDataset(data, case_ids=[f"synthetic_{i:04d}" for i in range(4)], size=32,
                             channels=3, intensity="imagenet")
    trainer = Trainer("lgmsnet", train_set, None,
                      lgmsnet_recipe(epochs=1, batch_size=2, size=32, backend=backend, amp=amp),
                      tmp_path, progress=False)
    history = trainer.fit()["history"]
    assert torch.isfinite(torch.tensor(history[0]["train_loss"]))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()


def test_interrupted_run_resumes_to_the_same_weights(data, tmp_path):
    train_set, val_set = datasets(data)
    changes = dict(accumulate=2, epochs=2, amp="bfloat16")

    torch.manual_seed(0)
    straight = Trainer(TinySegNet(), train_set, val_set, recipe(**changes), tmp_path / "a",
                       progress=False)
    expected = straight.fit()

    def interrupt(trainer, epoch, step):
        if (epoch, step) == (1, 0):
            raise KeyboardInterrupt

    torch.manual_seed(0)
    first = Trainer(TinySegNet(), train_set, val_set, recipe(**changes), tmp_path / "b",
                    progress=False, hooks=[interrupt])
    with pytest.raises(Interrupted) as stopped:
        first.fit()
    saved = load_checkpoint(stopped.value.checkpoint)
    assert saved["epoch"] == 1 and saved["sampler"]["step"] == 1  # mid-epoch

    torch.manual_seed(123)  # another initialisation: everything must come from the checkpoint
    resumed = Trainer(TinySegNet(), train_set, val_set, recipe(**changes), tmp_path / "b",
                      progress=False)
    result = resumed.fit(resume=True)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("images_per_s", "train_seconds")}
                       for r in h]  # noqa: E731
    assert strip(result["history"]) == strip(expected["history"])


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_matches(data, tmp_path):
    run = lambda out, *extra: [sys.executable, str(HELPER), str(data), str(out), *extra]  # noqa: E731
    subprocess.run(run(tmp_path / "a"), check=True, env=_env(), timeout=300)
    child = subprocess.Popen(run(tmp_path / "b", "--pause-at", "1", "0"), env=_env())
    deadline = time.monotonic() + 240
    while not (tmp_path / "b" / "paused").exists():
        assert child.poll() is None and time.monotonic() < deadline, "run did not reach the pause"
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=120) == 3
    assert load_checkpoint(tmp_path / "b" / "last.pt")["sampler"]["step"] == 1
    subprocess.run(run(tmp_path / "b", "--resume"), check=True, env=_env(), timeout=300)
    expected = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    got = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(data, tmp_path):
    """Global batch 4: two processes of 2 images each against one process running its 4 images
    as 2 micro-batches of 2 (the same micro-batches, hence the same BatchNorm statistics)."""
    script = [str(HELPER), str(data)]
    single = subprocess.run([sys.executable, *script, str(tmp_path / "one"), "--accumulate", "2"],
                            env=_env(), timeout=300, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", *script, str(tmp_path / "two")],
                         env=_env(), timeout=300, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "final.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    for key, value in one.items():
        if "running" in key or "num_batches" in key:
            continue  # per-process BatchNorm buffers: rank 0's saw half the micro-batches
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5, msg=key)
    losses = lambda out: [r["train_loss"] for r in json.loads((out / "history.json").read_text())]  # noqa: E731
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert load_checkpoint(tmp_path / "two" / "last.pt")["world_size"] == 2


def test_corrupt_checkpoint_is_refused_and_nothing_is_overwritten(data, tmp_path):
    train_set, val_set = datasets(data)
    torch.manual_seed(0)
    Trainer(TinySegNet(), train_set, val_set, recipe(epochs=1), tmp_path, progress=False).fit()
    best = (tmp_path / "best.pt").read_bytes()
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    trainer = Trainer(TinySegNet(), train_set, val_set, recipe(epochs=2), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"last\.pt: truncated or corrupt"):
        trainer.fit(resume=True)
    assert (tmp_path / "best.pt").read_bytes() == best and last.stat().st_size == 1000


def test_multi_class_volumes_through_train(tmp_path, capsys):
    root = make_synthetic_ct(tmp_path / "ct", n=3, shape=(32, 32, 6))
    splits = {"train": ["volume-0", "volume-1"], "val": ["volume-2"], "test": []}
    result = train(TinySegNet(num_classes=3), root, tmp_path / "run", splits=splits,
                   num_classes=3, label_names=["background", "liver", "lesion"], epochs=1,
                   batch_size=4, size=32, channels=1, intensity="ct-liver", progress=False)
    printed = capsys.readouterr().out
    assert "train 2, val 1, test 0" in printed and "loss dice_ce" in printed
    record = result["history"][0]
    assert {"val_dice/1", "val_dice/2", "val_iou/1"} <= set(record)
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["labels"] == {"num_classes": 3, "values": [0, 1, 2],
                                 "names": ["background", "liver", "lesion"]}
    assert payload["preprocessing"]["kind"] == "volume"
    assert payload["preprocessing"]["intensity"] == "ct-liver"
    assert payload["splits"] == splits  # evaluate --split test reads it from the checkpoint
    assert payload["recipe"]["loss"] == "dice_bce"  # run as dice_ce: softmax for 3 classes


def test_recipes():
    lgms, law = lgmsnet_recipe(), lightawnet_recipe()
    assert (lgms.optimizer, lgms.momentum, lgms.weight_decay, lgms.schedule, lgms.poly_power,
            lgms.loss, lgms.loss_kwargs, lgms.augment, lgms.shuffle) == (
        "sgd", 0.9, 1e-4, "poly", 0.9, "dice_bce", {"lambda_bce": 0.5}, True, True)
    assert (law.optimizer, law.lr, law.loss, law.schedule, law.shuffle) == (
        "adam", 1e-4, "bce", "constant", True)
    assert Recipe.from_dict(lgms.to_dict()) == lgms
    for bad, name in [({"optimizer": "lion"}, "optimizer"), ({"batch_size": 0}, "batch_size"),
                      ({"amp": "float8"}, "amp"), ({"backend": "gpu"}, "backend"),
                      ({"size": (32, 0)}, "size"), ({"batch_size": 6, "accumulate": 4}, "batch_size")]:
        with pytest.raises(ValueError, match=name):
            Recipe(**bad)
    with pytest.raises(ValueError, match="unknown recipe fields"):
        lgms.replace(learning_rate=1)


def test_bad_trainer_arguments(data, tmp_path):
    train_set, val_set = datasets(data)
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(TinySegNet(), train_set, val_set, recipe(batch_size=16), tmp_path)
    with pytest.raises(ValueError, match="needs a multi-class model"):
        Trainer(TinySegNet(), train_set, val_set, recipe(loss="ce"), tmp_path)
    with pytest.raises(ValueError, match="float16"):
        Trainer(TinySegNet(), train_set, val_set, recipe(amp="float16"), tmp_path, device="cpu")


def test_plots_and_overlays(tmp_path):
    assert nice_ticks(0.13, 0.87) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(1, 3, integer=True) == [1, 2, 3]
    path = line_plot({"train": ([1, 2, 3], [1.0, 0.5, float("nan")]), "val": ([1, 2, 3], [0.9, 0.7, 0.6])},
                     tmp_path / "p.png", title="loss", xlabel="epoch", ylabel="loss")
    assert Image.open(path).size == (720, 440)
    images = torch.rand(2, 3, 16, 16)
    masks = (torch.rand(2, 16, 16) > 0.5).long()
    grid = Image.open(overlay_grid(images, masks, 1 - masks, tmp_path / "o.png"))
    assert grid.size[0] > 3 * 160 and grid.size[1] > 2 * 160


# --- CUDA (runs only where a GPU is present) -------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("amp", [None, "float16", "bfloat16"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", ["lightawnet", "lgmsnet"])
def test_seed_models_train_on_the_gpu(data, tmp_path, name, backend, amp):
    """Both models train on the GPU on each fused backend, in float32 and under autocast
    (float16 with the gradient scaler, which only a GPU runs): finite losses and weights, a
    checkpoint, and LightAWNet in float32 learns (as test_a_seed_model_learns on the CPU)."""
    if name == "lgmsnet":
        ids = [f"synthetic_{i:04d}" for i in range(16)]
        common = dict(size=32, channels=3, intensity="imagenet")
        train_set, val_set = (ImageDataset(data, case_ids=ids[:12], **common),
                              ImageDataset(data, case_ids=ids[12:], **common))
    else:
        train_set, val_set = datasets(data)
    make_recipe = lgmsnet_recipe if name == "lgmsnet" else lightawnet_recipe
    epochs = 3 if (name, amp) == ("lightawnet", None) else 1
    torch.manual_seed(0)
    trainer = Trainer(name, train_set, val_set,
                      make_recipe(lr=2e-3, epochs=epochs, batch_size=4, size=32, backend=backend,
                                  amp=amp),
                      tmp_path, progress=False)
    assert trainer.device.type == "cuda"
    history = trainer.fit()["history"]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in history)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert (tmp_path / "last.pt").exists()
    if epochs > 1:
        assert history[-1]["train_loss"] < history[0]["train_loss"]
        assert history[-1]["val_dice"] > history[0]["val_dice"]
