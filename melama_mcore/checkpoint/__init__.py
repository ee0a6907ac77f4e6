"""Checkpoints of this project: what their folders hold, and the code that reads and writes them.

    layout.py        folder layout (iter_XXXXXXX, .partial, `latest`), atomic publish, finding a
                     checkpoint from what a user names, config.yaml beside the weights
    integrity.py     crc32 checksums, model identity, refusing pickles that could run code
    checkpointer.py  the trainer's Checkpointer: save, resume, resharding (megatron dist-checkpointing)
    dcp_stream.py    streaming access to the dist-checkpoint files without megatron's model: a writer
                     that builds each chunk on demand, a reader of one layer at a time
    hf_folder.py     Hugging Face model folders: a lazy reader (which checks the shards are complete), a
                     streaming safetensors writer, tokenizers
    peft_folder.py   Hugging Face PEFT adapter folders: their LoRA rank checked against their weights
    opened.py        any checkpoint a user names, opened: its kind (run, weights, adapters), config,
                     training strategy, architecture, identity, base and adapters
    convert.py       Hugging Face import and export, PEFT adapter folders (`melama convert`, `melama eval`)

The trainer (checkpointer.py) and the converter (convert.py) both use layout.py and integrity.py,
so a checkpoint written by either is the same kind of folder. What a checkpoint holds (every weight,
or a training strategy's own tensors) is the strategy's (strategies/). docs/checkpoints.md describes
the format.
"""
