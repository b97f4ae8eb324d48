"""The GPU check's summary (benchmarks/gpu_summary.py): which steps decide whether the check passed."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import gpu_summary  # noqa: E402


def _steps(tmp_path, rows):
    (tmp_path / "steps.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    return str(tmp_path)


def test_informational_steps_do_not_fail_the_check(tmp_path):
    out = _steps(tmp_path, [("build", "ok", "40", ""), ("value_error_probe", "ok", "2", ""),
                            ("value_error_probe_no_preload", "failed", "2", "exit 139"),
                            ("sanitizer", "timeout", "150", "stopped after 150 s")])
    text, ok = gpu_summary.summary(out)
    assert ok
    assert "| value_error_probe_no_preload | failed | 2 | exit 139" in text


def test_a_failed_step_fails_the_check(tmp_path):
    out = _steps(tmp_path, [("build", "ok", "40", ""), ("value_error_probe", "failed", "2", "exit 139")])
    _, ok = gpu_summary.summary(out)
    assert not ok
