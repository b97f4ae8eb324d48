"""End-to-end smoke test of examples/train_lines.py on a tiny configuration."""
import importlib.util
import json
import os

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_lines.py")

KEYS = ("stats_mse_median", "stats_mse_mean", "data_mse_median", "data_mse_mean", "orientation_accuracy",
        "line_count_accuracy", "vf_diff_mean_percent", "nn_image_line_count_accuracy",
        "nn_stats_line_count_accuracy", "overfitting")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_lines_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_output(example, tmp_path):
    out = tmp_path / "lines"
    argv = ["--image-size", "32", "--n-images", "40", "--epochs", "1", "--eval-images", "8", "--out", str(out),
            "--no-progress", "--seed", "3"]
    metrics = example.main(argv)

    with open(out / "metrics.json") as fh:
        saved = json.load(fh)
    assert saved["config"]["image_size"] == 32 and saved["config"]["n_images"] == 40
    assert saved["n_train"] + saved["n_val"] == 40
    assert saved["world_size"] == 1 and saved["global_batch_size"] == 32  # one process, the preset's batch
    for model in ("spatial_stats", "vanilla"):
        for key in KEYS:
            assert key in saved[model], (model, key)
        assert saved[model]["n_evaluated"] == 8
        assert 0.0 <= saved[model]["orientation_accuracy"] <= 1.0
        assert saved[model]["stats_mse_median"] >= 0.0
        assert saved[model]["training"]["epochs"] == 1
        assert os.path.isfile(out / "checkpoints" / f"{model}.pt")
    assert saved["spatial_stats"]["stats_mse_median"] == metrics["spatial_stats"]["stats_mse_median"]
    report = (out / "report.md").read_text()
    assert "paper" in report and "spatial_stats" in report and "vanilla" in report
    assert saved["figures"]
    for rel in saved["figures"].values():
        path = out / rel
        assert path.suffix == ".png" and path.stat().st_size > 1000, rel
        assert f"]({rel})" in report

    # --resume with the finished checkpoints trains nothing more and gives the same models
    again = example.main(argv + ["--resume"])
    assert again["spatial_stats"]["stats_mse_median"] == metrics["spatial_stats"]["stats_mse_median"]
    assert again["vanilla"]["data_mse_median"] == metrics["vanilla"]["data_mse_median"]


def test_bad_flags_are_refused(example, tmp_path):
    with pytest.raises(SystemExit):
        example.parse_args(["--epochs", "0"])
    with pytest.raises(SystemExit):
        example.parse_args(["--config", "paper"])  # no --weights
    cfg, _ = example.parse_args(["--config", "paper", "--weights", "w.pth"])
    assert (cfg.image_size, cfg.n_images, cfg.encoder, cfg.decoder, cfg.latent_dim, cfg.epochs, cfg.batch_size,
            cfg.lr) == (224, 100_000, "resnet152", "paper", 9, 1500, 32, 1e-3)
    # the paper's configuration keeps the same loss balance as the CPU default (issue: size-free defaults)
    assert (cfg.normalise, cfg.beta, cfg.cutoff) == ("variance", None, "auto")
    for bad in (["--cutoff", "wide"], ["--cutoff", "-1"], ["--beta", "-1"], ["--lr", "0"]):
        with pytest.raises(SystemExit):
            example.parse_args(bad)
    cfg, _ = example.parse_args(["--beta", "0.01", "--cutoff", "5", "--indicator", "gaussian", "--decoder", "cnn"])
    assert (cfg.beta, cfg.cutoff, cfg.indicator, cfg.decoder) == (0.01, 5, "gaussian", "cnn")
    # the strokes draw black and white by default; --no-binary-strokes keeps the grey drawing
    assert example.parse_args([])[0].binary_strokes is True
    assert example.parse_args(["--no-binary-strokes"])[0].binary_strokes is False
    cfg = example.parse_args(["--image-size", "32", "--decoder", "strokes"])[0]
    model, _ = example.make_model_and_loss("spatial_stats", cfg, None)
    assert model.config["stroke_binary"] is True
    # the default spatial-statistics model decodes statistics (a StatsVAE), its loss their unexplained variance
    cfg = example.parse_args([])[0]
    assert (cfg.decoder, cfg.latent_dim) == ("statistics", 32)
    for bad in (["--n-basis", "0"], ["--draw-restarts", "0"], ["--draw-steps", "0"]):
        with pytest.raises(SystemExit):
            example.parse_args(bad)


def test_large_configurations_stream_from_the_disk_cache(example, tmp_path, monkeypatch):
    monkeypatch.setattr(example, "IN_MEMORY_BYTES", 0)  # as if the images did not fit in memory
    out = tmp_path / "cached"
    metrics = example.main(["--image-size", "32", "--n-images", "30", "--epochs", "1", "--eval-images", "6",
                            "--out", str(out), "--no-progress"])
    assert os.listdir(out / "cache")  # the images were drawn into the cache and read back from it
    assert metrics["spatial_stats"]["n_evaluated"] == 6
    assert metrics["n_train"] + metrics["n_val"] == 30


def test_route_chooser_is_pinned_unless_the_user_set_it(example, monkeypatch):
    """A run's statistics must not depend on how busy the machine was (measured route costs)."""
    import torch

    from pymks_vae import ops

    monkeypatch.delenv("PYMKS_VAE_ROUTE_COSTS", raising=False)
    with example.pinned_binary_route():
        assert os.environ["PYMKS_VAE_ROUTE_COSTS"] == "fitted"
        x = (torch.rand(4, 1, 32, 32) > 0.5).float()
        ops.two_point_stats(x, [(0, 0)])  # a binary call under the pinned costs
        assert ops.binary_route_calibration()["source"] == "fitted"
    assert "PYMKS_VAE_ROUTE_COSTS" not in os.environ  # put back for the caller's process
    monkeypatch.setenv("PYMKS_VAE_ROUTE_COSTS", "measure")
    with example.pinned_binary_route():
        assert os.environ["PYMKS_VAE_ROUTE_COSTS"] == "measure"  # the user's choice is kept
    assert os.environ["PYMKS_VAE_ROUTE_COSTS"] == "measure"


def test_small_grid_transforms_follow_their_rule_in_a_run(example, monkeypatch):
    """Nor on a timing of the matrix products against MKL (grids such as 51^2)."""
    import torch

    from pymks_vae import _extension, ops

    C = _extension._C
    monkeypatch.delenv("PYMKS_VAE_GEMM_DFT", raising=False)
    C._clear_gemm_dft_trials()
    try:
        with example.pinned_binary_route():
            assert os.environ["PYMKS_VAE_GEMM_DFT"] == "rule"
            ops.two_point_stats(torch.rand(4, 1, 51, 51), [(0, 0)])
            assert C._gemm_dft_trials() == 0  # no trial ran
        assert "PYMKS_VAE_GEMM_DFT" not in os.environ
        ops.two_point_stats(torch.rand(4, 1, 51, 51), [(0, 0)])
        assert C._gemm_dft_trials() > 0  # the control: outside the run the first call is timed
        monkeypatch.setenv("PYMKS_VAE_GEMM_DFT", "0")
        with example.pinned_binary_route():
            assert os.environ["PYMKS_VAE_GEMM_DFT"] == "0"  # the user's choice is kept
    finally:
        C._clear_gemm_dft_trials()
