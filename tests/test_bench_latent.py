"""benchmarks/bench_latent.py --combine: runs on disjoint families merge into one table (no fits)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_latent  # noqa: E402


def _write_run(folder, families, seeds=(0, 1), **overrides):
    runs = []
    for fam in families:
        for seed in seeds:
            runs.append({"family": fam, "seed": seed, "method": "chance", "k": None, "accuracy": 0.25, "r2": 0.0,
                         "fit_seconds": 0.0})
            for method, acc in (("pca", 0.8 + 0.01 * seed), ("vae", 0.9 - 0.02 * seed)):
                runs.append({"family": fam, "seed": seed, "method": method, "k": 2, "accuracy": acc,
                             "r2": acc - 0.1, "fit_seconds": 1.0})
    settings = {"size": 64, "n_train": 300, "n_test": 300, "latent_dims": [2], "effective_seeds": list(seeds),
                "vae_params": None, "vanilla": False, "threads": 1, "families": list(families)}
    settings.update(overrides)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as fh:
        json.dump({"settings": settings, "machine": "test machine", "runs": runs, "seconds_total": 10.0}, fh)


def test_combine_merges_disjoint_runs(tmp_path):
    _write_run(tmp_path / "a", ["grf"])
    _write_run(tmp_path / "b", ["lamellae"])
    out = tmp_path / "merged"
    payload = bench_latent.main(["--combine", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert payload["settings"]["families"] == ["grf", "lamellae"]
    assert len(payload["runs"]) == 2 * 2 * 3
    table = (out / "table.md").read_text()
    assert "| grf |" in table and "| lamellae |" in table and "merged from 2 runs" in table
    cell = next(c for c in payload["cells"] if c["family"] == "lamellae" and c["method"] == "vae")
    assert cell["accuracy"] == pytest.approx({"mean": 0.89, "min": 0.88, "max": 0.90})
    assert (out / "latent_bench.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["combined_from"] == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_combine_refuses_mismatched_or_overlapping_runs(tmp_path):
    _write_run(tmp_path / "a", ["grf"])
    _write_run(tmp_path / "b", ["grf"])
    _write_run(tmp_path / "c", ["lamellae"], size=32)
    with pytest.raises(SystemExit, match="more than one run"):
        bench_latent.main(["--combine", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="differs .* in \\['size'\\]"):
        bench_latent.main(["--combine", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "o")])
