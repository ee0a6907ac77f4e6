"""Offline commands: jobs a user runs on a workstation or login node, outside training.

    convert.py   `melama convert`: Hugging Face <-> this project's checkpoints, LoRA adapters to PEFT
"""
