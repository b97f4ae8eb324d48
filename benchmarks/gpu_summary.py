"""The one table of a GPU check (benchmarks/gpu_check.sh): steps, test counts, benchmark rows.

Reads what gpu_check.sh left in its output folder (steps.tsv, build_info.json, pytest's JUnit XML
files, the benchmarks' JSON) and writes summary.md there, ready to paste into docs/benchmarks.md.
Anything missing (a step that failed or ran out of time) shows as such rather than stopping here.

Usage: python benchmarks/gpu_summary.py OUT_DIR
"""
import json
import os
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import markdown_table  # noqa: E402


def _read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def junit_counts(path):
    """Passed, failed (failures + errors), skipped and total test counts of a JUnit XML file, and
    the ids of the failed tests; None when the file is missing or unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(f"{case.get('classname')}::{case.get('name')}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    counts["total"] = sum(counts.values())
    return counts, failed


def bench_rows(path):
    """The rows of a benchmark's JSON output (an empty list when it did not run)."""
    try:
        with open(path) as f:
            return json.load(f).get("rows", [])
    except (OSError, ValueError):
        return []


def summary(out):
    """The markdown summary of the GPU check whose files are in ``out``.

    Args:
        out: the output folder of gpu_check.sh.

    Returns:
        (markdown text, True when every step passed).
    """
    lines = ["# GPU check", ""]
    gpu = _read(os.path.join(out, "gpu.txt")).strip()
    if gpu:
        lines += ["GPU: " + gpu.splitlines()[-1], ""]
    info = _read(os.path.join(out, "build_info.json")).strip()
    if info:
        lines += ["build_info: `" + info + "`", ""]
    steps, ok = [], True
    for line in _read(os.path.join(out, "steps.tsv")).splitlines():
        name, status, seconds, *note = line.split("\t") + [""]
        detail = note[0]
        junit = os.path.join(out, name + ".xml")
        if os.path.exists(junit):
            parsed = junit_counts(junit)
            if parsed:
                c, failed = parsed
                detail = f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
                if failed:
                    detail += "; failed: " + ", ".join(failed[:8]) + (" ..." if len(failed) > 8 else "")
        elif status in ("failed", "timeout"):  # no test report: the log's last line says why
            tail = [ln.strip() for ln in _read(os.path.join(out, name + ".log")).splitlines() if ln.strip()]
            if tail:
                detail = (detail + "; " if detail else "") + tail[-1][:200].replace("|", "/")
        # The sanitizer pass is worth what it covers in the time left: a timeout there is no failure.
        # The probe without the preloaded libstdc++ shows whether it is needed: it may crash.
        ok = ok and (status in ("ok", "skipped") or (name == "sanitizer" and status == "timeout")
                     or name == "value_error_probe_no_preload")
        steps.append({"step": name, "result": status, "seconds": seconds, "detail": detail})
    lines += [markdown_table(steps, ["step", "result", "seconds", "detail"]), ""]
    for name, cols in [("bench_two_point", ["device", "case", "pass", "window", "pymks-vae ms", "torch.fft ms",
                                            "vs torch.fft"]),
                       ("bench_loss", ["device", "case", "fused ms", "torch.fft ms", "floor ms",
                                       "speed-up vs torch.fft", "fused / floor"]),
                       ("bench_training", ["device", "case", "spatial img/s", "vanilla img/s", "torch.fft img/s",
                                           "spatial / vanilla", "torch.fft / spatial"])]:
        rows = bench_rows(os.path.join(out, name + ".json"))
        if rows:
            lines += [f"## {name}", "", markdown_table(rows, cols), ""]
    lines.append("Ratios: median of per-round ratios of interleaved rounds (smallest-largest round).")
    return "\n".join(lines) + "\n", ok


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit(__doc__)
    out = argv[0]
    text, ok = summary(out)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
