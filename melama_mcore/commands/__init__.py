"""Offline commands: jobs a user runs on a workstation or login node, outside training. Thin shells
over the library.

    blend_report.py `melama blend-report`: per-source shares and epochs of a blend (data/report.py,
                    data/sft/report.py)
    convert.py      `melama convert`: Hugging Face <-> this project's checkpoints, LoRA adapters to PEFT
                    (checkpoint/convert.py; --verify: logits.py)
    plan.py         `melama plan`: parallel layouts that fit, with predicted memory and MFU
"""
