"""Instruction tuning data: `melama preprocess-sft`, packed datasets and the batch fields the trainer
needs. See docs/instruction_tuning.md.

- conversations: a JSONL record (ShareGPT / Me-LLaMA, Alpaca, messages) -> a Conversation
- templates: a Conversation -> rendered text and the character spans of its answers
- tokenize: rendered text -> token ids and a per-token loss mask
- indexed: the on-disk format (token ids + loss mask pairs + a marker) and `is_sft_prefix`
- preprocess: the `melama preprocess-sft` command
- packing / dataset / batch: packed training samples, blends, and what the model needs of them
"""
