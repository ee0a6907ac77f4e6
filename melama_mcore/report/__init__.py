"""`melama report`: training runs, per-domain perplexity and benchmark scores in one report.

    inputs.py    what each INPUT is (run folder, eval-ppl output, melama eval output), read and checked
    runs.py      a run's metrics.jsonl as curves against tokens seen (a resumed run as one curve)
    compare.py   comparable groups and the change against the baseline: report.json's data
    figures.py   the PNGs (matplotlib, optional: the `report` extra)
    render.py    report.md and the self-contained report.html
    build.py     make_report: all of it, written atomically
"""
