"""Tests of pymks_vae.training: learning, exact resume, atomic checkpoints, clear errors."""
import os

import numpy as np
import pytest
import torch

from pymks_vae.datasets import LinesDataset, generate_lines
from pymks_vae.losses import DataSpaceLoss, SpatialStatsLoss
from pymks_vae.models import VAE
from pymks_vae.training import (CheckpointError, TrainConfig, evaluate_loss, load_checkpoint, load_model,
                                lr_at_epoch, reconstruct, save_checkpoint, train_vae)

SIZE = 32


@pytest.fixture(scope="module")
def lines():
    images, _, _ = generate_lines(range(48), size=SIZE, seed=5)
    return torch.from_numpy(images)[:, None]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return VAE(latent_dim=3, image_size=SIZE)


def config(tmp_path=None, **kw):
    base = dict(epochs=4, batch_size=8, progress=False)
    if tmp_path is not None:
        base["checkpoint_path"] = str(tmp_path / "ckpt.pt")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("loss_fn", [SpatialStatsLoss.paper(scale=5.0), DataSpaceLoss()], ids=["stats", "data"])
def test_training_lowers_the_loss(lines, loss_fn):
    model = tiny_model()
    before = evaluate_loss(model, loss_fn, lines)
    history = train_vae(model, loss_fn, lines, config(epochs=6))
    after = evaluate_loss(model, loss_fn, lines)
    assert history["train_loss"][-1] < 0.9 * history["train_loss"][0]
    assert after < 0.6 * before
    assert not model.training  # returned in eval mode


def test_history_contents(lines, tmp_path):
    history = train_vae(tiny_model(), SpatialStatsLoss.paper(scale=5.0), lines, config(tmp_path, epochs=3),
                        val_data=lines[:10])
    assert history["epochs"] == 3
    assert len(history["train_loss"]) == len(history["val_loss"]) == 3
    assert set(history["train_parts"]) == {"stats", "kl"}
    parts = history["train_parts"]
    # the total is the sum of its parts (alpha = beta = 1), per sample
    np.testing.assert_allclose(np.add(parts["stats"], parts["kl"]), history["train_loss"], rtol=1e-5)
    assert history["lr"] == [1e-3, 1e-3, 5e-4]  # last 10% of epochs (rounded up) at half lr
    assert history["images_seen"] == 3 * 48
    assert history["seconds"] > 0 and history["images_per_second"] > 0
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain types only
    assert ckpt["epoch"] == 3 and ckpt["history"]["train_loss"] == history["train_loss"]
    assert ckpt["model_config"]["image_size"] == [SIZE, SIZE]


def test_lr_schedule():
    cfg = TrainConfig(epochs=1500)
    assert lr_at_epoch(cfg, 1349) == 1e-3 and lr_at_epoch(cfg, 1350) == 5e-4
    assert lr_at_epoch(TrainConfig(epochs=4, lr_halving=False), 3) == 1e-3


def _interrupt_at(epoch):
    def callback(done, history):
        if done == epoch:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("how", ["max_epochs_this_call", "callback_raises"])
def test_resume_is_bit_identical(lines, tmp_path, how):
    loss_fn = SpatialStatsLoss.paper(scale=5.0)
    ref_model = tiny_model()
    ref = train_vae(ref_model, loss_fn, lines, config(tmp_path / "a"), val_data=lines[:8])

    path_b = tmp_path / "b"
    first = tiny_model()
    if how == "max_epochs_this_call":
        part = train_vae(first, loss_fn, lines, config(path_b, max_epochs_this_call=2), val_data=lines[:8])
        assert part["epochs"] == 2
    else:
        with pytest.raises(KeyboardInterrupt):
            train_vae(first, loss_fn, lines, config(path_b), val_data=lines[:8], callback=_interrupt_at(2))
    assert load_checkpoint(path_b / "ckpt.pt")["epoch"] == 2
    # a fresh process would build a fresh model and disturb the global RNGs: resume must not care
    torch.manual_seed(999)
    np.random.seed(999)
    resumed_model = tiny_model(seed=42)
    resumed = train_vae(resumed_model, loss_fn, lines, config(path_b), val_data=lines[:8], resume=True)

    assert resumed["epochs"] == 4
    assert resumed["train_loss"] == ref["train_loss"]
    assert resumed["val_loss"] == ref["val_loss"]
    for (k, a), (_, b) in zip(ref_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), k


def test_resume_of_a_finished_run_trains_nothing(lines, tmp_path):
    model = tiny_model()
    train_vae(model, DataSpaceLoss(), lines, config(tmp_path, epochs=2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    again = tiny_model(seed=7)
    history = train_vae(again, DataSpaceLoss(), lines, config(tmp_path, epochs=2), resume=True)
    assert history["epochs"] == 2 and len(history["train_loss"]) == 2
    for k, v in again.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_resume_without_checkpoint_file_starts_afresh(lines, tmp_path):
    history = train_vae(tiny_model(), DataSpaceLoss(), lines, config(tmp_path, epochs=1), resume=True)
    assert history["epochs"] == 1 and os.path.isfile(tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="checkpoint_path"):
        train_vae(tiny_model(), DataSpaceLoss(), lines, config(epochs=1), resume=True)


def test_checkpoint_of_another_model_is_refused(lines, tmp_path):
    train_vae(tiny_model(), DataSpaceLoss(), lines, config(tmp_path, epochs=1))
    torch.manual_seed(0)
    other = VAE(latent_dim=4, image_size=SIZE)
    with pytest.raises(CheckpointError, match="ckpt.pt.*latent_dim"):
        train_vae(other, DataSpaceLoss(), lines, config(tmp_path, epochs=2), resume=True)


def test_stroke_checkpoints_from_before_binary_strokes_resume(lines, tmp_path):
    """A stroke model saved before ``stroke_binary`` existed resumes as the grey model it was, not as a binary one."""
    torch.manual_seed(0)
    model = VAE(latent_dim=3, image_size=SIZE, decoder="strokes")
    train_vae(model, DataSpaceLoss(), lines, config(tmp_path, epochs=1))
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    del ckpt["model_config"]["stroke_binary"], ckpt["model_config"]["stroke_layout"]
    save_checkpoint(tmp_path / "ckpt.pt", ckpt)
    torch.manual_seed(0)
    grey = VAE(latent_dim=3, image_size=SIZE, decoder="strokes")
    assert train_vae(grey, DataSpaceLoss(), lines, config(tmp_path, epochs=2), resume=True)["epochs"] == 2
    torch.manual_seed(0)
    binary = VAE(latent_dim=3, image_size=SIZE, decoder="strokes", stroke_binary=True)
    with pytest.raises(CheckpointError, match="stroke_binary"):
        train_vae(binary, DataSpaceLoss(), lines, config(tmp_path, epochs=3), resume=True)


def test_atomic_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"version": 1, "w": torch.arange(5)})
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # a partial write, then the disk "fails"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"version": 2, "w": torch.arange(7)})
    monkeypatch.setattr(torch, "save", real_save)
    kept = torch.load(path, weights_only=True)
    assert kept["version"] == 1 and torch.equal(kept["w"], torch.arange(5))
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind


def test_corrupt_or_foreign_checkpoint_errors_name_the_file(lines, tmp_path):
    train_vae(tiny_model(), DataSpaceLoss(), lines, config(tmp_path, epochs=1))
    good = (tmp_path / "ckpt.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt.*corrupt or truncated"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="truncated.pt"):
        train_vae(tiny_model(), DataSpaceLoss(), lines, config(epochs=2, checkpoint_path=str(truncated)),
                  resume=True)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_model(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(3)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt.*not a pymks_vae"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")


def test_load_model_reproduces_the_trained_model(lines, tmp_path):
    model = tiny_model()
    train_vae(model, SpatialStatsLoss.paper(scale=5.0), lines, config(tmp_path, epochs=2))
    loaded = load_model(tmp_path / "ckpt.pt")
    assert loaded.config == model.config and not loaded.training
    torch.testing.assert_close(reconstruct(loaded, lines[:5]), reconstruct(model, lines[:5]), rtol=0, atol=0)


def test_dataset_and_callable_inputs(tmp_path):
    ds = LinesDataset(20, size=SIZE, seed=1)  # items (image, orientation, n_lines)
    h = train_vae(tiny_model(), DataSpaceLoss(), ds, config(epochs=2, batch_size=6))
    assert h["epochs"] == 2 and h["images_seen"] == 2 * 20
    batches = [torch.from_numpy(generate_lines(range(s, s + 5), size=SIZE)[0])[:, None] for s in (0, 5, 10)]
    h = train_vae(tiny_model(), DataSpaceLoss(), lambda: iter(batches), config(epochs=2),
                  val_data=lambda: iter(batches))
    assert h["images_seen"] == 30 and len(h["val_loss"]) == 2
    # a one-image batch cannot be normalised by BatchNorm: it is skipped
    h = train_vae(tiny_model(), DataSpaceLoss(), torch.rand(9, 1, SIZE, SIZE), config(epochs=1, batch_size=4))
    assert h["images_seen"] == 8


def test_bad_inputs(lines):
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=2.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU"):
            TrainConfig(device="cuda")
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu-ish")
    with pytest.raises(TypeError, match="train_data"):
        train_vae(tiny_model(), DataSpaceLoss(), [1, 2, 3], config())
    with pytest.raises(ValueError, match=r"\(n, C, H, W\)"):
        train_vae(tiny_model(), DataSpaceLoss(), torch.rand(4, SIZE, SIZE), config())
    with pytest.raises(ValueError, match="training batch.*32, 32"):
        train_vae(tiny_model(), DataSpaceLoss(), torch.rand(4, 1, 16, 16), config())
    with pytest.raises(TypeError, match="TrainConfig"):
        train_vae(tiny_model(), DataSpaceLoss(), lines, {"epochs": 1})
    with pytest.raises(TypeError, match="VAE"):
        train_vae(torch.nn.Linear(2, 2), DataSpaceLoss(), lines, config())


def test_training_leaves_the_callers_random_state_alone(lines):
    import random

    model = tiny_model()  # seeds torch itself: build it first
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    train_vae(model, DataSpaceLoss(), lines, config(epochs=1, seed=7))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_batchmean_loss_history_is_per_sample(lines):
    """A loss averaged over the batch ("batchmean") records the same per-sample history as its sum."""
    mean_loss = SpatialStatsLoss(scale=3.0, cutoff=None)
    sum_loss = SpatialStatsLoss(scale=3.0, cutoff=None, reduction="sum")
    assert evaluate_loss(tiny_model(), mean_loss, lines) == pytest.approx(evaluate_loss(tiny_model(), sum_loss, lines),
                                                                          rel=1e-5)
    # a vanishing learning rate: both runs see the same model, batches and noise
    h_mean = train_vae(tiny_model(), mean_loss, lines, config(epochs=1, lr=1e-12))
    h_sum = train_vae(tiny_model(), sum_loss, lines, config(epochs=1, lr=1e-12))
    assert h_mean["train_loss"][0] == pytest.approx(h_sum["train_loss"][0], rel=1e-5)
    assert h_mean["train_parts"]["stats"][0] == pytest.approx(h_sum["train_parts"]["stats"][0], rel=1e-5)
