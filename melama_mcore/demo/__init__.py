"""`melama demo`: the three Me-LLaMA stages on a tiny LLaMA and data this package writes itself.

    command.py       `melama demo`: every stage through the real tools (tiny_cpu.yaml: its recipe)
    corpus.py        the synthetic three-domain pre-training corpus (and its word lists)
    instructions.py  the synthetic medical instruction set (three input formats)
    mibe.py          tiny MIBE-shaped evaluation records and the demo's evaluation step

Everything is invented from templates and word lists: no real patients, papers or pages.
"""
