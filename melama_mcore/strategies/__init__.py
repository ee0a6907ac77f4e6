"""Training strategies: which weights a run trains, chosen once from the recipe's `peft:` section.

    base.py   what a strategy answers (the protocol), and why
    full.py   FullTraining: every weight (peft.method none)
    lora.py   LoRA: adapters on a frozen base (peft.method lora)

`strategy_for(cfg.peft)` is the one place that reads peft.method. A third strategy (say, full
fine-tuning of selected layers) is a class with base.py's attributes and methods and one row in
STRATEGIES; the trainer, the checkpointer and the exporter take it as they take these two.
"""

from __future__ import annotations

from melama_mcore.errors import ConfigError
from melama_mcore.strategies.base import TrainingStrategy
from melama_mcore.strategies.full import FullTraining
from melama_mcore.strategies.lora import LoRA

STRATEGIES = {"none": FullTraining, "lora": LoRA}
METHODS = tuple(STRATEGIES)


def strategy_for(peft) -> TrainingStrategy:
    """The strategy of a recipe's `peft:` section (None: full training); a ConfigError naming the key
    for settings it cannot honour."""
    method = "none" if peft is None else peft.method
    if method not in STRATEGIES:
        raise ConfigError(f"peft.method must be one of {', '.join(METHODS)}, got {method!r}")
    return STRATEGIES[method](peft)
