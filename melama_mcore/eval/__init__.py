"""Evaluation on MIBE (Me-LLaMA's medical benchmark) and any lm-evaluation-harness task: `melama eval`.

    tasks.py           the twelve MIBE datasets: source, record schema, metrics
    lm_eval_tasks/     the same as lm-evaluation-harness 0.4 task YAMLs (`lm_eval --include_path`)
    data.py            reading and checking test records (Hub or local JSON/JSONL/parquet)
    extraction.py      from generated text to a label: `strict` (default) and `mibe-compat`
    metrics.py         scores on lists of predictions (scikit-learn, rouge-score, seqeval, bert-score)
    harness.py         the functions the task YAMLs name (dataset loader, per-sample and corpus scoring)
    model_source.py    --model/--adapter -> a Hugging Face folder (megatron checkpoints exported on the fly)
    report.py          results.json, results.md and samples_<task>.jsonl
    command.py         the `melama eval` command
"""
