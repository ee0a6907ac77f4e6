"""OUT_DIR/gpu_check.json (everything recorded) and OUT_DIR/gpu_check.md (the device line, then one
table: a row per stage). Both are rewritten atomically after every stage, so a run cut short (the
machine's time limit) leaves what it finished, marked incomplete."""

from __future__ import annotations

import json
import os
from pathlib import Path

JSON_NAME, MD_NAME, LOG_NAME = "gpu_check.json", "gpu_check.md", "gpu_check.log"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".incomplete")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def device_line(report: dict) -> str:
    d = report.get("device") or {}
    if d.get("name"):
        parts = [d["name"], f"{d['memory_gib']:.0f} GiB" if d.get("memory_gib") else None,
                 f"sm_{d['capability'].replace('.', '')}" if d.get("capability") else None,
                 f"driver {d['driver']}" if d.get("driver") else None,
                 f"CUDA {d['cuda_runtime']}" if d.get("cuda_runtime") else None]
    else:
        parts = [f"CPU only ({d['cpus']} cores)" if d.get("cpus") else "device unknown (stage a did not finish)"]
    parts += [f"torch {d['torch']}" if d.get("torch") else None, f"Python {d['python']}" if d.get("python") else None,
              report["started"], f"commit {report['commit']}", f"{report['mode']} run"]
    return " · ".join(p for p in parts if p)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    stages = report["stages"]
    used = sum(s["elapsed_s"] for s in stages)
    lines = [f"**Device:** {device_line(report)}", ""]
    if not report["complete"]:
        lines += [f"**Incomplete:** the run stopped before it ended (last stage recorded: "
                  f"{stages[-1]['key'] if stages else 'none'}).", ""]
    lines += ["| stage | status | s (budget) | result |", "|---|---|---|---|"]
    for s in stages:
        result = s["summary"]
        if s["error"]:
            result = f"{result}; {s['error']}" if result else s["error"]
        failed = [f"{name}: {p['detail']}" for name, p in s["parts"].items() if p["status"] == "failed"]
        if failed:
            result = "; ".join(filter(None, [result, "FAILED " + "; ".join(failed)]))
        skipped = [f"{name}: {p['detail']}" for name, p in s["parts"].items() if p["status"] == "skipped"]
        if skipped and s["status"] != "skipped":
            result += f" (skipped: {'; '.join(skipped)})"
        elif s["status"] == "skipped" and not s["error"]:
            result = result or "; ".join(skipped)
        lines.append(f"| {s['key']}. {s['title']} | {s['status']} | {s['elapsed_s']:.0f} ({s['budget_s']:.0f}) "
                     f"| {_cell(result)} |")
    install = report.get("install")
    lines += ["", f"`{report['command']}`: {used:.0f} s in stages of {report['budget_s']:.0f} s allowed"
              + (f", {install}" if install else "") + f"; details in {JSON_NAME}, every job's output in {LOG_NAME}."]
    return "\n".join(lines) + "\n"


def write(out_dir: Path, report: dict) -> None:
    write_atomic(out_dir / JSON_NAME, json.dumps(report, indent=1) + "\n")
    write_atomic(out_dir / MD_NAME, markdown(report))
