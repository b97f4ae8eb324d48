"""The synthetic microstructure classes and a smoke run of examples/pymks_pipeline.py."""
import importlib.util
import json
import os
import warnings

import numpy as np
import pytest

from optional import require
from pymks_vae.microstructures import DEFAULT_CLASSES, generate_classes, generate_two_phase
from pymks_vae.transformers import TwoPointCorrelation


EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "pymks_pipeline.py")


# ----------------------------------------------------------------------------- generator
def test_deterministic_per_seed():
    a, ya = generate_classes(3, (16, 16), seed=7)
    b, yb = generate_classes(3, (16, 16), seed=7)
    c, _ = generate_classes(3, (16, 16), seed=8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a, c)
    assert ya.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert set(np.unique(a).tolist()) == {0.0, 1.0}


def test_volume_fraction_is_set_per_sample():
    x = generate_two_phase(5, (20, 30), sigma=2.0, volume_fraction=0.3, seed=1)
    assert x.shape == (5, 20, 30)
    np.testing.assert_allclose(x.mean(axis=(1, 2)), 0.3, atol=1.0 / 600)
    jittered = generate_two_phase(40, (20, 20), sigma=1.0, volume_fraction=0.5, volume_fraction_jitter=0.1, seed=2)
    fractions = jittered.mean(axis=(1, 2))
    assert fractions.min() >= 0.4 - 1e-9 and fractions.max() <= 0.6 + 1e-9 and fractions.std() > 0.02


def test_class_anisotropy_shows_in_the_statistics():
    x, y = generate_classes(10, (32, 32), seed=3)
    f = TwoPointCorrelation(correlations=[(1, 1)], cutoff=4).fit_transform(np.stack([1 - x, x], -1))[..., 0]
    c = 4
    along_axis1 = f[:, c, c + 3]  # lag of 3 pixels along axis 1 (x in an image plot)
    along_axis0 = f[:, c + 3, c]
    names = [k["name"] for k in DEFAULT_CLASSES]
    x_el, y_el, fine = names.index("x-elongated"), names.index("y-elongated"), names.index("fine")
    assert (along_axis1[y == x_el] > along_axis0[y == x_el]).all()
    assert (along_axis0[y == y_el] > along_axis1[y == y_el]).all()
    # coarse grains stay correlated further than fine ones; the coarse class has less phase 1
    coarse = names.index("coarse")
    vf = x.mean(axis=(1, 2))
    assert vf[y == coarse].mean() < vf[y == fine].mean() - 0.1
    corr_len = lambda k: (f[y == k, c, c + 3] - vf[y == k] ** 2) / (vf[y == k] - vf[y == k] ** 2)  # noqa: E731
    assert corr_len(coarse).mean() > corr_len(fine).mean()


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_samples=0), "n_samples"), (dict(shape=(1, 8)), "shape"), (dict(sigma=-1.0), "sigma"),
    (dict(volume_fraction=1.0), "volume_fraction"), (dict(volume_fraction=0.5, volume_fraction_jitter=0.6), "jitter"),
])
def test_generator_rejects_bad_arguments(kwargs, match):
    args = dict(n_samples=2, shape=(8, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate_two_phase(**args)


# ----------------------------------------------------------------------------- the example, tiny
def test_example_quick_run(tmp_path):
    require("pymks")  # installed by make setup; the example needs it
    import torch

    spec = importlib.util.spec_from_file_location("pymks_pipeline_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    try:
        payload = example.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    for name in ("results.json", "table.md", "microstructures.png", "latent_scatter.png", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"] == payload["results"]
    methods = {r["method"]: r for r in saved["results"]}
    assert set(methods) == {"VAE (spatial stats)", "2-point stats + PCA"}
    for r in methods.values():
        assert r["latent size"] in (2, 3)
        assert 0.0 <= r["test accuracy"] <= 1.0 and 0.0 <= r["cv accuracy"] <= 1.0
        assert np.isfinite(r["stats MSE"]) and r["stats MSE"] > 0
    # the classic statistics + PCA route separates these classes even at this size
    assert methods["2-point stats + PCA"]["test accuracy"] > 0.5
    assert set(saved["cv_accuracy_per_latent_size"]["VAE (spatial stats)"]) == {"2", "3"}
    assert "| VAE (spatial stats) |" in (tmp_path / "table.md").read_text()
