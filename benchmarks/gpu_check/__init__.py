"""One prepared check of everything that only a GPU can show (issue 20): run.sh installs the wheels
prepare.sh downloaded, then `python -m gpu_check` runs the stages, each within its time budget.

    __main__.py    the driver: stages in order, --cpu-smoke, --dry-run, the outputs
    runner.py      a stage, its budget, what it records; jobs.py: how its jobs start and are killed
    report.py      gpu_check.md / gpu_check.json
    stage_env.py (a), stage_kernels.py (b), stage_trunk.py (c), stage_slice.py (d), stage_lora.py (e),
    stage_eval.py (f): one stage each; bench.py: benchmarks/throughput.py for d and e;
    fixtures.py: the synthetic corpus and tokenizer stages share
    wheels.txt, wheels.py, prepare.sh: what travels to the GPU machine
"""
