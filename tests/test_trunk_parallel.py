"""Parallel layouts, resume and resharding, each against a single-process run of the same job.

Every run starts from one seed checkpoint (weights written once by a single process), so runs
differ only in how megatron splits the work. The regime is the one real runs use: an 8-layer model,
a global batch of 16 micro-batches (8 per rank at DP 2; 4x the stages at PP 4), 3 steps with the
loss falling, and validation per blend source after the last step.

* fp32: every layout equals the single-process run within 1e-5 (losses and per-source validation):
  TP+SP, TP x PP (1F1B), interleaved PP x VP at PP 2 and PP 4, TP 2 x PP 4 x VP 2 (8 processes),
  DP, the distributed optimizer against plain DDP, full and selective recompute, melama's
  cross-entropy.
* bf16 with the distributed optimizer and overlapped grad reduce / param gather (the production
  path): every layout within BF16_RTOL of the single-process bf16 run. Splitting the work changes
  the order of bf16 sums, and one bf16 ulp is 2^-8 relative: over 3 steps the losses of this model
  stay within 2e-3 of each other (measured spread about 1e-5).
* resume and resharding: stop/resume continues the uninterrupted run (exactly at the same layout),
  also resharded across pipeline stages and virtual chunks, and under bf16 + the distributed
  optimizer; a dp_reshardable optimizer state resumes at another DP size, a fully_reshardable one at
  another TP; a dp_reshardable one at another TP is refused with what to do.
"""

from __future__ import annotations

import re
import shutil

import pytest

from trunk_fixtures import data_overrides, eval_losses, losses, run_train

pytestmark = pytest.mark.slow

REGIME = ["model.num_layers=8", "training.global_batch_size=32", "logging.eval_iters=1"]
PRODUCTION = ["training.precision=bf16", "parallel.use_distributed_optimizer=true",
              "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]
PLAIN_DDP = ["parallel.use_distributed_optimizer=false", "parallel.overlap_grad_reduce=false",
             "parallel.overlap_param_gather=false"]
BF16_RTOL = 2e-3

TP2, SP = "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"
PP2, PP4, VP2 = "parallel.pipeline_parallel=2", "parallel.pipeline_parallel=4", "parallel.virtual_pipeline=2"

FP32_LAYOUTS = {
    "tp2_sp": (2, [TP2, SP]),
    "pp2_vp2": (2, [PP2, VP2]),  # both pipeline neighbours are one rank: overlapped p2p must pair them
    "pp4_vp2": (4, [PP4, VP2]),
    "tp2_pp2": (4, [TP2, PP2]),
    "tp2_pp4_vp2": (8, [TP2, PP4, VP2]),  # the 70B recipe's kind of layout (TP 8 x PP 4 x VP 5)
    "dp2_plain_ddp": (2, PLAIN_DDP),
    "dp2_distributed_optimizer": (2, []),
    "tp2_full_recompute": (2, [TP2, "training.recompute=full"]),
    "selective_recompute": (1, ["training.recompute=selective"]),
    "tp2_sp_melama_cross_entropy": (2, [TP2, SP, "model.cross_entropy=melama"]),
}
BF16_LAYOUTS = {
    "tp2_sp": (2, [TP2, SP]),
    "pp2_vp2": (2, [PP2, VP2]),
    "pp2_dp2": (4, [PP2]),
    "tp2_pp4_vp2": (8, [TP2, SP, PP4, VP2]),
}


def _seeded(tiny_data, tmp_path_factory, name: str, extra: list[str]):
    """A seed checkpoint, and the single-process reference run from it (losses and validation)."""
    root = tmp_path_factory.mktemp(name)
    seed = root / "seed_ckpt"
    run_train(root / "init", data_overrides(tiny_data) + REGIME + [f"--create-seed-checkpoint={seed}"])
    common = data_overrides(tiny_data) + REGIME + [f"checkpoint.init_from={seed}"] + extra
    run_train(root / "ref", common)
    reference = {"losses": losses(root / "ref"), "eval": eval_losses(root / "ref")}
    assert sorted(reference["losses"]) == [1, 2, 3]
    assert reference["losses"][3] < reference["losses"][1]  # it learns: a run that trained nothing would not pass
    assert sorted(reference["eval"]) == ["biomedical", "clinical", "general"]
    return common, reference


@pytest.fixture(scope="module")
def fp32_run(tiny_data, tmp_path_factory):
    return _seeded(tiny_data, tmp_path_factory, "fp32", [])


@pytest.fixture(scope="module")
def bf16_run(tiny_data, tmp_path_factory):
    return _seeded(tiny_data, tmp_path_factory, "bf16", PRODUCTION)


def assert_same_run(got_dir, reference: dict, rel: float, what: str) -> None:
    got, got_eval = losses(got_dir), eval_losses(got_dir)
    assert sorted(got) == sorted(reference["losses"]), what
    for step, expected in reference["losses"].items():
        assert got[step] == pytest.approx(expected, rel=rel), f"{what}: loss of step {step}"
    for source, expected in reference["eval"].items():
        assert got_eval[source] == pytest.approx(expected, rel=rel), f"{what}: validation loss of {source}"


@pytest.mark.parametrize("layout", list(FP32_LAYOUTS))
def test_fp32_layout_equals_the_single_process_run(layout, fp32_run, tmp_path):
    common, reference = fp32_run
    nproc, overrides = FP32_LAYOUTS[layout]
    run_train(tmp_path / layout, common + overrides, nproc=nproc)
    assert_same_run(tmp_path / layout, reference, 1e-5, layout)


@pytest.mark.parametrize("layout", list(BF16_LAYOUTS))
def test_bf16_distributed_optimizer_layout_agrees_with_the_single_process_run(layout, bf16_run, tmp_path):
    common, reference = bf16_run
    nproc, overrides = BF16_LAYOUTS[layout]
    result = run_train(tmp_path / layout, common + overrides, nproc=nproc)
    assert "bf16, distributed optimizer" in result.stdout  # the production path actually ran
    assert_same_run(tmp_path / layout, reference, BF16_RTOL, f"bf16 {layout}")


def _stop_at_2(run_dir, common: list[str], nproc: int, extra: list[str] = ()) -> None:
    run_train(run_dir, common + list(extra) + ["training.stop_after_step=2"], nproc=nproc)
    assert sorted(losses(run_dir)) == [1, 2]


def _resume(run_dir, common: list[str], nproc: int, extra: list[str] = ()):
    result = run_train(run_dir, common + list(extra), nproc=nproc)
    assert "resumed from" in result.stdout
    assert sorted(losses(run_dir)) == [1, 2, 3]
    return result


def _assert_continues(run_dir, straight: dict, rel: float, what: str) -> None:
    got = losses(run_dir)
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(straight[step], rel=rel, abs=0), f"{what}: step {step}"


def test_resume_continues_the_uninterrupted_curve(fp32_run, tmp_path):
    """Stop after step 2 (checkpoint), rerun the same command: step 3 and the validation equal the
    uninterrupted single-process run's."""
    common, reference = fp32_run
    _stop_at_2(tmp_path / "split", common, 1)
    _resume(tmp_path / "split", common, 1)
    _assert_continues(tmp_path / "split", reference["losses"], 1e-6, "fp32")
    assert eval_losses(tmp_path / "split") == pytest.approx(reference["eval"], rel=1e-6)


def test_interleaved_checkpoint_reshards_to_another_pipeline(fp32_run, tmp_path):
    """Saved at PP 4 x VP 2, resumed at PP 2 x VP 2 (weights and the plain optimizer's per-parameter
    state reshard across pipeline stages and virtual chunks): the uninterrupted run's curve."""
    common, reference = fp32_run
    common = common + PLAIN_DDP
    _stop_at_2(tmp_path / "run", common, 4, [PP4, VP2])
    assert "resharded" in _resume(tmp_path / "run", common, 2, [PP2, VP2]).stdout
    _assert_continues(tmp_path / "run", reference["losses"], 1e-5, "pp4 x vp2 -> pp2 x vp2")


def test_bf16_distributed_optimizer_stop_resume_and_reshard(bf16_run, tmp_path):
    """Production path, saved at DP 2 (dp_reshardable, the default): resumed at DP 2 it continues
    the uninterrupted DP 2 curve exactly (which agrees with the single-process run), at DP 1 up to
    the order of the DP reduction; at TP 2 it is
    refused with what to do, and a fully_reshardable checkpoint resumes at TP 2 (bf16 tolerance)."""
    common, reference = bf16_run
    run_train(tmp_path / "straight", common, nproc=2)
    assert_same_run(tmp_path / "straight", reference, BF16_RTOL, "bf16 dp2")  # DP 2's layout check
    straight = losses(tmp_path / "straight")
    _stop_at_2(tmp_path / "dp2", common, 2)
    shutil.copytree(tmp_path / "dp2", tmp_path / "dp1")
    _resume(tmp_path / "dp2", common, 2)
    _assert_continues(tmp_path / "dp2", straight, 0.0, "dp2 -> dp2")
    _resume(tmp_path / "dp1", common, 1)
    _assert_continues(tmp_path / "dp1", straight, 1e-6, "dp2 -> dp1")

    refused = run_train(tmp_path / "dp2", common + ["training.train_iters=4", TP2], nproc=2, check=False)
    assert refused.returncode != 0  # each rank exits 2; torchrun reports 1
    assert "dp_reshardable format, saved at TP 1 x PP 1; this run is TP 2 x PP 1" in refused.stdout
    assert "checkpoint.optimizer_format=fully_reshardable" in refused.stdout
    # torchrun prints a traceback of its own (ChildFailedError) whenever a rank exits non-zero.
    assert not re.search(r'File "[^"]*melama_mcore', refused.stdout), "a traceback from melama"

    full = ["checkpoint.optimizer_format=fully_reshardable"]
    _stop_at_2(tmp_path / "full", common, 2, full)
    _resume(tmp_path / "full", common, 2, full + [TP2])
    _assert_continues(tmp_path / "full", straight, BF16_RTOL, "dp2 -> tp2 (fully_reshardable)")
