"""Parallel layouts, resume and resharding, each against a single-process run of the same job.

Every run starts from one seed checkpoint (weights written once by a single process), so runs
differ only in how megatron splits the work: TP, TP+SP, PP (1F1B), PP with virtual stages
(interleaved), TP x PP, and DP through megatron's real schedules, DDP and optimizer, and full or
selective activation recompute.
"""

from __future__ import annotations

import pytest

from trunk_fixtures import data_overrides, losses, run_train, tiny_data  # noqa: F401

pytestmark = pytest.mark.slow

LAYOUTS = {
    "tp2": (2, ["parallel.tensor_parallel=2"]),
    "tp2_sp": (2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline_parallel=2"]),
    "pp2_vp2": (4, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"]),
    "tp2_pp2": (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
    "dp2": (2, []),
    # Recompute changes memory, never numbers.
    "tp2_full_recompute": (2, ["parallel.tensor_parallel=2", "training.recompute=full"]),
    "selective_recompute": (1, ["training.recompute=selective"]),
    # The loss through melama's vocab-parallel cross-entropy (ranks' stats combined by all-gather)
    # against megatron's in the single-process reference.
    "tp2_sp_melama_cross_entropy": (2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                                        "model.cross_entropy=melama"]),
}


@pytest.fixture(scope="module")
def seed_run(tiny_data, tmp_path_factory):  # noqa: F811
    """The seed checkpoint and the single-process reference losses of 3 steps from it."""
    root = tmp_path_factory.mktemp("seed")
    seed = root / "seed_ckpt"
    run_train(root / "init", data_overrides(tiny_data) + [f"--create-seed-checkpoint={seed}"])
    common = data_overrides(tiny_data) + [f"checkpoint.init_from={seed}"]
    run_train(root / "ref", common)
    reference = losses(root / "ref")
    assert sorted(reference) == [1, 2, 3]
    assert reference[3] < reference[1]  # it learns: a run that trained nothing would not pass
    return common, reference


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, seed_run, tmp_path):
    common, reference = seed_run
    nproc, overrides = LAYOUTS[layout]
    run_train(tmp_path / layout, common + overrides, nproc=nproc)
    got = losses(tmp_path / layout)
    assert sorted(got) == [1, 2, 3]
    for step, expected in reference.items():
        assert got[step] == pytest.approx(expected, rel=1e-5), f"{layout} step {step}"


def test_resume_continues_the_uninterrupted_curve(seed_run, tmp_path):
    """Stop after step 2 (checkpoint), rerun the same command: steps 3-5 equal a 5-step run's."""
    common, _ = seed_run
    five = common + ["training.train_iters=5"]
    run_train(tmp_path / "straight", five)
    run_train(tmp_path / "split", five + ["training.stop_after_step=2"])
    assert sorted(losses(tmp_path / "split")) == [1, 2]
    result = run_train(tmp_path / "split", five)
    assert "resumed from" in result.stdout
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(split) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        assert split[step] == pytest.approx(straight[step], rel=1e-6), f"step {step}"


def test_checkpoint_saved_at_tp2_resumes_at_tp1(seed_run, tmp_path):
    common, _ = seed_run
    four = common + ["training.train_iters=4"]
    run_train(tmp_path / "tp2", four + ["parallel.tensor_parallel=2"], nproc=2)
    run_train(tmp_path / "mixed", four + ["parallel.tensor_parallel=2", "training.stop_after_step=2"], nproc=2)
    result = run_train(tmp_path / "mixed", four)  # one process: TP 1
    assert "resharded" in result.stdout
    full, mixed = losses(tmp_path / "tp2"), losses(tmp_path / "mixed")
    assert mixed[3] == pytest.approx(full[3], rel=1e-5)
    assert mixed[4] == pytest.approx(full[4], rel=1e-5)
