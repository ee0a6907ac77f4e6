"""report.md and report.html from report.json's data: one list of blocks (headings, text, tables,
pictures), two renderers. The HTML is one file: inline CSS, pictures embedded as base64 PNG, no
script, nothing fetched, so it opens offline and can be mailed."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass

from melama_mcore.report.compare import column_label, template_text
from melama_mcore.report.figures import Picture


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Text:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    name: str
    caption: str


Block = Heading | Text | Table | Image


# -- numbers ------------------------------------------------------------------------------------------
# Enough digits to check a cell against its source by eye; report.json holds the numbers unrounded.
def loss(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def significant(v) -> str:
    return "n/a" if v is None else f"{v:.6g}"


perplexity = significant


def percent(v) -> str:
    return "" if v is None else f"{v:+.2f}%"


def score(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def difference(v) -> str:
    return "" if v is None else f"{v:+.4f}"


def count(v) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


# -- the document -------------------------------------------------------------------------------------
def blocks(data: dict, pictures: list[Picture], missing: str | None) -> list[Block]:
    names = {p.name: p for p in pictures}

    def image(name: str) -> list[Block]:
        return [Image(name, names[name].caption)] if name in names else []

    out: list[Block] = [Heading(1, "Training and evaluation report")]
    out.append(Table(["label", "kind", "path"], [[i["label"], i["kind"], i["path"]] for i in data["inputs"]]))
    if data["baseline"]:
        out.append(Text(f"Baseline: {data['baseline']}. Changes are against it, within its comparable group only. "
                        "Every number is in report.json, unrounded, as read from the files above."))
    if missing:
        out.append(Text(f"No pictures: {missing}. This report is its tables."))
    if data["runs"]:
        out += _runs(data["runs"]) + image("training_loss.png") + image("validation_loss.png")
        out += image("learning_rate.png") + image("throughput.png")
    if data["perplexity"]:
        out.append(Heading(2, "Perplexity per domain (forgetting)"))
        for number, group in enumerate(data["perplexity"], 1):
            out += _perplexity_group(number, group) + image(f"perplexity_{number}.png")
        for number, item in enumerate(data["perplexity_series"], 1):
            out += _perplexity_series(item) + image(f"perplexity_steps_{number}.png")
    if data["scores"]:
        out.append(Heading(2, "Scores (MIBE and general benchmarks)"))
        for number, group in enumerate(data["scores"], 1):
            out += _score_group(number, group) + image(f"scores_{number}.png")
    return out


def _runs(runs: list[dict]) -> list[Block]:
    out: list[Block] = [Heading(2, "Training runs")]
    rows = []
    for run in runs:
        train = run["train"]
        speeds = [v for v in train["tokens_per_s"] if v is not None]
        mfus = [v for v in train["mfu"] if v is not None]
        rows.append([run["label"], str(train["step"][-1]), count(train["tokens"][-1]), loss(train["loss"][-1]),
                     count(sum(speeds) / len(speeds)) if speeds else "n/a",
                     f"{sum(mfus) / len(mfus) * 100:.1f}%" if mfus else "n/a", str(run["segments"])])
    out.append(Table(["run", "last step", "tokens seen", "training loss", "mean tokens/s", "mean MFU", "segments"], rows))
    out.append(Text("Training loss at the last logged step; means over the logged steps. MFU n/a: the run did not "
                    "know its GPU's peak (CPU, or set logging.peak_tflops)."))
    validated = [run for run in runs if run["validation"]]
    if validated:
        sources = list(dict.fromkeys(s for run in validated for s in run["validation"]))
        header = ["source", *[f"{run['label']} (step {_last_validation_step(run)})" for run in validated]]
        out.append(Table(header, [[s, *[loss(run["validation"][s]["loss"][-1]) if s in run["validation"] else ""
                                         for run in validated]] for s in sources]))
        out.append(Text("Validation loss per blend source at each run's last validation."))
    for run in runs:
        settings = run["settings"]
        if settings:
            shown = ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)
            out.append(Text(f"{run['label']}: {shown}."))
        if run["segments"] > 1:
            out.append(Text(f"{run['label']}: resumed over steps already logged ({run['segments']} segments); the "
                            f"{run['superseded_records']} records of the abandoned steps are replaced by the resumed "
                            "ones: one curve."))
    return out


def _last_validation_step(run: dict) -> int:
    return max(values["step"][-1] for values in run["validation"].values())


def _comparability(number: int, group: dict, kind: str) -> list[Block]:
    out: list[Block] = []
    if group["apart_reason"]:
        out.append(Text(f"Group {number} is shown apart, not comparable with group 1: {group['apart_reason']}."))
    out += [Text(f"Note: {note}.") for note in group["notes"]]
    if group["baseline"] is None and len(group["models"]) > 1:
        out.append(Text(f"No change column: the baseline is not among these {kind}."))
    return out


def _perplexity_group(number: int, group: dict) -> list[Block]:
    tokenizer = group["tokenizer"]
    what = (f"vocab size {tokenizer.get('vocab_size')}, hash {str(tokenizer.get('vocab_hash'))[:12]}"
            if tokenizer else "not recorded")
    out: list[Block] = [Heading(3, f"Group {number}: seq_length {group['seq_length']}, tokenizer {what}")]
    out += _comparability(number, group, "perplexities")
    base = group["baseline"]
    models = group["models"]  # the baseline first
    others = [m for m in models if m != base]
    header = ["domain", *[column_label(group, m) for m in models]] + ([f"{m} vs {base}" for m in others] if base else [])
    rows = []
    for source, cells in group["sources"].items():
        row = [source, *[perplexity(cells[m]["perplexity"]) if m in cells else "" for m in models]]
        if base:
            row += [percent(cells[m]["change_pct"]) if m in cells else "" for m in others]
        rows.append(row)
    out.append(Table(header, rows))
    out.append(Text("Perplexity per held-out domain; change in percent of the baseline's (negative: lower "
                    "perplexity, better). Loss, tokens and sequences per cell: report.json."))
    return out


def _perplexity_series(item: dict) -> list[Block]:
    out: list[Block] = [Heading(3, f"Across the checkpoints of {item['label']}")]
    base = item["baseline"]
    header, columns = ["step"], []
    for source, values in item["sources"].items():
        header.append(source)
        columns.append([perplexity(v) for v in values["perplexity"]])
        if values["change_pct"] is not None:
            header.append(f"{source} vs {base}")
            columns.append([percent(v) for v in values["change_pct"]])
    rows = [[str(step), *[column[i] for column in columns]] for i, step in enumerate(item["steps"])]
    out.append(Table(header, rows))
    return out


def _protocol_text(protocol: dict | None) -> str:
    if protocol is None:
        return "protocol not recorded"
    return (f"extractor {protocol.get('extractor')}, few-shot {protocol.get('num_fewshot')}, "
            f"limit {protocol.get('limit')}, max new tokens {protocol.get('max_new_tokens')}")


def _score_group(number: int, group: dict) -> list[Block]:
    out: list[Block] = [Heading(3, f"Group {number}: {_protocol_text(group['protocol'])}")]
    out += _comparability(number, group, "scores")
    backends = {label: p for label, p in group["protocols"].items() if p}
    if backends:
        out.append(Text("Scored with: " + "; ".join(f"{label}: backend {p.get('backend')}, model {p.get('model')}, "
                                                    f"prompts {template_text(p.get('template'))}"
                                                    for label, p in backends.items()) + "."))
    base = group["baseline"]
    models = group["models"]  # the baseline first
    others = [m for m in models if m != base]
    header = ["suite", "task", "metric", *models] + ([f"{m} vs {base}" for m in others] if base else [])
    rows = []
    for task, entry in group["tasks"].items():
        name = f"{entry['dataset']} ({task})" if entry["dataset"] else task
        for metric, cells in entry["metrics"].items():
            row = [entry["suite"], name, metric, *[score(cells[m]["value"]) if m in cells else "" for m in models]]
            if base:
                row += [difference(cells[m]["change"]) if m in cells else "" for m in others]
            rows.append(row)
    out.append(Table(header, rows))
    out.append(Text("Change: score minus the baseline's (metric units; for missing_rate lower is better). "
                    "metric@extractor: the same generations under the other extractor."))
    if group["diagnostics"]:
        names = list(dict.fromkeys(k for cells in group["diagnostics"].values() for d in cells.values() for k in d))
        rows = [[task, label, *[significant(d.get(k)) if k in d else "" for k in names]]
                for task, cells in group["diagnostics"].items() for label, d in cells.items()]
        out.append(Table(["task", "model", *names], rows))
    return out


# -- markdown -----------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(document: list[Block]) -> str:
    lines = []
    for block in document:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Text):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            lines.append("|" + "---|" * len(block.header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        else:
            lines += [f"![{block.caption}]({block.name})", "", f"*{block.caption}*", ""]
    return "\n".join(lines)


# -- html ---------------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f2f2f2; text-align: left; }
td { font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; height: auto; }
"""


def html_document(document: list[Block], pictures: list[Picture]) -> str:
    png = {p.name: p.png for p in pictures}
    body = []
    for block in document:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            body.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            data = base64.b64encode(png[block.name]).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
    title = next((b.text for b in document if isinstance(b, Heading)), "report")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
