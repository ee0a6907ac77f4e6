"""Evaluation on MIBE (Me-LLaMA's medical benchmark) and any lm-evaluation-harness task: `melama eval`.

    tasks.py           the twelve MIBE datasets: kinds, source, record schema, metrics, generation budget
    lm_eval_tasks/     the same as lm-evaluation-harness 0.4 task YAMLs (`lm_eval --include_path`)
    data.py            reading and checking test records (Hub or local JSON/JSONL/parquet), their order
    extraction.py      from generated text to a label: `mibe-compat` (default, the released rules) and `strict`
    metrics.py         scores on lists of predictions (scikit-learn, rouge-score, seqeval, bert-score)
    scoring.py         a task's scores under each extractor and its counts: the one place MIBE is scored
    harness.py         the functions the task YAMLs name (dataset loader, per-sample and corpus scoring)
    prompts.py         plain prompts or a chat template (the model's own, a named one, a Jinja file)
    backends.py        lm-eval's hf/vllm models with the prompt format applied and the generation counts
    model_source.py    --model/--adapter -> a Hugging Face folder (megatron checkpoints exported on the fly)
    report.py          results.json, results.md and samples_<task>.jsonl
    command.py         the `melama eval` command
    rescore.py         `melama eval rescore`: scores again from samples files, without a model
"""
