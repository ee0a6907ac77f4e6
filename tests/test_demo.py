"""The README's first command ends in `melama demo`; the demo runs all its stages through the
installed `melama` command and says what it did, quietly. Smaller than the default (150 documents per
domain, a 512-piece tokenizer, 10 pre-training steps and so 4 LoRA steps) to fit CI: the stages and
the code are the default's."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--docs-per-source", "150", "--vocab-size", "512", "training.train_iters=10"]


def readme_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)


def test_readme_opens_with_the_demo_and_the_tests():
    demo, tests = readme_commands()[:2]
    assert demo.endswith("&& melama demo"), demo
    assert tests.endswith("&& python -m pytest -q"), tests
    assert tests in (REPO / ".ci" / "run").read_text()  # CI runs the README's test command


@pytest.mark.slow
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("transformers", "peft", "lm_eval")),
                    reason="the demo's export and evaluation stages need the eval extra")
def test_demo_runs_every_stage(tmp_path):
    melama = shutil.which("melama", path=str(Path(sys.executable).parent)) or shutil.which("melama")
    assert melama, "the melama command is not installed (pip install -e .)"
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONWARNINGS="default")  # a user's console: warnings would show
    result = subprocess.run([melama, "demo", "--output-dir", str(out), *QUICK], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, timeout=600, cwd=tmp_path)
    output = result.stdout
    assert result.returncode == 0, output[-4000:]
    assert [int(n) for n in re.findall(r"^\[demo\] (\d)/9 ", output, flags=re.M)] == list(range(1, 10))
    assert "resumed from" in output
    for noise in ("Traceback", "Warning:", "fatal:"):
        assert noise not in output, f"{noise!r} in the demo's output"

    pretraining = re.search(r"pre-training +loss ([\d.]+) \(step 1\) -> ([\d.]+) \(step 10\)", output)
    assert pretraining and float(pretraining[2]) < float(pretraining[1]), output[-2000:]
    assert re.search(r"LoRA chat +loss [\d.]+ -> [\d.]+ over 4 steps", output), output[-2000:]
    assert "chat answer" in output
    assert (out / "hf" / "base" / "config.json").exists()
    assert json.loads((out / "hf" / "chat-lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    results = json.loads((out / "eval" / "results.json").read_text())
    assert sorted(k for k in results if k != "protocol") == ["i2b2", "mednli", "pubmedqa", "pubmedsum"]
    assert set(results["pubmedsum"]) >= {"rouge_1", "rouge_2", "rouge_l"}
