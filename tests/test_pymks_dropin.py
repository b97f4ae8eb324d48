"""pymks 0.4.1's own correlation tests and doctests, run with pymks-vae swapped in for PyMKS.

The installed pymks package ships its tests (``pymks/fmks/tests``) and doctests. Every test module
of it that calls a correlation entry point (``two_point_stats``, ``correlations_multiple``,
``TwoPointCorrelation``) and every doctest of ``pymks.fmks.correlations`` runs twice: with PyMKS
itself (the baseline: what passes there must pass with ours) and with pymks-vae's functions
swapped in wherever the test looks them up (the test module, ``pymks.fmks.correlations`` and the
top-level ``pymks``). The few differences are listed below with their reasons (docs/pymks.md,
"Drop-in differences").
"""
import doctest
import glob
import importlib.util
import os
import warnings

import numpy as np
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pymks = pytest.importorskip("pymks", reason="pymks is not installed (it installs on Python 3.11 only)")
    import pymks.fmks.correlations as pymks_correlations

from pymks_vae import correlations as ours
from pymks_vae.transformers import TwoPointCorrelation

OURS = {
    "two_point_stats": ours.two_point_stats,
    "correlations_multiple": ours.correlations_multiple,
    "TwoPointCorrelation": TwoPointCorrelation,
}
PYMKS_TESTS = os.path.join(os.path.dirname(pymks.__file__), "fmks", "tests")


class _Flatten:
    """PyMKS's FlattenTransformer, which scikit-learn >= 1.2 cannot call (a staticmethod ``transform``
    wrapped by set_output): stands in for it so the pipeline test reaches the correlation step."""

    def fit(self, *_):
        return self

    def transform(self, x):
        return x.reshape(len(x), -1)

    def fit_transform(self, x, y=None):
        return self.transform(x)


# Not a correlation entry point: repaired for both implementations alike.
REPAIRS = {"FlattenTransformer": _Flatten}


def _modules_calling_correlations():
    found = {}
    for path in sorted(glob.glob(os.path.join(PYMKS_TESTS, "test_*.py"))):
        with open(path) as f:
            source = f.read()
        if any(name in source for name in OURS):
            found[os.path.splitext(os.path.basename(path))[0]] = path
    return found


def _load(name, path):
    spec = importlib.util.spec_from_file_location(f"pymks_own_tests.{name}", path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec.loader.exec_module(module)
    return module


MODULES = {name: _load(name, path) for name, path in _modules_calling_correlations().items()}
TESTS = [(m, t) for m, module in MODULES.items() for t in sorted(vars(module)) if t.startswith("test_")]


def _swap(monkeypatch, impl, *namespaces):
    """Point every place a pymks test looks the entry points up at ``impl``'s."""
    for namespace in (pymks, pymks_correlations) + namespaces:
        for name, repair in REPAIRS.items():
            if hasattr(namespace, name):
                monkeypatch.setattr(namespace, name, repair)
        if impl == "pymks_vae":
            for name, value in OURS.items():
                if hasattr(namespace, name):
                    monkeypatch.setattr(namespace, name, value)


def test_the_pymks_suite_is_found():
    """Guards against a silent empty run (a moved or renamed pymks test directory)."""
    assert {"test_twopoint", "test_pair_correlations", "test_homogenization_fmks"} <= set(MODULES)
    assert len(TESTS) >= 14


@pytest.mark.parametrize("impl", ["pymks", "pymks_vae"])
@pytest.mark.parametrize("module,test", TESTS, ids=[f"{m}::{t}" for m, t in TESTS])
def test_pymks_own_tests(monkeypatch, module, test, impl):
    _swap(monkeypatch, impl, MODULES[module])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymks's deprecations and numpy's 0/0 warnings are not under test
        getattr(MODULES[module], test)()


def test_the_swap_reaches_the_pymks_tests(monkeypatch):
    """The swapped entry points are the ones the pymks tests call (else the run above proves nothing)."""
    calls = []

    def spy(name):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return OURS[name](*args, **kwargs)
        return wrapped

    module = MODULES["test_twopoint"]
    _swap(monkeypatch, "pymks_vae", module)
    for namespace in (pymks_correlations, module):
        for name in ("two_point_stats", "correlations_multiple"):
            if hasattr(namespace, name):
                monkeypatch.setattr(namespace, name, spy(name))
    module.test_onedim()
    module.test_correlations_multiple()
    MODULES["test_pair_correlations"].test_non_periodic_masking()
    assert calls.count("two_point_stats") == 2 + 2 and calls.count("correlations_multiple") == 1


# ----------------------------------------------------------------------------- doctests
# Examples whose output differs on purpose: (doctest name, first line of the example) -> why.
DELIBERATE = {
    ("pymks.fmks.correlations.two_point_stats", "two_point_stats(array, array, mask=mask)"):
        "a mask outside [0, 1] raises pymks_vae's MaskRangeError, a ValueError and a RuntimeError (so "
        "`except RuntimeError` still catches it) with a message naming the values; the doctest compares the "
        "printed class name and message",
}
# Examples that fail with PyMKS itself on today's stack: (doctest name, first line) -> why.
BROKEN_IN_PYMKS = {
    ("pymks.fmks.correlations.FlattenTransformer", "FlattenTransformer().transform(data).shape"):
        "pymks 0.4.1's FlattenTransformer.transform is a staticmethod, which scikit-learn >= 1.2's set_output "
        "wrapper calls with self (TypeError); not a correlation entry point",
}
DOCTESTS = {t.name: t for t in doctest.DocTestFinder().find(pymks_correlations) if t.examples}


class _Recorder(doctest.DocTestRunner):
    """Collects the failing examples instead of printing them."""

    def __init__(self):
        super().__init__(optionflags=doctest.ELLIPSIS, verbose=False)
        self.failed = {}

    def report_failure(self, out, test, example, got):
        self.failed[example.source.splitlines()[0]] = f"expected {example.want!r}, got {got!r}"

    def report_unexpected_exception(self, out, test, example, exc_info):
        self.failed[example.source.splitlines()[0]] = exc_info[1]


@pytest.mark.parametrize("impl", ["pymks", "pymks_vae"])
@pytest.mark.parametrize("name", sorted(DOCTESTS))
def test_pymks_own_doctests(name, impl):
    test = DOCTESTS[name]
    globs = dict(test.globs)
    if impl == "pymks_vae":
        globs.update(OURS)
    runner = _Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner.run(doctest.DocTest(test.examples, globs, test.name, test.filename, test.lineno, test.docstring),
                   out=lambda _: None)
    expected = {line for (doc, line) in BROKEN_IN_PYMKS if doc == name}
    if impl == "pymks_vae":
        expected |= {line for (doc, line) in DELIBERATE if doc == name}
    assert set(runner.failed) == expected, runner.failed
    if impl == "pymks_vae" and name.endswith(".two_point_stats"):
        # the deliberate difference is only the printed name: it is still the RuntimeError PyMKS raised
        got = runner.failed["two_point_stats(array, array, mask=mask)"]
        assert "MaskRangeError: mask values must lie in [0, 1]" in got
        assert issubclass(ours.MaskRangeError, RuntimeError) and issubclass(ours.MaskRangeError, ValueError)


def test_every_listed_difference_exists():
    """A listed difference whose doctest is gone would hide nothing: keep the lists honest."""
    for doc, line in list(DELIBERATE) + list(BROKEN_IN_PYMKS):
        assert doc in DOCTESTS and any(e.source.startswith(line) for e in DOCTESTS[doc].examples), (doc, line)


def test_swapped_in_transformer_is_stateless_like_pymks(rng):
    """PyMKS code style: construct and transform, or fit() with no data."""
    x = rng.random((2, 9, 9, 2))
    swapped = TwoPointCorrelation(periodic_boundary=False, cutoff=2)
    np.testing.assert_allclose(swapped.transform(x), np.asarray(
        pymks.TwoPointCorrelation(periodic_boundary=False, cutoff=2).transform(x)), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(swapped.fit().transform(x), swapped.transform(x), rtol=0)
