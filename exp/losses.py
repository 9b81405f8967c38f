"""Language-model losses and their token-level metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Mean cross-entropy over targets != -100, with accuracy and the token count it was taken over.

    logits: (B, T, V), targets: (B, T). Every returned tensor is a 0-d tensor on the logits' device.
    """
    flat_logits = logits.float().reshape(-1, logits.size(-1))
    flat_targets = targets.reshape(-1)
    loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    with torch.no_grad():
        mask = flat_targets != IGNORE_INDEX
        num_tokens = mask.sum()
        correct = ((flat_logits.argmax(-1) == flat_targets) & mask).sum()
        accuracy = correct.float() / num_tokens.clamp(min=1)
    return {"loss": loss, "accuracy": accuracy, "num_tokens": num_tokens}
