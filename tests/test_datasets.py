"""The lines dataset: geometry measured back from the pixels, determinism, scaling, cache, dask."""
import dataclasses
import os

import numpy as np
import pytest
import scipy.ndimage
import torch

from optional import require
from pymks_vae.datasets import (
    BACKGROUND,
    HORIZONTAL,
    LINE,
    VERTICAL,
    LinesConfig,
    LinesDataset,
    generate_lines,
    line_layouts,
    lines_dataarray,
    lines_labels,
    train_val_split,
)
from pymks_vae.datasets import lines as lines_module


def measure(image):
    """Rectangles (r0, r1, c0, c1) of the line pixels of one image, found independently."""
    labels, count = scipy.ndimage.label(image == LINE)
    rects = []
    for j, (rs, cs) in enumerate(scipy.ndimage.find_objects(labels), start=1):
        area = int((labels == j).sum())
        # every component must be one solid rectangle (two lines never touch)
        assert area == (rs.stop - rs.start) * (cs.stop - cs.start)
        rects.append((rs.start, rs.stop, cs.start, cs.stop))
    return rects


def gap(a0, a1, b0, b1):
    """Background pixels between half-open intervals [a0, a1) and [b0, b1) (negative: overlap)."""
    return max(b0 - a1, a0 - b1)


def check_geometry(images, orientation, n_lines, cfg):
    widths, lengths = [], []
    for img, o, n in zip(images, orientation, n_lines):
        assert set(np.unique(img)) <= {LINE, BACKGROUND}
        rects = measure(img)
        assert len(rects) == n
        assert 1 <= n <= cfg.max_lines  # the first line always fits; dropped lines only lower n
        for r0, r1, c0, c1 in rects:
            h, w = r1 - r0, c1 - c0
            # one orientation per image, read off the shapes
            assert (w > h) if o == HORIZONTAL else (h > w)
            widths.append(min(h, w))
            lengths.append(max(h, w))
        for i in range(len(rects)):
            for j in range(i + 1, len(rects)):
                a, b = rects[i], rects[j]
                across = gap(a[0], a[1], b[0], b[1]) if o == HORIZONTAL else gap(a[2], a[3], b[2], b[3])
                along = gap(a[2], a[3], b[2], b[3]) if o == HORIZONTAL else gap(a[0], a[1], b[0], b[1])
                if along < 0:  # extents overlap: they must be spacing apart across
                    assert across >= cfg.spacing
                else:  # also never closer than spacing end to end
                    assert max(across, along) >= cfg.spacing
    widths, lengths = np.array(widths), np.array(lengths)
    assert widths.min() >= cfg.min_width and widths.max() <= cfg.max_width
    assert lengths.min() >= cfg.min_length and lengths.max() <= cfg.max_length
    return widths, lengths


@pytest.mark.parametrize("size,n", [(224, 600), (64, 1500)])
def test_geometry_matches_labels_and_config(size, n):
    images, orientation, n_lines = generate_lines(range(n), size=size, seed=11)
    assert images.shape == (n, size, size) and images.dtype == np.float32
    assert orientation.dtype == np.int64 and n_lines.dtype == np.int64
    cfg = LinesConfig().scaled(size)
    widths, lengths = check_geometry(images, orientation, n_lines, cfg)
    # the random draws cover their ranges (not a degenerate generator)
    assert set(np.unique(n_lines)) == set(range(1, 5))
    assert set(np.unique(orientation)) == {HORIZONTAL, VERTICAL}
    assert 0.4 < orientation.mean() < 0.6
    assert set(np.unique(widths)) == set(range(cfg.min_width, cfg.max_width + 1))
    assert lengths.min() <= cfg.min_length + (cfg.max_length - cfg.min_length) // 10
    assert lengths.max() >= cfg.max_length - (cfg.max_length - cfg.min_length) // 10
    # placement reaches both borders of the image
    line_any = (images == LINE)
    assert line_any[:, 0, :].any() and line_any[:, -1, :].any()
    assert line_any[:, :, 0].any() and line_any[:, :, -1].any()


def test_scaling_rule():
    base = LinesConfig()
    for size in (32, 64, 100, 448):
        cfg = base.scaled(size)
        f = size / base.size
        for name in ("min_width", "max_width", "min_length", "max_length", "spacing"):
            expected = max(1, min(size, int(round(getattr(base, name) * f))))
            assert getattr(cfg, name) == expected, (size, name)
        assert (cfg.min_lines, cfg.max_lines, cfg.max_tries) == (base.min_lines, base.max_lines, base.max_tries)
    assert base.scaled(224) == base
    cfg64 = base.scaled(64)
    assert cfg64.min_width >= 1 and cfg64.spacing >= 1 and cfg64.max_length <= 64


def test_dropped_lines_are_not_counted():
    # At most two 5-px lines fit across 32 px with a 10-px spacing, and none end to end.
    cfg = LinesConfig(size=32, min_lines=4, max_lines=4, min_width=5, max_width=5, min_length=20,
                      max_length=20, spacing=10, max_tries=50)
    images, orientation, n_lines = generate_lines(range(300), size=32, config=cfg, seed=2)
    assert n_lines.max() == 2 and n_lines.min() >= 1
    check_geometry(images, orientation, n_lines, cfg)
    # fewer tries drop more lines
    few = dataclasses.replace(cfg, max_tries=1)
    assert generate_lines(range(300), size=32, config=few, seed=2)[2].sum() < n_lines.sum()


def test_short_lines_keep_spacing_end_to_end():
    # Short lines in a crowded image: collinear neighbours are common, and must stay apart too.
    cfg = LinesConfig(size=48, min_lines=6, max_lines=8, min_width=2, max_width=3, min_length=8,
                      max_length=16, spacing=4, max_tries=50)
    images, orientation, n_lines = generate_lines(range(300), size=48, config=cfg, seed=1)
    check_geometry(images, orientation, n_lines, cfg)
    assert n_lines.max() >= 7


def test_deterministic_per_seed_and_index():
    batch, o, n = generate_lines(range(40), size=64, seed=5)
    picked = [31, 2, 17, 2]
    again, o2, n2 = generate_lines(picked, size=64, seed=5)
    np.testing.assert_array_equal(again, batch[picked])
    np.testing.assert_array_equal(o2, o[picked])
    np.testing.assert_array_equal(n2, n[picked])
    single = generate_lines(np.int64(17), size=64, seed=5)[0]
    np.testing.assert_array_equal(single[0], batch[17])
    other = generate_lines(range(40), size=64, seed=6)[0]
    assert sum(not np.array_equal(a, b) for a, b in zip(batch, other)) >= 35
    # images differ from one index to the next
    assert sum(not np.array_equal(batch[i], batch[i + 1]) for i in range(39)) >= 35


def test_labels_and_layouts_match_images():
    images, o, n = generate_lines(range(100, 160), size=64, seed=3)
    o2, n2 = lines_labels(range(100, 160), size=64, seed=3)
    np.testing.assert_array_equal(o, o2)
    np.testing.assert_array_equal(n, n2)
    for img, (orientation, rects) in zip(images, line_layouts(range(100, 160), size=64, seed=3)):
        frame = img if orientation == HORIZONTAL else img.T
        assert sorted(measure(frame)) == sorted(rects)


def test_empty_indices():
    images, o, n = generate_lines([], size=32)
    assert images.shape == (0, 32, 32) and o.shape == (0,) and n.shape == (0,)


def test_dataset_items_match_generator():
    ds = LinesDataset(30, size=48, seed=9)
    images, o, n = generate_lines(range(30), size=48, seed=9)
    assert len(ds) == 30
    for i in (0, 7, 29):
        img, orientation, n_lines = ds[i]
        assert isinstance(img, torch.Tensor) and img.dtype == torch.float32 and img.shape == (1, 48, 48)
        assert type(orientation) is int and type(n_lines) is int
        np.testing.assert_array_equal(img[0].numpy(), images[i])
        assert (orientation, n_lines) == (o[i], n[i])
    np.testing.assert_array_equal(ds[-1][0][0].numpy(), images[29])
    np.testing.assert_array_equal(ds.images([3, 1, 3]), images[[3, 1, 3]])
    lo, ln = ds.labels()
    np.testing.assert_array_equal(lo, o)
    np.testing.assert_array_equal(ln, n)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)))
    assert batch[0].shape == (8, 1, 48, 48)
    np.testing.assert_array_equal(batch[2].numpy(), n[:8])
    with pytest.raises(IndexError):
        ds[30]
    with pytest.raises(IndexError):
        ds[-31]
    with pytest.raises(IndexError):
        ds.images([0, 30])
    with pytest.raises(TypeError):
        ds[1.5]


def test_dataset_cache_round_trip(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = LinesDataset(40, size=40, seed=4, cache_dir=cache, chunk_size=16)
    images, o, n = generate_lines(range(40), size=40, seed=4)
    got = np.stack([ds[i][0][0].numpy() for i in range(40)])
    np.testing.assert_array_equal(got, images)
    assert [ds[i][1:] for i in range(40)] == list(zip(o.tolist(), n.tolist()))
    files = sorted(os.listdir(cache))
    assert len(files) == 3 and all(f.endswith(".npz") for f in files)  # no stray temporary files
    assert all(os.path.join(cache, f) in {ds.chunk_path(c) for c in range(3)} for f in files)

    # A new dataset with the same seed/size/config reads the files without generating anything.
    def boom(*args, **kwargs):
        raise AssertionError("generated although cached")

    monkeypatch.setattr(lines_module, "generate_lines", boom)
    again = LinesDataset(35, size=40, seed=4, cache_dir=cache, chunk_size=16)
    np.testing.assert_array_equal(again.images(range(35)), images[:35])
    # a different seed must not reuse them
    other = LinesDataset(40, size=40, seed=5, cache_dir=cache, chunk_size=16)
    with pytest.raises(AssertionError, match="generated although cached"):
        other[0]
    monkeypatch.undo()
    assert other.chunk_path(0) != ds.chunk_path(0)
    assert LinesDataset(40, size=40, seed=4, cache_dir=cache, chunk_size=16,
                        config=LinesConfig(max_lines=3)).chunk_path(0) != ds.chunk_path(0)

    # a damaged chunk is regenerated
    with open(ds.chunk_path(1), "wb") as fh:
        fh.write(b"not an npz")
    fresh = LinesDataset(40, size=40, seed=4, cache_dir=cache, chunk_size=16)
    np.testing.assert_array_equal(fresh[20][0][0].numpy(), images[20])


def test_dataarray_is_lazy_and_matches(monkeypatch):
    require("dask")
    require("xarray")
    calls = []
    original = lines_module._draw_block

    def counting(block, *args, **kwargs):
        calls.append(len(block))
        return original(block, *args, **kwargs)

    monkeypatch.setattr(lines_module, "_draw_block", counting)
    arr = lines_dataarray(25, size=32, seed=8, chunks=10)
    assert calls == []  # building the array draws nothing
    assert arr.dims == ("sample", "y", "x")
    assert arr.shape == (25, 32, 32) and arr.dtype == np.float32
    assert arr.data.chunks == ((10, 10, 5), (32,), (32,))
    images, o, n = generate_lines(range(25), size=32, seed=8)
    np.testing.assert_array_equal(arr["sample"].values, np.arange(25))
    np.testing.assert_array_equal(arr["orientation"].values, o)
    np.testing.assert_array_equal(arr["n_lines"].values, n)
    assert calls == []
    part = arr.isel(sample=slice(12, 18)).values
    np.testing.assert_array_equal(part, images[12:18])
    assert sum(calls) <= 20  # only the chunks touched
    np.testing.assert_array_equal(arr.values, images)


def test_train_val_split():
    train, val = train_val_split(1000)
    assert len(train) == 700 and len(val) == 300
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.union1d(train, val), np.arange(1000))
    t2, v2 = train_val_split(1000)
    np.testing.assert_array_equal(train, t2)
    np.testing.assert_array_equal(val, v2)
    t3, _ = train_val_split(1000, seed=1)
    assert not np.array_equal(train, t3)
    t4, v4 = train_val_split(10, val_fraction=0.2)
    assert (len(t4), len(v4)) == (8, 2)
    for bad in (1, 0, 2.5, "10"):
        with pytest.raises(ValueError, match="n_images"):
            train_val_split(bad)
    for bad in (0, 1, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="val_fraction"):
            train_val_split(10, val_fraction=bad)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(min_width=0), "min_width"),
        (dict(min_width=6, max_width=5), "max_width"),
        (dict(min_lines=3, max_lines=2), "max_lines"),
        (dict(max_length=300), "max_length"),
        (dict(spacing=-1), "spacing"),
        (dict(max_tries=0), "max_tries"),
        (dict(min_length=9), "min_length"),
        (dict(size=2.5), "size"),
        (dict(min_lines=True), "min_lines"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LinesConfig(**kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        generate_lines([0], size=0)
    with pytest.raises(ValueError, match="size"):
        generate_lines([0], size=2)  # too small for lines longer than wide
    with pytest.raises(ValueError, match="seed"):
        generate_lines([0], seed=-1)
    with pytest.raises(ValueError, match="indices"):
        generate_lines([[0, 1]])
    with pytest.raises(ValueError, match="indices"):
        generate_lines([-1])
    with pytest.raises(ValueError, match="indices"):
        generate_lines([0.5])
    with pytest.raises(TypeError, match="config"):
        generate_lines([0], config={"size": 224})
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="n_images"):
            LinesDataset(bad)


def test_dataarray_bad_arguments():
    require("dask")
    require("xarray")
    with pytest.raises(ValueError, match="n_images"):
        lines_dataarray(0)
    with pytest.raises(ValueError, match="chunks"):
        lines_dataarray(5, chunks=0)
    with pytest.raises(ValueError, match="size"):
        lines_dataarray(5, size=-1)
