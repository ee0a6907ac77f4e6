"""Issue 5: crashes, preemption, NaNs, bad files and full disks cost minutes, never the run, and never
silently corrupt the model or skip/repeat data.

Every run is the real trainer (torchrun for two ranks) launched through tests/fault_inject.py, which
monkeypatches one fault in from the outside. The reference is the same job run without a fault: a run
that was killed and rerun must reproduce its losses, sample indices and final weights.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from melama_mcore.data.preprocess import preprocess
from melama_mcore.demo.corpus import write_demo_corpus
from melama_mcore.data.train_tokenizer import train_sentencepiece
from rank_launcher import run_ranks
from trunk_fixtures import TINY, losses, step_records, train_command

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
STEPS, SAVE_EVERY = 6, 2
SEED = 20261122  # picks where the faults strike; printed in every assertion that uses it


# -- fixtures and helpers --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Three tiny domains (as the demo builds them) and their tokenizer."""
    root = tmp_path_factory.mktemp("fault_data")
    corpus = write_demo_corpus(root / "corpus", docs_per_source=150, seed=0)
    tokenizer = train_sentencepiece([str(p) for p in corpus.values()], str(root / "tok" / "spm"), vocab_size=400)
    blend = []
    for name, path in corpus.items():
        preprocess([str(path)], str(root / name), str(tokenizer), append_eod=True, workers=1, progress=False)
        blend.append({"name": name, "weight": {"biomedical": 15, "clinical": 1, "general": 4}[name],
                      "train": [str(root / f"{name}_text_document")]})
    return {"root": root, "tokenizer": str(tokenizer), "blend": blend, "corpus": corpus}


def job(data: dict, *extra: str, blend=None) -> list[str]:
    """The command line of the job every test runs (6 steps, a checkpoint every 2)."""
    return [f"data.tokenizer={data['tokenizer']}", f"data.blend={json.dumps(blend or data['blend'])}",
            f"data.cache_dir={data['root'] / 'index_cache'}", f"training.train_iters={STEPS}",
            f"checkpoint.save_interval={SAVE_EVERY}", *extra]


class Run:
    def __init__(self, rc: int, output: str, seconds: float):
        self.rc, self.output, self.seconds = rc, output, seconds

    def error_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("error:")]


def launch(out: Path, args: list[str], *, nproc: int = 1, faults: dict | None = None, record: Path | None = None,
           timeout: float = 180, during=None) -> Run:
    """Run the trainer in its own process group (so a whole-job kill hits it, not pytest); `during(proc)`
    runs while it trains. Leftover processes of the group (children of a killed rank) are killed
    afterwards."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MELAMA_FAULTS=json.dumps(faults or {}),
               PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    env.pop("MELAMA_FAULT_DIR", None)
    if record is not None:
        env["MELAMA_FAULT_DIR"] = str(record)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"{out.name}.{time.monotonic_ns()}.log"
    argv = [f"output_dir={out}", *TINY, *args]
    start = time.monotonic()
    if nproc == 1 and during is None:  # no launcher to test: the cheap start (rank_launcher.py)
        result = run_ranks(1, "fault_inject", argv, env, timeout=timeout, log_path=log_path)
        return Run(result.returncode, result.stdout, time.monotonic() - start)
    cmd = train_command(nproc, argv, module="fault_inject")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            if during is not None:
                during(proc)
            rc = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return Run(rc, log_path.read_text(), time.monotonic() - start)


def latest(out: Path) -> int:
    return int((out / "checkpoints" / "latest").read_text())


def saved_state(out: Path, step: int) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(out / "checkpoints" / f"iter_{step:07d}"))["train_state"]


def samples(record: Path, rank: int) -> dict[int, list[int]]:
    """step -> global sample indices consumed by `rank` in that step (a later record of a step wins)."""
    path = record / f"samples_rank{rank}.jsonl"
    return {r["step"]: r["indices"] for r in map(json.loads, path.read_text().splitlines())}


def params(record: Path, step: int, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(record / f"params_step{step}_rank{rank}.pt", weights_only=True)


def same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def close_params(a: dict, b: dict, rtol=1e-5, atol=1e-7) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a)


def assert_matches_reference(out: Path, record_runs: list[Path], reference: dict, note: str) -> None:
    """Losses of every step, the samples of every step on every rank (the run that last did a step
    is the one whose weights survive) and the final weights equal the uninterrupted run's."""
    got, want = losses(out), reference["losses"]
    assert sorted(got) == list(range(1, STEPS + 1)), f"{note}: steps logged {sorted(got)}"
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), f"{note}: loss of step {step}"
    for rank in range(reference["nproc"]):
        lineage: dict[int, list[int]] = {}
        for record in record_runs:  # later runs redo steps after the checkpoint they resumed from
            lineage.update(samples(record, rank))
        assert lineage == reference["samples"][rank], f"{note}: sample indices of rank {rank}"
    assert close_params(params(record_runs[-1], STEPS), reference["final_params"]), f"{note}: final weights"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict:
    """The uninterrupted job on two data-parallel ranks: losses, per-rank sample indices, final weights."""
    root = tmp_path_factory.mktemp("reference")
    run = launch(root / "out", job(data), nproc=2, record=root / "rec")
    assert run.rc == 0, run.output[-4000:]
    result = {"out": root / "out", "nproc": 2, "losses": losses(root / "out"),
              "samples": [samples(root / "rec", r) for r in range(2)],
              "final_params": params(root / "rec", STEPS)}
    assert sorted(result["losses"]) == list(range(1, STEPS + 1))
    assert result["losses"][STEPS] < result["losses"][1]  # it learns
    # the two ranks read disjoint samples, and every step reads new ones (else the index check is void)
    seen = [i for r in range(2) for s in result["samples"][r].values() for i in s]
    assert len(seen) == len(set(seen)) == STEPS * 8
    return result


# -- 1. kill -9 during training ------------------------------------------------------------------
def test_kill_one_rank_mid_step_then_rerun_resumes_exactly(data, reference, tmp_path):
    rng = random.Random(SEED)
    step, microbatch, rank = rng.randint(3, STEPS), rng.randint(0, 1), rng.randint(0, 1)
    note = f"SIGKILL rank {rank} at step {step}, micro-batch {microbatch} (seed {SEED})"
    out = tmp_path / "out"
    killed = launch(out, job(data), nproc=2, record=tmp_path / "rec1",
                    faults={"kill": {"step": step, "microbatch": microbatch, "rank": rank}})
    assert killed.rc != 0 and "FAULT: SIGKILL" in killed.output, note
    last = (step - 1) // SAVE_EVERY * SAVE_EVERY
    assert latest(out) == last, note
    rerun = launch(out, job(data), nproc=2, record=tmp_path / "rec2")
    assert rerun.rc == 0, rerun.output[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'iter_{last:07d}'}" in rerun.output, note
    assert min(samples(tmp_path / "rec2", 0)) == last + 1, f"{note}: the rerun must start right after step {last}"
    assert_matches_reference(out, [tmp_path / "rec1", tmp_path / "rec2"], reference, note)


# -- 1 + 2. kill -9 the whole job during a checkpoint save ------------------------------------------
def test_kill_whole_job_during_save_keeps_previous_checkpoint(data, reference, tmp_path):
    rng = random.Random(SEED + 1)
    step = rng.choice([s for s in range(SAVE_EVERY * 2, STEPS, SAVE_EVERY)])  # a save with one before it
    note = f"SIGKILL whole job in the save of step {step} (seed {SEED + 1})"
    out, ckpts = tmp_path / "out", tmp_path / "out" / "checkpoints"
    killed = launch(out, job(data), nproc=2, record=tmp_path / "rec1",
                    faults={"kill_in_save": {"step": step, "job": True}})
    assert killed.rc != 0 and "FAULT: SIGKILL during the save" in killed.output, note
    partial = ckpts / f"iter_{step:07d}.partial"
    assert partial.is_dir() and (partial / "metadata.json").is_file(), f"{note}: the save had written its files"
    assert not (ckpts / f"iter_{step:07d}").exists(), note
    assert latest(out) == step - SAVE_EVERY, f"{note}: the interrupted save must never become latest"

    rerun = launch(out, job(data), nproc=2, record=tmp_path / "rec2")
    assert rerun.rc == 0, rerun.output[-4000:]
    assert f"removing {partial}: an interrupted save" in rerun.output, note
    assert f"resumed from {ckpts / f'iter_{step - SAVE_EVERY:07d}'}" in rerun.output, note
    assert not list(ckpts.glob("*.partial")) and latest(out) == STEPS, note
    assert_matches_reference(out, [tmp_path / "rec1", tmp_path / "rec2"], reference, note)


# -- 3. preemption: SIGTERM with a grace period -----------------------------------------------------
def test_sigterm_saves_within_grace_even_when_the_step_is_too_long(data, reference, tmp_path):
    """SIGTERM reaches torchrun and every rank (as SLURM signals the whole job step) one second into a
    step whose micro-batches take 4 s each: finishing it (about 8 s) plus a save would overrun the 5 s
    grace, so the ranks abandon it, save the state after the previous step and exit 0 in time."""
    grace, out, rec = 5.0, tmp_path / "out", tmp_path / "rec1"
    args = job(data, f"checkpoint.preemption_grace_s={grace}")
    marker = out / "reached_step_3"
    sent = {}

    def preempt(proc):
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the job never reached step 3"
            time.sleep(0.05)
        time.sleep(1.0)
        sent["at"] = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        sent["job_exit_after"] = time.time() - sent["at"]

    run = launch(out, args, nproc=2, record=rec, during=preempt,
                 faults={"marker_step": 3, "slow_step": {"step": 4, "seconds": 4.0}})
    exits = [rec / f"exit_rank{r}" for r in range(2)]
    assert [p.read_text() for p in exits] == ["0", "0"], run.output[-4000:]
    done_after = max(p.stat().st_mtime for p in exits) - sent["at"]
    assert done_after < grace, f"saved and returned {done_after:.1f} s after SIGTERM (grace {grace} s)"
    # Process teardown (gloo, torchrun) adds a few seconds: documented margin.
    assert sent["job_exit_after"] < grace + 8, f"job exited {sent['job_exit_after']:.1f} s after SIGTERM"
    assert "step 4 abandoned" in run.output
    assert latest(out) == 3 and saved_state(out, 3)["consumed_samples"] == 3 * 8
    assert sorted(losses(out)) == [1, 2, 3]

    rerun = launch(out, args, nproc=2, record=tmp_path / "rec2")
    assert rerun.rc == 0, rerun.output[-4000:]
    assert "resumed from" in rerun.output
    assert_matches_reference(out, [rec, tmp_path / "rec2"], reference, "SIGTERM in step 4")


# -- 4. NaN / Inf -----------------------------------------------------------------------------------
def test_non_finite_steps_are_skipped_then_the_run_stops(data, tmp_path):
    """A NaN loss at step 2 and an infinite gradient (finite loss) at steps 4 and 5; with
    max_consecutive_skips=2 the run stops after step 5 with exit code 3 and one clear line."""
    out, rec = tmp_path / "out", tmp_path / "rec"
    run = launch(out, job(data, "training.max_consecutive_skips=2"), record=rec,
                 faults={"nan_loss_steps": [2], "inf_grad_steps": [4, 5]})
    assert run.rc == 3, run.output[-4000:]
    assert "Traceback" not in run.output
    assert run.error_lines() == [line for line in run.error_lines() if "2 consecutive steps had a non-finite" in line]
    assert len(run.error_lines()) == 1, run.output[-3000:]
    records = {r["step"]: r for r in step_records(out)}
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert [s for s, r in records.items() if r["skipped"]] == [2, 4, 5]
    assert records[2]["loss"] != records[2]["loss"]  # NaN logged as such
    assert records[4]["loss"] == records[4]["loss"]  # finite loss, infinite gradient
    assert run.output.count("SKIPPED (non-finite)") == 3
    p = {s: params(rec, s) for s in range(1, 6)}
    assert same_params(p[1], p[2]), "a skipped step changed the weights"
    assert not same_params(p[2], p[3]), "step 3 should have trained (else the check above is void)"
    assert same_params(p[3], p[4]) and same_params(p[4], p[5]), "a skipped step changed the weights"
    assert all(torch.isfinite(t).all() for t in p[5].values())


def test_a_save_before_any_applied_step_works(data, tmp_path):
    """Step 1 skipped as non-finite, then a save: the distributed optimizer has applied no step yet
    (megatron reads its step count out of the Adam state), and the run goes on from the checkpoint."""
    out = tmp_path / "out"
    run = launch(out, job(data, "training.train_iters=2", "checkpoint.save_interval=1"),
                 faults={"nan_loss_steps": [1]})
    assert run.rc == 0 and "Traceback" not in run.output, run.output[-3000:]
    assert latest(out) == 2 and [r["skipped"] for r in step_records(out)] == [True, False]


# -- 6. disk full / unwritable output -----------------------------------------------------------------
def test_save_failure_stops_by_default_and_keeps_the_previous_checkpoint(data, tmp_path):
    out = tmp_path / "out"
    run = launch(out, job(data, "training.train_iters=3", "checkpoint.save_interval=1"),
                 faults={"save_error": {"steps": [2], "errno": "ENOSPC"}})
    assert run.rc == 2 and "Traceback" not in run.output, run.output[-3000:]
    [line] = run.error_lines()
    assert "checkpoint save at step 2 failed" in line and "No space left on device" in line
    assert latest(out) == 1
    rerun = launch(out, job(data, "training.train_iters=3", "checkpoint.save_interval=1"))
    assert rerun.rc == 0 and "removing" in rerun.output and "iter_0000002.partial" in rerun.output
    assert f"resumed from {out / 'checkpoints' / 'iter_0000001'}" in rerun.output
    assert latest(out) == 3


def test_save_failure_continue_warns_but_a_failed_final_save_is_an_error(data, tmp_path):
    out = tmp_path / "out"
    run = launch(out, job(data, "training.train_iters=4", "checkpoint.save_interval=1",
                          "checkpoint.on_save_failure=continue"),
                 faults={"save_error": {"steps": [2, 4], "errno": "EACCES"}})
    assert "CHECKPOINT SAVE FAILED at step 2" in run.output
    assert sorted(losses(out)) == [1, 2, 3, 4], "training goes on after a failed save"
    assert latest(out) == 3
    # The final save has no later save to make up for it: exiting 0 would lose the run's last steps.
    assert run.rc == 2 and "Traceback" not in run.output, run.output[-3000:]
    [line] = run.error_lines()
    assert "checkpoint save at step 4 failed" in line and "Permission denied" in line


def test_save_failure_on_one_rank_of_two_ends_the_job_promptly_with_one_clear_message(data, tmp_path):
    """Rank 1 alone cannot write its checkpoint files (a full local disk): both ranks learn it and
    exit 2 within seconds, the message names the rank and its error, the previous checkpoint stays."""
    out, rec = tmp_path / "out", tmp_path / "rec"
    timing = {}

    def watch(proc):
        log = max(out.parent.glob(f"{out.name}.*.log"), key=lambda p: p.stat().st_mtime)
        deadline = time.monotonic() + 240
        while "FAULT: rank 1 fails writing" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "the fault never struck"
            time.sleep(0.05)
        timing["fault"] = time.monotonic()
        proc.wait(timeout=120)
        timing["exit_after"] = time.monotonic() - timing["fault"]

    run = launch(out, job(data), nproc=2, record=rec, during=watch,
                 faults={"write_error": {"steps": [4], "rank": 1}})
    assert [(rec / f"exit_rank{r}").read_text() for r in range(2)] == ["2", "2"], run.output[-4000:]
    assert timing["exit_after"] < 30, f"the job ended {timing['exit_after']:.1f} s after the failed write"
    lines = {line for line in run.error_lines()}
    assert len(lines) == 1, run.output[-3000:]
    [line] = lines
    assert "checkpoint save at step 4 failed: writing the checkpoint files failed on rank 1" in line
    assert "No space left on device" in line and "The checkpoint of step 2 is still the latest" in line
    assert 'melama_mcore/' not in run.output and "megatron/" not in run.output  # no rank's traceback
    assert latest(out) == 2


def test_sigterm_with_a_grace_period_at_pp2_saves_and_exits_0(data, tmp_path):
    """Pipeline parallel: SIGTERM half a second into a step whose micro-batches take 1 s each, with a
    4 s grace period. The step runs as groups of micro-batches; after the first, the ranks agree
    that the rest plus a save would overrun the grace, abandon it, save the state after the previous
    step and exit 0; the rerun redoes that step from there and finishes. (Exactness of resuming is
    the other tests' subject; this job's reference would be another PP 2 run.)"""
    grace, out, rec = 4.0, tmp_path / "out", tmp_path / "rec1"
    args = job(data, f"checkpoint.preemption_grace_s={grace}", "parallel.pipeline_parallel=2")
    marker = out / "reached_step_3"

    def preempt(proc):
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the job never reached step 3"
            time.sleep(0.05)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)

    run = launch(out, args, nproc=2, record=rec, during=preempt,
                 faults={"marker_step": 3, "slow_step": {"step": 4, "seconds": 1.0}})
    assert [(rec / f"exit_rank{r}").read_text() for r in range(2)] == ["0", "0"], run.output[-4000:]
    assert "step 4 abandoned" in run.output
    assert latest(out) == 3 and saved_state(out, 3)["consumed_samples"] == 3 * 8
    rerun = launch(out, args, nproc=2, record=tmp_path / "rec2")
    assert rerun.rc == 0, rerun.output[-4000:]
    assert f"resumed from {out / 'checkpoints' / 'iter_0000003'}" in rerun.output
    assert sorted(losses(out)) == list(range(1, STEPS + 1)) and latest(out) == STEPS


# -- 5 + 7. bad files and malicious pickles: refused at start-up, one clear line, nothing run ----------
class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _copy_dataset(src_prefix: str, dst_prefix: Path, idx_from: str | None = None) -> str:
    shutil.copy(src_prefix + ".bin", str(dst_prefix) + ".bin")
    shutil.copy((idx_from or src_prefix) + ".idx", str(dst_prefix) + ".idx")
    return str(dst_prefix)


def _one_source(data: dict, prefix: str) -> list[dict]:
    return [{"name": "clinical", "weight": 1, "train": [prefix]}]


def _with_checkpoint(reference: dict, out: Path) -> Path:
    """out/checkpoints = a copy of the reference run's checkpoints; returns the latest one's folder."""
    shutil.copytree(reference["out"] / "checkpoints", out / "checkpoints")
    return out / "checkpoints" / f"iter_{latest(out):07d}"


def case_truncated_bin(data, reference, tmp_path):
    src = data["blend"][1]["train"][0]
    prefix = _copy_dataset(src, tmp_path / "clinical")
    size = os.path.getsize(prefix + ".bin")
    os.truncate(prefix + ".bin", size - 100)
    return job(data, blend=_one_source(data, prefix)), [prefix + ".bin", "truncated"]


def case_idx_of_another_dataset(data, reference, tmp_path):
    prefix = _copy_dataset(data["blend"][1]["train"][0], tmp_path / "clinical", idx_from=data["blend"][2]["train"][0])
    return job(data, blend=_one_source(data, prefix)), [prefix + ".bin", prefix + ".idx", "another .bin"]


def case_corrupt_tensor_file(data, reference, tmp_path):
    folder = _with_checkpoint(reference, tmp_path / "out")
    victim = sorted(folder.glob("*.distcp"))[0]
    raw = bytearray(victim.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])  # same size, silent garbage
    victim.write_bytes(bytes(raw))
    return job(data), [str(victim), "checksum", "corrupt"]


def case_checkpoint_of_another_model_size(data, reference, tmp_path):
    folder = _with_checkpoint(reference, tmp_path / "out")
    return job(data, "model.hidden_size=128"), [str(folder), "hidden_size: checkpoint 64, this run 128"]


def case_tokenizer_with_another_vocabulary(data, reference, tmp_path):
    """Same size as the model's vocabulary, different pieces: only the vocabulary itself tells. (The
    data records its tokenizer too and would be refused first: the override lets the checkpoint's
    check speak.)"""
    folder = _with_checkpoint(reference, tmp_path / "out")
    other = train_sentencepiece([str(data["corpus"]["general"]), str(data["corpus"]["clinical"])],
                                str(tmp_path / "tok" / "other"), vocab_size=400)
    args = [a if not a.startswith("data.tokenizer=") else f"data.tokenizer={other}" for a in job(data)]
    args.append("data.allow_tokenizer_mismatch=true")
    return args, [str(folder), str(other), "another vocabulary", data["tokenizer"]]


def case_malicious_common_pt(data, reference, tmp_path):
    folder = _with_checkpoint(reference, tmp_path / "out")
    torch.save({"train_state": _Evil(tmp_path / "PWNED")}, folder / "common.pt")
    (folder / "checksums.json").unlink()  # an attacker would fix the checksums too
    return job(data), [str(folder / "common.pt"), "refused to unpickle"]


def case_malicious_dcp_metadata(data, reference, tmp_path):
    folder = _with_checkpoint(reference, tmp_path / "out")
    (folder / ".metadata").write_bytes(pickle.dumps(_Evil(tmp_path / "PWNED")))
    (folder / "checksums.json").unlink()
    return job(data), [str(folder / ".metadata"), "refused to unpickle", "posix.system"]


BAD_FILES = {f.__name__[5:]: f for f in (
    case_truncated_bin, case_idx_of_another_dataset, case_corrupt_tensor_file,
    case_checkpoint_of_another_model_size, case_tokenizer_with_another_vocabulary,
    case_malicious_common_pt, case_malicious_dcp_metadata)}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_refused_at_start_up(case, data, reference, tmp_path):
    args, expected = BAD_FILES[case](data, reference, tmp_path)
    out = tmp_path / "out"
    run = launch(out, args)
    assert run.rc == 2, run.output[-4000:]
    assert "Traceback" not in run.output, run.output[-4000:]
    [line] = run.error_lines()
    for fragment in expected:
        assert fragment in line, f"{fragment!r} not in: {line}"
    assert "step 1/" not in run.output and not (out / "metrics.jsonl").exists(), "it trained"
    assert not (tmp_path / "PWNED").exists(), "a pickle in the checkpoint ran code"
    if (out / "checkpoints" / "latest").exists():  # nothing published over the refused checkpoint
        assert latest(out) == latest(reference["out"])
    else:  # start-up made the checkpoint folder (proving it writable); nothing was saved into it
        assert not list(out.glob("checkpoints/iter_*"))
