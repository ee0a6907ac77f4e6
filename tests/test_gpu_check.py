"""The GPU check (benchmarks/gpu_check/) on CPU, so that it cannot rot between GPU sessions:
`run.sh --cpu-smoke` runs every stage's code path at toy sizes (only GPU-only parts skip, each with
its reason); a stage that overruns its budget or fails is recorded and the next one runs; the dry
listing fits the GPU run in 8 minutes; and what only a GPU run reads (pytest's junit file, the kernel
benchmark's JSON, a device-vs-CPU comparison) is read right from hand-made inputs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "benchmarks" / "gpu_check" / "run.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check import __main__ as driver  # noqa: E402
from gpu_check import bench, jobs, report, runner, stage_env, stage_eval, stage_kernels  # noqa: E402
from gpu_check.jobs import ForkLauncher, SubprocessLauncher  # noqa: E402

GPU_ONLY_SKIPS = {("a", "GPU facts"), ("b", "build"), ("b", "bandwidth"), ("f", "equal to the CPU's"),
                  ("b", "float64 references (pytest " + " ".join(stage_kernels.TESTS) + ")")}


def call(argv: list[str]) -> tuple[int, str, str]:
    """The driver in this process (its environment for jobs restored afterwards)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), mock.patch.dict(os.environ):
        code = driver.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage(tmp_path):
    """One run.sh --cpu-smoke, as CI runs it: every stage ends ok; only the GPU-only parts skip."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", str(RUN_SH), "--cpu-smoke", str(out), "--work", str(tmp_path / "work")],
                            capture_output=True, text=True, env=env, timeout=900)
    log = (out / report.LOG_NAME).read_text() if (out / report.LOG_NAME).exists() else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + log[-6000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([report.JSON_NAME, report.MD_NAME, report.LOG_NAME])
    state = json.loads((out / report.JSON_NAME).read_text())
    stages = {s["key"]: s for s in state["stages"]}
    assert state["complete"] and state["mode"] == "cpu-smoke"
    assert {k: s["status"] for k, s in stages.items()} == {"a": "ok", "b": "skipped", "c": "ok", "d": "ok",
                                                             "e": "ok", "f": "ok"}
    skipped = {(k, name): part["detail"] for k, s in stages.items() for name, part in s["parts"].items()
               if part["status"] == "skipped"}
    assert set(skipped) == GPU_ONLY_SKIPS, "only the GPU-only parts may skip on CPU"
    assert all("CUDA" in reason or "cpu-smoke" in reason for reason in skipped.values()), skipped
    assert not [s["error"] for s in stages.values() if s["error"]]

    b, c, d, e, f = (stages[k] for k in "bcdef")
    assert b["metrics"]["tests"]["skipped"] and not b["metrics"]["tests"]["failed"]  # the GPU tests were found
    m = c["metrics"]  # bf16 + distributed optimizer vs fp32, and the resume, as the stage checked them
    steps = {str(i) for i in range(1, 9)}
    assert m["bf16_vs_fp32"] < 2e-2 and set(m["device_losses"]) == set(m["reference_losses"]) == steps
    assert all(m["resumed_losses"][str(s)] == m["device_losses"][str(s)] for s in range(5, 9))
    assert [r["backend"] for r in d["metrics"]["rows"]] == ["native", "local"]
    assert d["metrics"]["sdpa"]["ran"] and d["metrics"]["planner_at_measured_mfu"]["best"]["layout"]["tp"] == 1
    assert [r["backend"] for r in e["metrics"]["rows"]] == ["native+lora"]
    assert f["metrics"]["records"] == 4 and f["parts"]["eval on the device"]["status"] == "ok"

    md = (out / report.MD_NAME).read_text().splitlines()
    assert md[0].startswith("**Device:** CPU only") and md[2].startswith("| stage | status |")
    assert len([line for line in md if line.startswith("| ") and line[2] in "abcdef"]) == 6
    assert "melama_mcore.train" in (out / report.LOG_NAME).read_text()


def test_dry_run_lists_every_stage_within_eight_minutes():
    code, listing, _ = call(["--dry-run"])
    assert code == 0
    gpu = sum(s.budget_s for s in driver.STAGES)
    assert gpu <= 450, "8 minutes on one H100, with about 30 s left for run.sh's install and start-up"
    assert f"6 stages, {gpu:.0f} s allowed in all" in listing
    for s in driver.STAGES:
        assert f"{s.key}. {s.title}" in listing
    assert "--preset llama2-70b --layers 2 --seq 4096" in listing and "--preset llama2-13b --layers 4" in listing
    code, smoke, _ = call(["--dry-run", "--cpu-smoke", "--stages", "ab"])
    assert code == 0 and "2 stages" in smoke and "--preset nano" not in smoke and "skipped on CPU" in smoke


def test_user_mistakes_are_one_line_errors(tmp_path):
    (tmp_path / report.JSON_NAME).write_text("{}")
    code, _, err = call([str(tmp_path)])
    assert code == 2
    assert err == f"error: {tmp_path} already holds {report.JSON_NAME}: choose a new OUT_DIR or delete it\n"
    code, _, err = call(["--stages", "axz", str(tmp_path / "new")])
    assert code == 2 and err.startswith("error: --stages axz: no stage x, z")


STAGE_SCRIPT = textwrap.dedent("""
    import sys, time
    print("started", flush=True)
    time.sleep(float(sys.argv[1]))
    sys.exit(int(sys.argv[2]))
""")


@pytest.mark.parametrize("launcher", [SubprocessLauncher(), ForkLauncher(preload=[])], ids=["subprocess", "forkserver"])
def test_an_overrunning_or_failing_stage_is_recorded_and_the_next_one_runs(tmp_path, launcher):
    script = tmp_path / "job.py"
    script.write_text(STAGE_SCRIPT)

    def stage(key, sleep, code, budget):
        def run(ctx):
            ctx.job("job", script, [sleep, code])
            ctx.part("job", True, "ran")
        return runner.Stage(key, f"stage {key}", budget, run, lambda mode: [])

    log = tmp_path / "log"
    records = []
    for s in (stage("a", 60, 0, 1.0), stage("b", 0, 3, 30.0), stage("c", 0, 0, 30.0)):
        ctx = runner.Context(s, runner.Mode(smoke=True), launcher, tmp_path / "work", tmp_path, log, dict(os.environ),
                             {}, s.budget_s)
        records.append(runner.run_stage(s, ctx))
    a, b, c = records
    assert a.status == "timeout" and a.elapsed_s < 10 and "budget ran out" in a.error
    assert a.jobs[0]["returncode"] is None  # killed
    assert b.status == "failed" and b.error == "job failed (exit 3): started"
    assert c.status == "ok" and c.parts == {"job": {"status": "ok", "detail": "ran"}}
    assert log.read_text().count("===== ") == 6  # a header and a status line per job


def test_junit_counts_reads_passed_failed_and_skipped(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
        <testcase classname="tests.test_kernels" name="test_cuda_swiglu[a]"/>
        <testcase classname="tests.test_kernels" name="test_cuda_swiglu[b]"><failure message="x">t</failure></testcase>
        <testcase classname="tests.test_kernels" name="test_cuda_rotary[c]"><error message="y"/></testcase>
        <testcase classname="tests.test_kernels" name="test_cuda_rms_norm[d]">
          <skipped type="pytest.skip" message="needs a CUDA GPU">why</skipped></testcase>
        </testsuite></testsuites>""")
    counts = stage_kernels.junit_counts(path)
    assert counts["passed"] == ["tests.test_kernels::test_cuda_swiglu[a]"]
    assert counts["failed"] == ["tests.test_kernels::test_cuda_swiglu[b]", "tests.test_kernels::test_cuda_rotary[c]"]
    assert counts["skipped"] == ["tests.test_kernels::test_cuda_rms_norm[d]"]
    assert counts["skip_reasons"] == ["needs a CUDA GPU"]


def test_bandwidth_summary_compares_with_copy_and_eager():
    """benchmarks/kernels.py --json rows: GB/s, share of the copy bandwidth, speed-up over eager."""
    def row(op, tp, pass_, impl, ms, gbs):
        return {"op": op, "tp": tp, "shape": "s", "pass": pass_, "impl": impl, "median_ms": ms, "gb_per_s": gbs,
                "of_copy": gbs / 3000}

    text, figures = stage_kernels.bandwidth_summary({"copy_gb_per_s": 3000.0, "rows": [
        row("rms_norm", 1, "fwd+bwd", "melama", 0.5, 2400.0), row("rms_norm", 1, "fwd+bwd", "eager", 1.5, 800.0),
        row("cross-entropy", 1, "fwd+bwd", "melama", 1.0, 1500.0),
        row("cross-entropy", 1, "fwd+bwd", "eager", 2.0, 750.0),
        row("cross-entropy", 1, "fwd+bwd", "megatron", 4.0, 375.0), row("swiglu", 8, "fwd", "melama", 0.1, 2000.0)]})
    assert figures["rms_norm tp1 fwd+bwd"]["speedup_vs_eager"] == pytest.approx(3.0)
    assert figures["rms_norm tp1 fwd+bwd"]["of_copy"] == pytest.approx(0.8)
    assert figures["swiglu tp8 fwd"]["speedup_vs_eager"] is None
    assert text == ("copy 3,000 GB/s; fwd+bwd at TP 1, GB/s (% of copy, vs eager): rms_norm 2,400 (80%, 3.00x eager); "
                    "cross-entropy 1,500 (50%, 2.00x eager, megatron 375)")


def test_throughput_rows_are_read_field_by_field():
    row = {"backend": "native", "step_time_s": 1.25, "tokens_per_s_per_gpu": 26214.4, "tflops_per_gpu": 412.3,
           "mfu": 0.4169, "peak_memory_gib": 45.12, "predicted_memory_gib": 43.04, "all_steps_ok": True}
    assert bench.describe(row) == ("native: 1.250 s/step, 26,214 tokens/s/GPU, 412.3 TFLOP/s, MFU 41.7%, "
                                   "peak 45.1 GiB (planner 43)")
    with pytest.raises(runner.StageError, match="no 'mfu' in its rows"):
        bench.field({k: v for k, v in row.items() if k != "mfu"}, "mfu")


def test_device_and_cpu_generations_are_compared_record_by_record(tmp_path):
    for where, texts in (("device", ["a b", "c", ""]), ("cpu", ["a b", "c d", ""])):
        (tmp_path / where).mkdir()
        for task in stage_eval.TASKS:
            (tmp_path / where / f"samples_{task}.jsonl").write_text("".join(
                json.dumps({"doc_id": i, "prompt": "p", "generation": t, "prediction": None, "gold": 0}) + "\n"
                for i, t in enumerate(texts if task == "mednli" else texts[:1])))
    device, cpu = stage_eval.generations(tmp_path / "device"), stage_eval.generations(tmp_path / "cpu")
    assert len(cpu) == 4 and stage_eval.differing(device, cpu) == ["mednli 1"]
    del device[("pubmedqa", 0)]
    assert stage_eval.differing(device, cpu) == ["mednli 1", "pubmedqa 0"]


def test_report_marks_an_incomplete_run_and_failed_parts():
    state = {"complete": False, "mode": "gpu", "started": "2026-12-06 10:00 UTC", "commit": "abc1234",
             "command": "run.sh out", "budget_s": 430, "install": "installed 24 wheels from .whl/ in 9 s",
             "device": {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "capability": "9.0", "driver": "580.1",
                        "cuda_runtime": "13.0", "torch": "2.11.0+cu130", "python": "3.12.3"},
             "stages": [{"key": "a", "title": "environment", "budget_s": 25, "status": "failed", "elapsed_s": 3.0,
                         "summary": "megatron.core 0.16.1", "error": None, "metrics": {}, "jobs": [],
                         "parts": {"required imports": {"status": "failed", "detail": "lm_eval: ImportError: x"},
                                   "GPU facts": {"status": "skipped", "detail": "no CUDA device"}}}]}
    md = report.markdown(state).splitlines()
    assert md[0] == ("**Device:** NVIDIA H100 80GB HBM3 · 79 GiB · sm_90 · driver 580.1 · CUDA 13.0 · "
                     "torch 2.11.0+cu130 · Python 3.12.3 · 2026-12-06 10:00 UTC · commit abc1234 · gpu run")
    assert md[2].startswith("**Incomplete:**")
    assert md[6] == ("| a. environment | failed | 3 (25) | megatron.core 0.16.1; FAILED required imports: lm_eval: "
                     "ImportError: x (skipped: GPU facts: no CUDA device) |")
    assert md[-1].startswith("`run.sh out`: 3 s in stages of 430 s allowed, installed 24 wheels from .whl/ in 9 s")


# ---- the GPU run's own branches, with every job answered as on a GPU machine -------------------------
class GpuMachine:
    """A launcher that answers each job the way it answers on an H100 (files and log lines in the
    formats the smoke reads from the real programs), so that the GPU-only branches of every stage run
    here: the kernel build and bandwidth, MFU into the planner, the CPU-vs-GPU evaluation."""

    def __init__(self, resume_exact: bool = True, kernels_load: bool = True):
        self.resume_exact, self.kernels_load, self.envs = resume_exact, kernels_load, []

    def run(self, target, args, env, timeout, log, cwd=None):
        from gpu_check.jobs import JobResult

        self.envs.append(env)
        opt = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a and not a.startswith("data.")}
        value = {a: b for a, b in zip(args, args[1:])}
        text = ""
        if target == "gpu_check.stage_env":
            imports = {m: {"ok": m not in ("transformer_engine", "flash_attn", "apex", "vllm", "nvidia.dali"),
                           "version": "1.0", "error": "ModuleNotFoundError"} for m in
                       [*stage_env.REQUIRED, *stage_env.OPTIONAL]}
            write_json(value["--json"], {"python": "3.12.3", "torch": "2.11.0+cu130", "cpus": 16, "cuda": True,
                                         "cuda_runtime": "13.0", "name": "NVIDIA H100 80GB HBM3", "devices": 1,
                                         "capability": "9.0", "memory_gib": 79.2, "driver": "580.159.04",
                                         "nvcc": "Build cuda_13.0", "imports": imports})
        elif target == "gpu_check.stage_kernels":
            write_json(value["--json"], {"archs": ["80", "90"], "build_s": 21.0, "library": "lib.so",
                                         "build_error": None, "backend": "cuda" if self.kernels_load else "torch",
                                         "reason": "" if self.kernels_load else "nvcc failed (1): x"})
        elif target == "pytest":
            Path(value["--junitxml"]).write_text('<testsuites><testsuite><testcase classname="t" name="test_cuda_a"/>'
                                                 '<testcase classname="t" name="test_cuda_b"/></testsuite>'
                                                 '</testsuites>')
        elif target.endswith("kernels.py"):
            write_json(value["--json"], {"copy_gb_per_s": 3000.0, "rows": [
                {"op": "rms_norm", "tp": 1, "pass": "fwd+bwd", "impl": impl, "median_ms": ms, "gb_per_s": 1.2e6 / ms,
                 "of_copy": 400 / ms} for impl, ms in (("melama", 500.0), ("eager", 1000.0))]})
        elif target == "melama_mcore.cli" and args[0] == "train-tokenizer":
            Path(value["--model-prefix"] + ".model").write_text("spm")
        elif target == "melama_mcore.train" and "--create-seed-checkpoint" not in " ".join(args):
            run_dir = Path(opt["output_dir"])
            resumed = (run_dir / "metrics.jsonl").exists()
            stop = int(opt.get("training.stop_after_step", 8))
            drift = 1e-3 if opt["training.precision"] == "bf16" else 0.0
            drift += 1e-6 if resumed and not self.resume_exact else 0.0
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "metrics.jsonl", "a") as f:
                for step in range(5 if resumed else 1, stop + 1):
                    f.write(json.dumps({"step": step, "loss": (6 - step / 4) * (1 + drift)}) + "\n")
            text = "10:00:00 layer backend: native (auto: CUDA; kernels backend: cuda)\n"
        elif target == "gpu_check.stage_slice":
            write_json(value["--json"], {"ran": ["flash"], "aten_ops": ["aten::_scaled_dot_product_flash_attention"],
                                         "dispatcher_choice": "FLASH_ATTENTION"})
        elif target.endswith("throughput.py"):
            backends = ["native+lora"] if "lora" in args else ["native"]
            write_json(value["--json"], {"results": [
                {"backend": b, "step_time_s": 1.2, "tokens_per_s_per_gpu": 27000.0, "tflops_per_gpu": 400.0,
                 "mfu": 0.4, "peak_memory_gib": 45.0, "predicted_memory_gib": 43.0, "all_steps_ok": True,
                 "trainable_params": 1000} for b in backends]
                + ([] if "lora" in args else [{"backend": "local", "error": "OutOfMemoryError: CUDA out of memory"}])})
        elif target == "melama_mcore.cli" and args[0] == "plan":
            assert value["--compute-efficiency"] == "0.4000" and value["--gpu"] == "h100-80gb"
            write_json(value["--json"], {"request": {"preset": "llama2-70b", "gpus": 64}, "layouts": [
                {"layout": {"tp": 4, "pp": 8, "vp": 10, "dp": 2}, "tokens_per_s_per_gpu": 800.0, "mfu": 0.35}]})
        elif target == "melama_mcore.cli" and args[0] == "eval":
            out = Path(value["--out"])
            out.mkdir(parents=True)
            for task in stage_eval.TASKS:
                (out / f"samples_{task}.jsonl").write_text("".join(
                    json.dumps({"doc_id": i, "generation": f"g{i}"}) + "\n" for i in range(stage_eval.RECORDS["gpu"])))
            write_json(out / "results.json", {task: {"accuracy": 0.5} for task in stage_eval.TASKS})
            text = "10:00:05 evaluated 32 records in 4 s, model loading included (8.00 records/s)\n"
        Path(log).write_text(text)
        return JobResult(0, 0.5, Path(log))


def write_json(path, data) -> None:
    Path(path).write_text(json.dumps(data))


def gpu_run(tmp_path, monkeypatch, machine: GpuMachine) -> dict:
    monkeypatch.setitem(jobs.LAUNCHERS, "subprocess", lambda: machine)
    code, printed, _ = call([str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    state = json.loads((tmp_path / "out" / report.JSON_NAME).read_text())
    state["exit"], state["printed"] = code, printed
    return state


def test_the_gpu_branches_of_every_stage(tmp_path, monkeypatch):
    state = gpu_run(tmp_path, monkeypatch, GpuMachine())
    stages = {s["key"]: s for s in state["stages"]}
    assert state["exit"] == 0 and {s["status"] for s in stages.values()} == {"ok"}, state["printed"]
    assert [(k, n, p["detail"]) for k, s in stages.items() for n, p in s["parts"].items() if p["status"] != "ok"] == [
        ("d", "local", "could not run here: OutOfMemoryError: CUDA out of memory")]  # a backend that cannot run here
    assert "built sm_80+sm_90 in 21 s, self-check passed; 2 GPU tests passed, 0 failed; copy 3,000 GB/s" in \
        stages["b"]["summary"]
    assert "rms_norm 2,400 (80%, 2.00x eager)" in stages["b"]["summary"]
    assert "resume after step 4 exact" in stages["c"]["summary"]
    assert "planner for llama2-70b on 64 x h100-80gb at MFU 40.0%: TP4 PP8 VP10 DP2" in stages["d"]["summary"]
    assert stages["f"]["summary"] == ("32 records: 8.00 records/s on the GPU, 8.00 on the CPU; generations equal "
                                      "(32/32) (model loading included)")
    assert "\n**Device:** NVIDIA H100 80GB HBM3 · 79 GiB · sm_90 · driver 580.159.04 · CUDA 13.0" in \
        state["printed"]


def test_an_inexact_resume_and_unloaded_kernels_are_failures_that_say_why(tmp_path, monkeypatch):
    machine = GpuMachine(resume_exact=False, kernels_load=False)
    state = gpu_run(tmp_path, monkeypatch, machine)
    stages = {s["key"]: s for s in state["stages"]}
    assert state["exit"] == 1 and stages["b"]["status"] == stages["c"]["status"] == "failed"
    assert stages["b"]["parts"]["build and self-check"]["detail"] == "nvcc failed (1): x"
    # after b's build (the second job) every job runs the reference instead of building the kernels again
    assert "MELAMA_KERNELS" not in machine.envs[1] and all(env["MELAMA_KERNELS"] == "torch" for env in machine.envs[2:])
    assert stages["c"]["parts"]["save and exact resume"]["detail"].endswith(
        "a second uninterrupted run equals the first: the resume is not exact")
    assert {k: s["status"] for k, s in stages.items() if k in "adef"} == dict.fromkeys("adef", "ok")
