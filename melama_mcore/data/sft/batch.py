"""What the training step needs of a packed SFT micro-batch besides the model inputs.

Loss normalisation (both over the global batch: all micro-batches of all data-parallel ranks):
- "token" (default): every trained token weighs the same,
      loss = sum(loss_mask * token_loss) / sum(loss_mask);
  long answers weigh more than short ones (Megatron-LM's and most SFT frameworks' default).
- "sample": every conversation weighs the same, whatever its answer length,
      loss = sum(sample_loss_weight * token_loss) / sum(sample_loss_weight),
  where sample_loss_weight = loss_mask / (trained tokens of the token's conversation), so
  sum(sample_loss_weight) over a micro-batch is its number of conversations (an integer up to float
  rounding; round it where an integer count is required).
Either way the step computes (weighted sum, total weight) per micro-batch, adds both over the global
batch, and divides once: the result does not depend on how samples fall into micro-batches or ranks.
"""

from __future__ import annotations

import torch

NORMALISATIONS = ("token", "sample")


def loss_weights(batch: dict[str, torch.Tensor], normalisation: str = "token") -> torch.Tensor:
    """Per-token loss weights of a micro-batch for the chosen normalisation (see module doc)."""
    if normalisation == "token":
        return batch["loss_mask"]
    if normalisation == "sample":
        return batch["sample_loss_weight"]
    raise ValueError(f"loss normalisation must be one of {', '.join(NORMALISATIONS)}, not {normalisation!r}")


def packing_efficiency(batch: dict[str, torch.Tensor]) -> float:
    """Real tokens / sequence tokens of a micro-batch (1 - padding waste), for logging."""
    return float(batch["real_tokens"].sum()) / batch["tokens"].numel()
