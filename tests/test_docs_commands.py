"""Every command block of README.md and docs/*.md runs as written (issue 19), with small stand-ins
where the real data and models are not here, so a doc edit that breaks a command breaks this test.

Each ```bash block is split into commands (continuation lines joined, `&&` chains split, comments
dropped, a loop kept whole) and each command is classified by exactly one rule of RULES, keyed by the
doc and a regex over the command: RUN as written, REWRITE by the substitutions shown (and why), or
SKIP for the reason given. An unclassified command, or a rule that matches nothing, fails the fast
test below: classify the new command (or delete the stale rule) there.

The slow test runs the README's commands in order from a folder laid out as the README assumes
(`layout`): Meta's LLaMA-2 70B folder is a random LLaMA of the trunk's `nano` shape with the test
tokenizer, the corpora and instruction files are synthetic, MIBE's records are the demo's. Training
runs are the recipes themselves, shrunk by a REWRITE. Each docs/*.md then runs in a folder of its own
that links to what the README's commands produced, under the names the doc uses (DOC_NAMES). `melama`
is tests/melama_shim.py: each call forked from one warm interpreter (the import is paid once).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from sft_fixtures import RECORDS, write_jsonl
from trunk_fixtures import TINY

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]

# A recipe shrunk to the stand-in model on one CPU process: the nano shape (the stand-in base's),
# 2 steps of sequences of 256 (instruction samples are longer than TINY's 32; the stand-in base has
# 512 positions), no model parallelism.
TINY_RECIPE = " ".join([o for o in TINY if not o.startswith(("training.train_iters", "training.seq_length"))]
                       + ["training.train_iters=2", "training.seq_length=256", "model.max_position_embeddings=512",
                          "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
                          "parallel.virtual_pipeline=null", "parallel.sequence_parallel=false",
                          "training.recompute=none"])
LORA_TINY = "peft.rank=4 peft.alpha=8 peft.dropout=0.0"


@dataclasses.dataclass(frozen=True)
class Rule:
    doc: str
    pattern: str  # re.search over the command
    action: str  # "run", "rewrite" or "skip"
    why: str = ""
    subs: tuple[tuple[str, str], ...] = ()  # rewrite: (regex, replacement), applied in order


def run(doc, pattern):
    return Rule(doc, pattern, "run")


def rewrite(doc, pattern, subs, why):
    return Rule(doc, pattern, "rewrite", why, tuple(subs))


def skip(doc, pattern, why):
    return Rule(doc, pattern, "skip", why)


R, CK, EV, IT, RP = "README.md", "docs/checkpoints.md", "docs/evaluation.md", "docs/instruction_tuning.md", \
    "docs/report.md"
HUB = "needs the Hub (pip install from PyPI)"
FEWER = [(r"--out ppl/base", "--out ppl/base --samples 8")]
SAMPLES = "an imported checkpoint validates on its config's default batches (80 s on CPU here): 8 sequences"
RULES = [
    # README: install, GPU set-up
    skip(R, r"^(python3 -m venv \.venv|\. \.venv/bin/activate|pip install torch==\S+|pip install -e \"\.\[eval\]\"|"
            r"melama demo|pip install -e \"\.\[dev,dali,eval\]\"|python -m pytest -q)$",
         "the README's first two commands: test_demo.py and CI run them"),
    skip(R, r"pip install (-e )?\"\.\[gpu\]\"", f"{HUB}; GPU extras"),
    skip(R, r"^python -m melama_mcore\.kernels\.build", "needs nvcc and a GPU (test_kernels_compile.py)"),
    run(R, r"^bash benchmarks/gpu_check/run\.sh --dry-run"),
    skip(R, r"^bash benchmarks/gpu_check/run\.sh gpu_check_out", "needs a GPU"),
    # README: the Me-LLaMA workflow
    run(R, r"^for source in pubmed pmc mimic_notes redpajama; do\nmelama preprocess .*\nmelama verify-data "),
    run(R, r"^melama blend-report examples/blends/me_llama_15_1_4\.yaml "),
    rewrite(R, r"^melama convert import-hf --hf-dir checkpoints/llama-2-70b-hf ", [(r"--tp 8 --pp 4", "--tp 2 --pp 2")],
            "the stand-in has 4 heads and 4 layers"),
    run(R, r"^melama plan "),
    rewrite(R, r"^NNODES=20 NODE_RANK=\$RANK MASTER_ADDR=node0 bash examples/pretrain_70b\.sh$",
            [(r".*", f"melama train --config examples/configs/llama2_70b_me_llama.yaml {TINY_RECIPE}")],
            "the script is torchrun around this recipe on 160 GPUs (its launch: test_launch.py); "
            "here one CPU process, 2 steps of the nano shape"),
    skip(R, r"^sbatch examples/pretrain_70b\.slurm$", "needs SLURM"),
    run(R, r"^melama convert export-hf --ckpt outputs/me-llama-70b/checkpoints "),
    # README: instruction tuning
    run(R, r"^for source in general biomedical clinical; do\nmelama preprocess-sft "),
    run(R, r"^melama blend-report examples/blends/me_llama_chat\.yaml "),
    rewrite(R, r"^bash examples/sft_70b\.sh ",
            [(r".*", f"melama train --config examples/configs/llama2_70b_me_llama_chat.yaml {TINY_RECIPE} "
                     f"{LORA_TINY}")],
            "the script is torchrun around this recipe on 8 GPUs; here one CPU process, 2 steps, rank 4"),
    run(R, r"^melama convert export-peft --ckpt outputs/me-llama-70b-chat --out me-llama-70b-chat-lora --base-hf "),
    run(R, r"^melama convert export-hf --ckpt outputs/me-llama-70b-chat --out me-llama-70b-chat-hf --merge-lora "),
    # README: evaluation
    rewrite(R, r"^melama eval --model outputs/me-llama-70b-chat --tasks mibe,mmlu ", [(r"mibe,mmlu", "mibe")],
            "MMLU comes from the Hub"),
    rewrite(R, r"^melama eval --model me-llama-70b-hf --adapter me-llama-70b-chat-lora ",
            [(r"\s*--backend vllm\s*(#.*)?$", ""), (r"--out eval/lora", "--out eval/lora --data-dir mibe_data/")],
            "vLLM needs GPUs (the hf backend instead); the MIBE records are local, not the Hub's"),
    run(R, r"^melama eval rescore eval/chat "),
    rewrite(R, r"^melama eval-ppl --model checkpoints/llama-2-70b-mcore ", FEWER, SAMPLES),
    rewrite(R, r"^torchrun --nproc-per-node 8 -m melama_mcore\.eval\.perplexity ",
            [(r"--nproc-per-node 8", "--nproc-per-node 2"), (r"--tp 8", "--tp 2")], "two CPU processes here"),
    run(R, r"^melama report --out report/ "),
    skip(R, r"^torchrun --nproc-per-node 8 -m melama_mcore\.train --config examples/configs/llama2_7b\.yaml",
         "8 GPUs, a 7B model (torchrun's launch of the trainer: test_launch.py)"),
    run(R, r"^python -m melama_mcore\.train --config examples/configs/llama2_7b\.yaml --print-config$"),
    # docs/checkpoints.md: synopses, optional arguments in brackets
    rewrite(CK, r"^melama convert import-hf ", [(r" \[--vp N\] \[--verify\]", " --verify"),
                                                 (r"--tp 8 --pp 4", "--tp 2 --pp 2")],
            "the optional arguments taken; the stand-in has 4 heads and 4 layers"),
    rewrite(CK, r"^melama convert export-hf --ckpt outputs/me-llama-70b --out ",
            [(r" \[--dtype bf16\] \[--tokenizer T\] \[--verify\]", " --dtype bf16 --verify")],
            "the optional arguments taken (--tokenizer: the run's own is the stand-in's)"),
    rewrite(CK, r"^melama convert export-peft ", [(r" \[--base PATH\] \[--base-hf (\S+)\]", r" --base-hf \1")],
            "the optional --base-hf taken (--base: the run's init_from is the base)"),
    rewrite(CK, r"^melama convert export-hf --ckpt outputs/me-llama-70b-chat ", [(r" \[--base PATH\]", "")],
            "--base left out: the run's init_from is the base"),
    # docs/evaluation.md
    skip(EV, r"pip install -e \"\.\[eval\]\"", HUB),
    skip(EV, r"^echo \"setuptools_scm<9\" > /tmp/build-constraints\.txt$", "the constraint file of that pip install"),
    run(EV, r"^melama eval --model outputs/me-llama-7b --tasks mibe "),
    skip(EV, r"^melama eval --model outputs/me-llama-7b-chat --tasks mibe ",
         "the README's stage-3 command on a LoRA run, names aside (it runs there; time budget)"),
    rewrite(EV, r"^melama eval --model me-llama-13b-chat-hf --adapter lora/pubmedqa ",
            [(r"pubmedqa,medqa,mmlu", "pubmedqa,medqa"), (r" --backend vllm", " --data-dir mibe_data")],
            "MMLU comes from the Hub; vLLM needs GPUs; the MIBE records are local"),
    run(EV, r"^melama eval rescore results/13b-lora "),
    skip(EV, r"^lm_eval --model hf --model_args pretrained=me-llama-13b-chat-hf --tasks mibe",
         "lm-eval's own CLI: another start-up of torch and lm-eval, not afforded here; "
         "its task files are the ones melama eval runs above"),
    skip(EV, r"^melama eval-ppl --model checkpoints/llama-2-13b-mcore ",
         "the README's and docs/report.md's command, names aside (it runs there; time budget)"),
    skip(EV, r"^torchrun --nproc-per-node 8 -m melama_mcore\.eval\.perplexity --model outputs/me-llama-13b ",
         "the README's command with --tp 4 and an optional --samples (it runs there, on 2 processes)"),
    run(EV, r"^melama eval-ppl --model outputs/me-llama-13b --blend \S+ --out ppl/ --all-checkpoints$"),
    run(EV, r"^melama report --out report/ ppl/ outputs/me-llama-13b$"),
    # docs/instruction_tuning.md
    run(IT, r"^melama preprocess-sft --input medinstruct/\*\.jsonl --output-prefix data/medinstruct "),
    run(IT, r"^melama blend-report data/chat_blend\.yaml "),
    run(IT, r"^melama convert export-hf --ckpt outputs/me-llama-70b --out "),
    run(IT, r"^melama convert export-peft --ckpt outputs/me-llama-70b-chat "),
    run(IT, r"^melama convert export-hf --ckpt outputs/me-llama-70b-chat "),
    # docs/report.md
    rewrite(RP, r"^melama eval-ppl --model checkpoints/llama-2-13b-mcore ", FEWER, SAMPLES),
    run(RP, r"^melama eval-ppl --model outputs/me-llama-13b "),
    rewrite(RP, r"^melama eval --model (llama-2-13b-hf|outputs/me-llama-13b-chat) --tasks mibe,mmlu",
            [(r"mibe,mmlu", "mibe")], "MMLU comes from the Hub"),
    run(RP, r"^melama report --out report/ "),
]
# Names a doc uses for what the README's commands made (or the stand-ins), linked in its folder.
README_NAMES = ["examples", "benchmarks", "checkpoints", "outputs", "data", "mibe_data", "medinstruct",
                "me-llama-70b-hf"]
DOC_NAMES = {
    CK: {"Llama-2-70b-hf": "checkpoints/llama-2-70b-hf"},
    EV: {"me-llama-13b-chat-hf": "me-llama-70b-hf", "lora/pubmedqa": "me-llama-70b-chat-lora",
         "outputs/me-llama-7b": "outputs/me-llama-70b", "outputs/me-llama-13b": "outputs/me-llama-70b"},
    IT: {"llama-2-13b-hf": "checkpoints/llama-2-70b-hf"},
    RP: {"checkpoints/llama-2-13b-mcore": "checkpoints/llama-2-70b-mcore",
         "outputs/me-llama-13b": "outputs/me-llama-70b",
         "checkpoints/llama-2-13b-hf": "checkpoints/llama-2-70b-hf",
         "llama-2-13b-hf": "checkpoints/llama-2-70b-hf", "outputs/me-llama-13b-chat": "outputs/me-llama-70b-chat"},
}


def blocks(doc: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / doc).read_text(encoding="utf-8"), re.S)


def split_commands(block: str) -> list[str]:
    """Top-level commands of a block: continuation lines joined, `&&` chains split, comment lines
    dropped, a loop one command (its lines joined by newlines, stripped)."""
    out, depth = [], 0
    for line in re.sub(r"\\\n\s*", "", block).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if depth:
            out[-1] += "\n" + line
        else:
            out.extend(re.split(r"\s+&&\s+", line))
        depth += line.startswith(("for ", "while ", "if ")) - (line in ("done", "fi"))
    return out


def classified(doc: str) -> list[tuple[str, Rule]]:
    """(command, its rule) in the doc's order; fails on a command that no rule or several classify."""
    out = []
    for command in (c for block in blocks(doc) for c in split_commands(block)):
        rules = [r for r in RULES if r.doc == doc and re.search(r.pattern, command)]
        assert len(rules) == 1, (f"{doc}: {command!r} is classified by {len(rules)} rules of "
                                 "tests/test_docs_commands.py RULES: give it exactly one (run, rewrite or skip)")
        out.append((command, rules[0]))
    return out


def as_run(command: str, rule: Rule) -> str:
    for pattern, replacement in rule.subs:
        new = re.sub(pattern, replacement, command, count=1, flags=re.S)
        assert new != command, f"{rule.doc}: rewrite {pattern!r} no longer applies to {command!r}"
        command = new
    return command


def test_every_documented_command_is_classified_by_one_rule_and_every_rule_is_used():
    counts = {doc: len(blocks(doc)) for doc in DOCS if blocks(doc)}
    assert counts == {"README.md": 8, CK: 1, EV: 5, IT: 2, RP: 1}, counts  # a new block is a new command
    used = set()
    for doc in counts:
        for command, rule in classified(doc):
            used.add(rule)
            as_run(command, rule)  # every substitution still applies
            assert rule.action in ("run", "rewrite", "skip") and (rule.action == "run" or rule.why)
    stale = [r for r in RULES if r not in used]
    assert not stale, f"rules that match no documented command (delete them): {stale}"


def test_split_commands():
    block = ("# a comment\nA=1 b --x \\\n    --y  # why\nc && . d\nfor s in x y; do\n    e \"$s\"\ndone\n")
    assert split_commands(block) == ["A=1 b --x --y  # why", "c", ". d", "for s in x y; do\ne \"$s\"\ndone"]


# The corpus written for each source of examples/blends/me_llama_15_1_4.yaml (and of the chat blend).
SOURCES = {"pubmed": "biomedical", "pmc": "biomedical", "mimic_notes": "clinical", "redpajama": "general"}
CHAT_SOURCES = ["general", "biomedical", "clinical"]


@pytest.fixture()
def layout(tmp_path, corpus, spm_model):
    """The repository root as the README expects it: the repository's examples/ and benchmarks/,
    zstd JSONL shards per source, instruction JSONL per chat source, Meta's 70B folder (a random LLaMA
    of the nano shape with the test tokenizer), MIBE-shaped records, a BERTScore model. Returns
    (the folder, documents written per source, the environment the commands run in)."""
    import sentencepiece
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from melama_mcore.checkpoint.hf_folder import copy_tokenizer
    from melama_mcore.demo.mibe import write_demo_records
    from melama_mcore.models.llama import state_dict_adapter as sda
    from melama_mcore.models.llama.config_registry import PRESETS
    from test_eval_metrics import write_tiny_bert

    root = tmp_path / "readme"
    shutil.copytree(REPO / "examples", root / "examples")
    (root / "benchmarks").symlink_to(REPO / "benchmarks")
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    documents = {}
    for source, domain in SOURCES.items():
        lines = corpus[domain].read_bytes().splitlines(keepends=True)
        if source in ("pubmed", "pmc"):  # two sources from one domain: halves, so they differ
            lines = lines[::2] if source == "pubmed" else lines[1::2]
        documents[source] = len(lines)
        (root / source).mkdir()
        for part in range(2):  # several shards per source, as the glob in the README expects
            (root / source / f"part-{part:03d}.jsonl.zst").write_bytes(compressor.compress(b"".join(lines[part::2])))
    for i, source in enumerate(CHAT_SOURCES):
        (root / "instructions" / source).mkdir(parents=True)
        write_jsonl(root / "instructions" / source / "part-000.jsonl", [r for r, _, _ in RECORDS[i:] * 20])
    (root / "medinstruct").symlink_to("instructions/biomedical")
    hf = root / "checkpoints" / "llama-2-70b-hf"
    arch = dataclasses.replace(PRESETS["nano"], vocab_size=400, max_position_embeddings=512)
    model = LlamaForCausalLM(LlamaConfig(**sda.hf_config(arch, torch.float32)))
    with torch.no_grad():  # every generation ends at once (EOS first): an evaluation costs its prompts only
        model.model.embed_tokens.weight[:, 0] = 100.0  # a large first coordinate through the residual stream...
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[sentencepiece.SentencePieceProcessor(model_file=spm_model).eos_id(), 0] = 10.0  # ...is EOS
    model.save_pretrained(hf)
    copy_tokenizer(Path(spm_model), hf)
    mibe = root / "mibe_data"
    write_demo_records(mibe, records_per_task=1)  # 4 of MIBE's 12 datasets; the others in their kind's schema
    for task, like in {"medqa": "pubmedqa", "medmcqa": "pubmedqa", "ddi": "mednli", "mtsample": "pubmedqa",
                       "bionli": "mednli", "mimiccxr": "pubmedsum"}.items():
        shutil.copyfile(mibe / f"{like}.jsonl", mibe / f"{task}.jsonl")
    write_jsonl(mibe / "emrqa.jsonl", [{"query": "Where is the mass?\nANSWER:", "answer": "left lower lobe"}])
    write_jsonl(mibe / "hoc.jsonl", [{"query": "Which hallmarks does the abstract discuss?\nANSWER:",
                                      "choices": ["evading growth suppressors", "inducing angiogenesis"],
                                      "gold": [0, 1]}])
    bert = write_tiny_bert(tmp_path / "bert")
    # `melama` forwards to one warm interpreter that runs this checkout's code (tests/melama_shim.py).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MELAMA_BERTSCORE_MODEL": str(bert)}
    bin_dir, sock = tmp_path / ".bin", tmp_path / "melama.sock"
    bin_dir.mkdir()
    shim = Path(__file__).with_name("melama_shim.py")
    (bin_dir / "melama").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{shim}" "{sock}" "$@"\n')
    (bin_dir / "melama").chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    server = subprocess.Popen([sys.executable, str(shim), "serve", str(sock)], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not sock.exists() and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sock.exists(), "the melama shim did not start"
    yield root, documents, env
    server.kill()
    server.wait()


def _bash(folder: Path, env: dict, command: str) -> str:
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=folder, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{folder.name}: {command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, f"{command}\n{result.stderr[-3000:]}"
    return result.stdout


def run_doc(doc: str, folder: Path, env: dict) -> dict[str, str]:
    """Run the doc's commands in order (as rewritten); {command as written: its stdout}."""
    outputs = {}
    for command, rule in classified(doc):
        if rule.action != "skip":
            start = time.monotonic()
            outputs[command] = _bash(folder, env, as_run(command, rule))
            print(f"{time.monotonic() - start:6.1f} s  {doc}: {command.splitlines()[0][:100]}")
    return outputs


@pytest.mark.slow
def test_every_documented_command_runs(layout):
    from peft import AutoPeftModelForCausalLM

    root, documents, env = layout
    out = run_doc("README.md", root, env)
    by_start = lambda prefix: next(v for k, v in out.items() if k.startswith(prefix))  # noqa: E731
    # Stage 1: every source tokenised into data/<source>_text_document and verified.
    verified = {Path(s["prefix"]).name: s["documents"] for s in
                map(json.loads, re.findall(r"^\{.*\}$", by_start("for source in pubmed"), re.M))}
    assert verified == {f"{source}_text_document": count for source, count in documents.items()}
    # Stage 2: the example blend finds them where stage 1 wrote them.
    rows = {line.split()[0]: line.split() for line in by_start("melama blend-report examples/blends/me_llama_15_1_4")
            .splitlines()[2:] if line.split()[0] in ("biomedical", "clinical", "general")}
    assert {name: row[2] for name, row in rows.items()} == {"biomedical": "75.0%", "clinical": "5.0%",
                                                            "general": "20.0%"}
    # The adapter loads as docs/instruction_tuning.md says, its base the export named by --base-hf.
    model = AutoPeftModelForCausalLM.from_pretrained(root / "me-llama-70b-chat-lora")
    assert Path(model.peft_config["default"].base_model_name_or_path).resolve() == (root / "me-llama-70b-hf").resolve()
    assert "AutoPeftModelForCausalLM.from_pretrained" in (REPO / IT).read_text()
    assert json.loads((root / "eval" / "chat" / "results.json").read_text())["protocol"]
    assert (root / "report" / "report.md").is_file()
    # Each other doc in a folder of its own that links to what the README's commands made.
    for doc in DOCS[1:]:
        if not blocks(doc):
            continue
        folder = root.parent / Path(doc).stem
        folder.mkdir()
        for name in README_NAMES:
            if name in ("checkpoints", "outputs"):  # a folder of links, where the doc's own names go too
                (folder / name).mkdir()
                for entry in (root / name).iterdir():
                    (folder / name / entry.name).symlink_to(entry)
            else:
                (folder / name).symlink_to(root / name)
        for name, target in DOC_NAMES.get(doc, {}).items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).symlink_to(root / target)
        if doc == IT:  # the user's blend of their preprocess-sft prefix, which the doc's next command reads
            (folder / "data").unlink()
            (folder / "data").mkdir()
            (folder / "data" / "chat_blend.yaml").write_text(
                "sources:\n  - name: medinstruct\n    weight: 1\n    train: data/medinstruct_sft_document\n")
        for name in ("me-llama-70b-hf",) if doc in (CK, IT) else ():  # the doc exports it itself
            (folder / name).unlink()
        run_doc(doc, folder, env)
