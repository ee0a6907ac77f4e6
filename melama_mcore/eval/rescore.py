"""`melama eval rescore RUN_DIR --out DIR [--extractor NAME]`: score a run again from its samples files
alone, without a model.

Reads every RUN_DIR/samples_<task>.jsonl of a MIBE task (written by `melama eval --log-samples`, or by
hand in that form): from each line only `doc` (the record as in the task file) and `generation` are
scored; `doc_id` (the record's position in the task file; default: the line's) orders them, and the
counts `prompt_tokens_cut` and `hit_max_new_tokens` are carried over when present (null otherwise).
With the run's extractor the task rows equal the run's results.json exactly. The protocol is the
run's (RUN_DIR/results.json, when there is one) with the extractor of the rescoring and
`rescored_from`; the BERTScore model is the one found now.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from melama_mcore.errors import DataError, UserError
from melama_mcore.eval import report
from melama_mcore.eval.data import check_record, read_records
from melama_mcore.eval.extraction import DEFAULT_EXTRACTOR, EXTRACTORS
from melama_mcore.eval.scoring import Generated, task_result
from melama_mcore.eval.tasks import TASKS

log = logging.getLogger(__name__)


def _optional(line: dict, key: str, kind: type, where: str):
    value = line.get(key)
    if value is not None and (type(value) is not kind):
        raise DataError(f"{where}: {key!r} must be {'an integer' if kind is int else 'true or false'} or absent")
    return value


def read_samples(path: Path, task_name: str) -> list[Generated]:
    """The scored records of one samples file."""
    task, out = TASKS[task_name], []
    for number, (where, line) in enumerate(read_records(path)):
        if not isinstance(line, dict) or "doc" not in line or not isinstance(line.get("generation"), str):
            raise DataError(f"{where}: expected an object with 'doc' (the record) and 'generation' (a string)")
        doc_id = _optional(line, "doc_id", int, where)
        doc = {**check_record(task, line["doc"], f"{where} doc"), "mibe_index": number if doc_id is None else doc_id,
               "mibe_record": json.dumps(line["doc"], ensure_ascii=False)}
        out.append(Generated(doc, line["generation"], _optional(line, "prompt_tokens_cut", int, where),
                             _optional(line, "hit_max_new_tokens", bool, where)))
    if not out:
        raise DataError(f"{path} has no records")
    return out


def run_protocol(run_dir: Path) -> dict:
    """The run's protocol from its results.json, or what is known without it."""
    try:
        protocol = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))[report.PROTOCOL]
        if isinstance(protocol, dict):
            return protocol
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log.info("%s has no results.json with a protocol: the generation settings are recorded as unknown", run_dir)
    return {"template": dict(report.UNKNOWN_TEMPLATE), "limit": None,
            "selection": None, "max_new_tokens": None, "num_fewshot": None, "backend": None, "model": None}


def rescore(run_dir: Path, out: Path, extractor: str) -> dict:
    """Write out/results.json and out/results.md from run_dir's samples files; returns the task rows."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder (expected a `melama eval --log-samples` output folder)")
    files = {path.name[len("samples_"):-len(".jsonl")]: path for path in sorted(run_dir.glob("samples_*.jsonl"))}
    files = {name: path for name, path in files.items() if name in TASKS}
    if not files:
        raise UserError(f"{run_dir} has no samples_<task>.jsonl of a MIBE task: run `melama eval` with --log-samples")
    if (out / "results.json").exists():
        raise UserError(f"{out} already holds results.json: choose a new --out or delete it")
    table = {name: task_result(TASKS[name], read_samples(files[name], name), extractor).row
             for name in TASKS if name in files}
    protocol = {**run_protocol(run_dir), "extractor": extractor, "bertscore": report.bertscore_protocol(table),
                "rescored_from": str(run_dir)}
    header = [f"- rescored from the samples files of `{run_dir}` (no model; generation settings as the run "
              "recorded them)", *report.protocol_lines(protocol)]
    report.write_outputs(out, report.results_json(protocol, table), report.markdown(table, header, [], extractor), {})
    log.info("rescored %d task(s), %d records", len(table), sum(row["records"] for row in table.values()))
    return table


def add_extractor_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--extractor", choices=EXTRACTORS, default=DEFAULT_EXTRACTOR,
                        help="the protocol results.json's plain metric names follow: mibe-compat (default; the "
                             "released scorer's rules, comparable with the paper) or strict (an answer parser); "
                             "the other's metrics are written as <metric>@<other>")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melama eval rescore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a `melama eval --log-samples` output folder")
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json and results.md")
    add_extractor_argument(parser)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    rescore(args.run_dir, args.out, args.extractor)
    print((args.out / "results.md").read_text(encoding="utf-8"), end="")
    log.info("wrote %s", args.out / "results.json")
    return 0
