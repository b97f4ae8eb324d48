"""The examples users copy: every docstring example of the package, and the Python blocks of the
README and of docs/*.md, run as written.

Docstring examples run with :mod:`doctest` (outputs compared), one test per module. A Markdown file's
``python`` blocks run in order in one fresh interpreter, as a reader pastes them one after another;
a block that needs what a test cannot give (a cluster, a GPU, minutes of training) is marked in the
file itself by an HTML comment on the line above it, ``<!-- not run by the tests: WHY -->``, and
this module checks that the reason is there and that the marked block still compiles.
"""
import doctest
import importlib
import inspect
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import textwrap

import pytest
from optional import require

import pymks_vae

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
NOT_RUN = "<!-- not run by the tests:"
# Packages the lent GPU machine lacks (tests/optional.py): examples importing them skip there.
OPTIONAL = re.compile(r"^\s*(?:import|from)\s+(dask|distributed|xarray|pymks)\b", re.M)


def _modules():
    names = [m.name for m in pkgutil.walk_packages(pymks_vae.__path__, "pymks_vae.")]
    return ["pymks_vae"] + [n for n in names if not n.rpartition(".")[2].startswith("_C")]


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save files write here
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    for package in sorted({m for t in tests for e in t.examples for m in OPTIONAL.findall(e.source)}):
        require(package)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_the_package_has_examples():
    # A finder that silently found nothing (a changed layout, an excluded module) would pass above.
    finder = doctest.DocTestFinder(exclude_empty=True)
    count = sum(len(t.examples) for name in _modules()
                for t in finder.find(importlib.import_module(name), name))
    assert count >= 250, count


def _blocks(path):
    """The ``python`` blocks of a Markdown file: (line number, code, reason not run or None)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = lines.index("```", start)
            above = lines[i - 1].strip() if i > 0 else ""
            reason = None
            if above.startswith(NOT_RUN):
                reason = above[len(NOT_RUN):].removesuffix("-->").strip()
            blocks.append((start + 1, "\n".join(lines[start:end]) + "\n", reason))
            i = end
        i += 1
    return blocks


def _files_with_blocks():
    return [p for p in MARKDOWN if _blocks(p)]


@pytest.mark.parametrize("path", _files_with_blocks(), ids=lambda p: p.name)
def test_markdown_examples_run(path, tmp_path):
    blocks = _blocks(path)
    for line, code, reason in blocks:
        compile(code, f"{path.name}:{line}", "exec")  # every block, run or not, is valid Python
        if reason is not None:
            assert reason, f"{path.name}:{line}: say why the block is not run"
    run = [(line, code) for line, code, reason in blocks if reason is None]
    if not run:
        return
    for package in sorted({m for _, code in run for m in OPTIONAL.findall(code)}):
        require(package)
    # One interpreter per file, the blocks in order; each announces itself, so that a failure
    # names its block.
    script = "".join(f"print('--- block at line {line}', flush=True)\n"
                     f"exec(compile({code!r}, {f'{path.name}:{line}'!r}, 'exec'))\n" for line, code in run)
    # The checkout's package (as the suite imports it), whatever else is installed.
    path_env = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": path_env})
    assert proc.returncode == 0, textwrap.shorten(proc.stdout, 2000) + "\n" + proc.stderr[-4000:]


def test_markdown_files_are_found():
    # README's first block is the quick start; it must be among those that run.
    readme = _blocks(ROOT / "README.md")
    assert readme and readme[0][2] is None
    assert sum(len(_blocks(p)) for p in MARKDOWN) >= 8


def test_markdown_block_reader(tmp_path):
    text = "intro\n```python\nx = 1\n```\n" + NOT_RUN + " needs a GPU -->\n```python\ny = 2\n```\n"
    path = tmp_path / "example.md"
    path.write_text(text)
    assert _blocks(path) == [(3, "x = 1\n", None), (7, "y = 2\n", "needs a GPU")]


def _public_api():
    """(module, name) of every public function and class (not exceptions or warnings) of the
    package's public modules: ``__all__`` where a module has one, else its own public names."""
    out = []
    for name in _modules():
        if any(part.startswith("_") for part in name.split(".")):
            continue
        module = importlib.import_module(name)
        names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        for attr in names:
            obj = getattr(module, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or obj.__module__ != name:
                continue
            if inspect.isclass(obj) and issubclass(obj, (Exception, Warning)):
                continue
            out.append((name, attr, obj))
    return out


def test_every_public_function_and_class_has_an_example():
    # The house style (a docstring with a runnable example); the test above runs them.
    missing = [f"{module}.{attr}" for module, attr, obj in _public_api() if ">>>" not in (obj.__doc__ or "")]
    assert not missing, f"public names without a docstring example: {missing}"
    assert len(_public_api()) >= 90
