"""One report from the inputs: read and check them all, compare, draw, then write the folder.

Every file appears atomically (written under a hidden temporary name, then renamed): the PNGs,
report.json, report.html, and report.md last. Pictures a previous report in the same folder drew and
this one does not are removed (only those its report.json names)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from melama_mcore.output_paths import check_output_dir, write_atomic
from melama_mcore.report import figures, render
from melama_mcore.report.compare import report_data
from melama_mcore.report.inputs import read_inputs

REPORT_JSON, REPORT_HTML, REPORT_MD = "report.json", "report.html", "report.md"


@dataclass
class Report:
    folder: Path
    data: dict                    # what report.json holds
    files: list[Path]             # what was written, in order
    pictures_missing: str | None  # why there are no pictures, or None


def make_report(paths: list[Path], out: Path, labels: list[str] = (), baseline: str | None = None) -> Report:
    check_output_dir(out, "--out")
    inputs = read_inputs(paths, list(labels))
    data = report_data(inputs, baseline)
    missing = figures.unavailable()
    pictures = [] if missing else figures.draw(data)
    data["figures"] = [p.name for p in pictures]
    data["figures_unavailable"] = missing
    document = render.blocks(data, pictures, missing)
    stale = _previous_pictures(out) - set(data["figures"])
    files = []
    for picture in pictures:
        files.append(write_atomic(out / picture.name, picture.png))
    files.append(write_atomic(out / REPORT_JSON, json.dumps(data, indent=1, allow_nan=False) + "\n"))
    files.append(write_atomic(out / REPORT_HTML, render.html_document(document, pictures)))
    files.append(write_atomic(out / REPORT_MD, render.markdown(document)))
    for name in stale:
        (out / name).unlink(missing_ok=True)
    return Report(out, data, files, missing)


def _previous_pictures(out: Path) -> set[str]:
    try:
        names = json.loads((out / REPORT_JSON).read_text(encoding="utf-8")).get("figures") or []
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and n.endswith(".png") and Path(n).name == n}
