"""The summary of a ``bench/device_run.sh`` run: ``summary.md`` and ``summary.json`` in ``--out``.

  python bench/device_summary.py --logs=<run's logs folder> --out=<$OUT>

Reads what the steps left in the logs folder (``steps.jsonl``, ``devices.log``, ``tests.xml``,
``clustering.json``, ``train_speed*.json`` / ``.md``, ``kd_plan.json``, ``kd_vs_dcv2_*.md``) and
prints the Markdown too, so the end of the device call's output holds it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import xml.etree.ElementTree as ET


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _json(path: str):
    text = _read(path)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def steps(logs: str) -> list[dict]:
    text = _read(os.path.join(logs, "steps.jsonl")) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def devices(logs: str) -> list[str]:
    text = _read(os.path.join(logs, "devices.log")) or ""
    keep = ("GPU ", "jax ", "jax.devices", "device_kind", "torch ", "no nvidia-smi", "name,")
    return [line for line in text.splitlines() if line.startswith(keep)][:8]


def tests(logs: str) -> dict | None:
    """Counts and failing test ids from pytest's JUnit XML."""
    try:
        root = ET.parse(os.path.join(logs, "tests.xml")).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["seconds"] = float(suite.get("time", 0.0))
    failed = []
    for case in suite.iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            message = ((problem.get("message") or "").splitlines() or [""])[0][:160]
            failed.append(f"{case.get('classname')}::{case.get('name')}: {message}")
    counts["failed"] = failed
    return counts


def clustering(logs: str) -> list[dict]:
    """The ImageNet-size rows: time, ms per pass or iteration, TFLOP/s, memory."""
    report = _json(os.path.join(logs, "clustering.json"))
    if not report:
        return []
    rows = []
    for row in report.get("results", []):
        dc = row.get("dcjax", {})
        entry = {"case": row["name"]}
        if "error" in dc:
            entry["error"] = dc["error"][-300:]
        for key in (
            "run_s",
            "compile_s",
            "ms_per_pass",
            "ms_per_iter",
            "num_iters",
            "converged",
            "lse_mode",
            "published_float32_fraction",
            "device_peak_bytes_in_use",
            "peak_rss_bytes",
            "input_bytes",
        ):
            if key in dc:
                entry[key] = dc[key]
        if "gflops" in dc:
            entry["tflops"] = dc["gflops"] / 1e3
        rows.append(entry)
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(summary: dict, logs: str) -> str:
    lines = [
        f"# dcjax device run ({'smoke' if summary['smoke'] else 'full'}), {summary['elapsed_s']} s",
        "",
        *[f"    {line}" for line in summary["devices"]],
        "",
        "| step | rc | seconds | budget s | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in summary["steps"]:
        lines.append(
            f"| {s['step']} | {s['rc']} | {s['seconds']} | {s['budget_s']} | {s.get('note', '')} |"
        )
    t = summary["tests"]
    if t:
        lines += [
            "",
            f"Tests: {t['tests']} run, {t['failures']} failed, {t['errors']} errors, "
            f"{t['skipped']} skipped in {t['seconds']:.0f} s.",
            *[f"- FAILED {name}" for name in t["failed"][:30]],
        ]
    if summary["clustering"]:
        lines += ["", "Clustering at ImageNet size:", ""]
        for row in summary["clustering"]:
            cells = ", ".join(
                f"{k} {_fmt(v)}" for k, v in row.items() if k != "case" and v is not None
            )
            lines.append(f"- {row['case']}: {cells}")
        lines.append("- faiss-gpu: not run (no wheel in the carry)")
    for name in ("train_speed.md", "train_speed_cycle.md"):
        text = _read(os.path.join(logs, name))
        if text:
            lines += ["", text.strip()]
    lines += ["", "bfloat16 (`config.dtype=bfloat16`): not built, not measured."]
    if summary["kd_data"]:
        lines += ["", f"KD data: {summary['kd_data']}"]
    if summary["kd_plan"]:
        lines += ["", f"KD plan: `{json.dumps(summary['kd_plan'])}`"]
    for path in sorted(glob.glob(os.path.join(logs, "kd_vs_dcv2_*.md"))):
        lines += ["", _read(path).strip()]
    if summary["kd_runs"]:
        lines += ["", "Runs' results.json (also when the table was not written):"]
        lines += [f"- {name}: {json.dumps(r)}" for name, r in summary["kd_runs"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--elapsed_s", type=int, default=0)
    parser.add_argument("--smoke", type=int, default=0)
    args = parser.parse_args()
    runs_dir = os.path.join(args.logs, "runs")
    runs = {
        os.path.relpath(os.path.dirname(p), runs_dir): _json(p)
        for p in sorted(glob.glob(os.path.join(runs_dir, "**", "results.json"), recursive=True))
    }
    summary = {
        "smoke": bool(args.smoke),
        "elapsed_s": args.elapsed_s,
        "backend": (_read(os.path.join(args.logs, "backend.txt")) or "unknown").strip(),
        "devices": devices(args.logs),
        "steps": steps(args.logs),
        "tests": tests(args.logs),
        "clustering": clustering(args.logs),
        "kd_data": (_read(os.path.join(args.logs, "kd_data.txt")) or "").strip(),
        "kd_plan": _json(os.path.join(args.logs, "kd_plan.json")),
        "kd_runs": runs,
    }
    for name in ("train_speed", "train_speed_cycle"):
        summary[name] = _json(os.path.join(args.logs, f"{name}.json"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = markdown(summary, args.logs)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
