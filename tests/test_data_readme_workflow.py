"""The README's Me-LLaMA workflow runs as written (issue 14.2).

The commands are read out of README.md ("## The Me-LLaMA workflow") and run by bash, from a
directory laid out as the README says (the repository's own examples/blends/, corpora named as the
README names them, a tokenizer trained by the test where Meta's tokenizer.model would be), so a
README edit that breaks the workflow breaks this test. What runs and what is skipped:
- step 1 (preprocess + verify-data, every source) and step 2 (blend-report): run;
- step 4's `melama plan`: runs (a calculation);
- step 3 (`convert import-hf`: needs Meta's LLaMA-2 70B weights), step 4's launches (torchrun on
  20 nodes of 8 GPUs, sbatch: need GPUs and SLURM), step 5 (`convert export-hf`: needs the trained
  70B checkpoint): skipped.
Every command of the block is one of these, so a new command must be classified here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard


REPO = Path(__file__).resolve().parents[1]
# step -> (commands to run: a regex over each command, or None for all; skipped commands: regex, why)
PLAN = {
    1: (None, None),
    2: (None, None),
    3: (r"", (r"^melama convert import-hf ", "needs Meta's LLaMA-2 70B weights")),
    4: (r"^melama plan ", (r"^(NNODES=.* bash examples/pretrain_70b\.sh|sbatch examples/pretrain_70b\.slurm)$",
                           "needs 160 GPUs (20 nodes x 8) or SLURM")),
    5: (r"", (r"^melama convert export-hf ", "needs the trained 70B checkpoint")),
}
# The corpus the test writes for each source of examples/blends/me_llama_15_1_4.yaml.
SOURCES = {"pubmed": "biomedical", "pmc": "biomedical", "mimic_notes": "clinical", "redpajama": "general"}


def workflow_steps() -> dict[int, str]:
    """{step number: its lines} of the workflow's bash block."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The Me-LLaMA workflow", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    steps, number = {}, None
    for line in block.splitlines():
        header = re.match(r"# (\d+)\. ", line)
        if header:
            number = int(header.group(1))
            steps[number] = ""
        steps[number] += line + "\n"
    return steps


def commands(step: str) -> list[str]:
    """Top-level commands of a step (continuation lines joined; a loop is one command)."""
    joined = re.sub(r"\\\n\s*", "", step)
    out, depth = [], 0
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if depth == 0:
            out.append(line)
        else:
            out[-1] += "\n" + line
        depth += line.startswith(("for ", "while ", "if ")) - (line in ("done", "fi"))
    return out


def test_every_workflow_command_is_run_or_skipped_for_a_reason():
    steps = workflow_steps()
    assert sorted(steps) == sorted(PLAN)
    for number, step in steps.items():
        run, skip = PLAN[number]
        for command in commands(step):
            runs = run is None or (run and re.search(run, command))
            assert runs or (skip and re.search(skip[0], command)), f"step {number}: unclassified {command!r}"


@pytest.fixture()
def workdir(tmp_path, corpus, spm_model):
    """The repository root as the README expects it, minus the repository: blends, corpora, tokenizer.
    Returns (the folder, documents written per source)."""
    shutil.copytree(REPO / "examples" / "blends", tmp_path / "examples" / "blends")
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    documents = {}
    for source, domain in SOURCES.items():
        lines = corpus[domain].read_bytes().splitlines(keepends=True)
        if source in ("pubmed", "pmc"):  # two sources from one domain: halves, so they differ
            lines = lines[::2] if source == "pubmed" else lines[1::2]
        documents[source] = len(lines)
        (tmp_path / source).mkdir()
        for part in range(2):  # several shards per source, as the glob in the README expects
            (tmp_path / source / f"part-{part:03d}.jsonl.zst").write_bytes(compressor.compress(b"".join(lines[part::2])))
    tokenizer = tmp_path / "checkpoints" / "llama-2-70b-hf" / "tokenizer.model"
    tokenizer.parent.mkdir(parents=True)
    shutil.copy(spm_model, tokenizer)
    # `melama` as installed, but this checkout's code whatever is installed.
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    (bin_dir / "melama").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m melama_mcore.cli "$@"\n')
    (bin_dir / "melama").chmod(0o755)
    return tmp_path, documents


def _run(workdir: Path, script: str) -> str:
    env = {**os.environ, "PATH": f"{workdir / '.bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{script}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.mark.slow
def test_readme_workflow_runs_as_written(workdir):
    workdir, documents = workdir
    steps = workflow_steps()
    # Step 1: every source tokenised into data/<source>_text_document and verified.
    out = _run(workdir, steps[1])
    verified = {Path(summary["prefix"]).name: summary for summary in map(json.loads, re.findall(r"^\{.*\}$", out, re.M))}
    assert {name: summary["documents"] for name, summary in verified.items()} == \
        {f"{source}_text_document": count for source, count in documents.items()}
    # Step 2: the example blend finds them where step 1 wrote them.
    report = _run(workdir, steps[2])
    rows = {line.split()[0]: line.split() for line in report.splitlines()[2:] if line.split()[0] in
            ("biomedical", "clinical", "general")}
    assert {name: row[2] for name, row in rows.items()} == {"biomedical": "75.0%", "clinical": "5.0%",
                                                            "general": "20.0%"}
    # Step 4's planner line.
    plan = [command for command in commands(steps[4]) if re.search(PLAN[4][0], command)]
    assert len(plan) == 1
    _run(workdir, plan[0])
