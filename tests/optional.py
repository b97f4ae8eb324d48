"""Optional test dependencies: skip, saying why, where a package is not installed at all.

The GPU machines lent to the project have no dask, distributed or pymks, and no package registry to
get them from (docs/benchmarks.md); there the tests that need them skip. Here, where `make setup`
installs them, nothing skips: a package that is installed but fails to import still fails the test.
"""
import importlib
import importlib.util

import pytest


def require(name):
    """Import a module, or skip the calling test (or test module) when its package is absent.

    Args:
        name: a module name, e.g. ``"dask"`` or ``"dask.array"``.

    Returns:
        the imported module.
    """
    top = name.partition(".")[0]
    if importlib.util.find_spec(top) is None:
        pytest.skip(f"needs {top}, which is not installed here (e.g. on the lent GPU machine)",
                    allow_module_level=True)
    return importlib.import_module(name)
