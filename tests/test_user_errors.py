"""Issue 14, the trainer's side: ordinary mistakes end in one `error:` line with exit 2 (never a
traceback, never after training has started), messages say what is true, and the logs stay quiet.
(The data side is in test_data_hostile.py, the converter's in test_convert.py.)"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from melama_mcore.cli import main as melama
from melama_mcore.distributed.launch import free_local_port
from trunk_fixtures import TINY, data_overrides, run_train


def _train(tiny_data, tmp_path, *overrides: str) -> int:
    return melama(["train", f"output_dir={tmp_path / 'out'}", *TINY, *data_overrides(tiny_data), *overrides])


def _error(err: str) -> str:
    """The error message: one `error:` line, or a configuration error's list of problems under it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), err
    assert all(line.startswith("  - ") for line in lines[1:]), err
    assert "Traceback" not in err
    return "\n".join(lines)


@pytest.mark.parametrize("where", ["output_dir is a file", "checkpoints is a file", "read-only output_dir"])
def test_an_unusable_output_folder_is_refused_at_start_up(where, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    if where == "output_dir is a file":
        out.write_text("not a folder")
    elif where == "checkpoints is a file":
        out.mkdir()
        (out / "checkpoints").write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        out.mkdir()
        out.chmod(0o500)
    assert _train(tiny_data, tmp_path) == 2
    line = _error(capsys.readouterr().err)
    assert line.startswith(f"error: output_dir {out}")
    assert "is a file, not a folder; choose another output_dir" in line or f"cannot write in {out} (" in line
    assert not dist.is_initialized()  # refused before any process group, so before any step


def test_a_failed_start_removes_the_output_folders_it_created(tiny_data, tmp_path, capsys):
    """Also: a blend given as a folder says so (not "blend file not found")."""
    out = tmp_path / "new" / "run"
    code = melama(["train", f"output_dir={out}", *TINY, f"data.tokenizer={tiny_data['tokenizer']}",
                   f"data.blend={tmp_path}"])
    assert code == 2
    assert _error(capsys.readouterr().err) == (f"error: {tmp_path} is a folder, not a blend file: give the blend's "
                                               "YAML file (data.blend; see examples/configs/)")
    assert not (tmp_path / "new").exists()


def _fake_checkpoint(folder: Path, *overrides: str) -> Path:
    """What init_from's start-up check reads of a checkpoint: its metadata.json and config.yaml."""
    from melama_mcore.config.job_config import dump_config, load_config

    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text("{}")
    (folder / "config.yaml").write_text(dump_config(load_config(None, list(overrides))))
    return folder


@pytest.mark.parametrize("kind", ["adapter checkpoint", "Hugging Face folder", "interrupted save"])
def test_an_init_from_that_cannot_start_a_run_says_what_to_give(kind, tiny_data, tmp_path, capsys):
    if kind == "adapter checkpoint":
        given = _fake_checkpoint(tmp_path / "lora", "peft.method=lora", "checkpoint.init_from=/models/base")
        message = (f"checkpoint.init_from {given} is an adapter checkpoint (LoRA rank 16): it holds LoRA adapters "
                   "only, not a model. Start from its base (/models/base), or from the model with them merged in: "
                   f"`melama convert export-hf --ckpt {given} --merge-lora --out HF`")
    elif kind == "Hugging Face folder":
        given = tmp_path / "llama-hf"
        given.mkdir()
        (given / "config.json").write_text("{}")
        message = (f"{given} is a Hugging Face model folder, not a checkpoint of this project: import it first with "
                   f"`melama convert import-hf --hf-dir {given} --out CKPT`")
    else:
        given = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "iter_0000010.partial")
        message = f"{given} is an interrupted save, never published"
    assert _train(tiny_data, tmp_path, f"checkpoint.init_from={given}") == 2
    assert message in _error(capsys.readouterr().err)
    assert not dist.is_initialized() and not (tmp_path / "out").exists()


def test_the_process_groups_are_shut_down_when_the_trainer_fails_to_start(monkeypatch, capsys):
    """A Trainer that fails after start() (a checkpoint that does not fit, found while loading) must
    not leave the process groups to the interpreter's exit."""
    from melama_mcore import train
    from melama_mcore.errors import CheckpointError

    def fails_after_start(cfg):
        raise CheckpointError("checkpoint X does not fit this run")

    shutdowns = []
    monkeypatch.setattr(train, "Trainer", fails_after_start)
    monkeypatch.setattr(train.parallel, "shutdown", lambda: shutdowns.append(True))
    assert melama(["train", "training.device=cpu"]) == 2
    assert _error(capsys.readouterr().err) == "error: checkpoint X does not fit this run"
    assert shutdowns == [True]


def test_a_seed_checkpoint_folder_that_exists_is_refused_first(tiny_data, tmp_path, capsys):
    seed = tmp_path / "seed"
    seed.mkdir()
    code = melama(["train", "--create-seed-checkpoint", str(seed), f"output_dir={tmp_path / 'out'}", *TINY,
                   *data_overrides(tiny_data)])
    assert code == 2
    assert _error(capsys.readouterr().err) == (f"error: --create-seed-checkpoint {seed} already exists: choose a new "
                                               "folder, or delete it first")
    assert not dist.is_initialized() and not (tmp_path / "out").exists()


def test_a_missing_init_from_says_it_does_not_exist(tiny_data, tmp_path, capsys):
    assert _train(tiny_data, tmp_path, f"checkpoint.init_from={tmp_path / 'nowhere'}") == 2
    line = _error(capsys.readouterr().err)
    assert f"checkpoint.init_from {tmp_path / 'nowhere'} does not exist" in line
    assert not dist.is_initialized()


def test_train_help_prints_no_warnings():
    result = subprocess.run([sys.executable, "-m", "melama_mcore.cli", "train", "--help"], capture_output=True,
                            text=True, check=True)
    assert result.stdout.startswith("usage: melama train") and result.stderr == ""


def test_eta_of_a_resumed_run_counts_from_its_first_step(monkeypatch, tmp_path, caplog):
    """Resumed at step 50 of 100: after one step of 2 s, 49 steps remain at 2 s each."""
    from melama_mcore.components import metrics

    clock = itertools.chain([1000.0], itertools.repeat(1002.0))  # the logger's start, then one step later
    monkeypatch.setattr(metrics.time, "time", lambda: next(clock))
    logger = metrics.MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, num_gpus=2, flops_per_token=1.0,
                                   peak_tflops=None, train_iters=100, first_step=50)
    with caplog.at_level("INFO", logger=metrics.log.name):
        logger.log_step(metrics.StepStats(step=51, loss=1.0, lr=1e-4, grad_norm=1.0, step_time_s=2.0, tokens=100))
    logger.close()
    assert "eta 0:01:38" in caplog.text  # 49 x 2 s
    assert "tok/s/process" in caplog.text or "tok/s/gpu" in caplog.text


def test_without_validation_data_no_empty_validation_line(tmp_path, caplog):
    # Issue 19: `validation at step 1 |` was printed with nothing after it (logging.eval_iters=0).
    from melama_mcore.components import metrics

    logger = metrics.MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, num_gpus=1, flops_per_token=1.0,
                                   peak_tflops=None, train_iters=4)
    with caplog.at_level("INFO", logger=metrics.log.name):
        logger.log_eval(1, {})
        logger.log_eval(2, {"pubmed": 2.0})
    logger.close()
    assert "validation at step 1" not in caplog.text
    assert "validation at step 2 | pubmed loss 2.0000 ppl 7.39" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" in r] == [2]


def test_cpu_runs_print_no_grad_access_warning():
    # Issue 19: megatron's distributed optimizer reads .grad of views of its parameters in every
    # zero_grad; under cpu_compat's function mode torch blamed cpu_compat.py, so every CPU run printed
    # the warning. The same access outside the mode must still warn (the probe is the real thing).
    probe = ("import warnings, torch\n"
             "from melama_mcore.distributed import cpu_compat\n"
             "param = torch.nn.Parameter(torch.ones(4))\n"
             "def access():\n"
             "    with warnings.catch_warnings(record=True) as caught:  # the filters as a run has them\n"
             "        assert param.view(-1)[:2].grad is None\n"
             "    return sum('.grad attribute' in str(w.message) for w in caught)\n"
             "before = access()\n"
             "cpu_compat.enable()\n"
             "print(before, access())\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "0"] and result.stderr == ""


@pytest.mark.slow
def test_a_config_error_under_torchrun_is_printed_once(tiny_data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_local_port()),
           "-m", "melama_mcore.train", f"output_dir={tmp_path / 'out'}", *TINY, *data_overrides(tiny_data),
           "parallel.tensor_parallel=3"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors  # rank 0's; the other rank says nothing
    assert output.count("world size 2 is not divisible by tensor_parallel x pipeline_parallel = 3") == 1


@pytest.mark.slow
def test_init_from_of_another_model_says_what_to_change(tiny_data, tmp_path):
    """A weights-only start from a checkpoint of another size: refused once (not once per rank), naming
    the field and what to do -- not "another output_dir", which is a resume's remedy."""
    seed = tmp_path / "seed"
    run_train(tmp_path / "init", data_overrides(tiny_data) + [f"--create-seed-checkpoint={seed}"])
    result = run_train(tmp_path / "run", data_overrides(tiny_data) + [f"checkpoint.init_from={seed}",
                                                                       "model.num_layers=2"], nproc=2, check=False)
    assert result.returncode == 2, result.stdout[-2000:]
    # Both ranks find the same difference; rank 0 alone says it. Nor does either rank warn that a CPU
    # has no CUDA kernels (rank 0 notes it).
    [line] = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert "[rank1]" not in result.stdout, result.stdout[-2000:]
    assert "model.num_layers: checkpoint 4, this run 2" in line and "checkpoint.init_from" in line
    assert "another output_dir" not in line and "Traceback" not in result.stdout
    metrics = Path(tmp_path / "run" / "metrics.jsonl")
    assert not metrics.exists() or not [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
