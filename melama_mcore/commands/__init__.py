"""Offline commands: jobs a user runs on a workstation or login node, outside training.

    convert.py      `melama convert`: Hugging Face <-> this project's checkpoints, LoRA adapters to PEFT
    demo.py         `melama demo` (demo_corpus.py: its synthetic corpus; tiny_cpu.yaml: its recipe)
    plan.py         `melama plan`: parallel layouts that fit, with predicted memory and MFU
"""
