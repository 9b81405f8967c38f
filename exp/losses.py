"""Language-model losses and their token-level metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, accuracy: bool = True
) -> dict[str, torch.Tensor]:
    """Mean cross-entropy over targets != -100, with accuracy and the token count it was taken over.

    logits: (B, T, V), targets: (B, T). Every returned tensor is a 0-d tensor on the logits' device.
    accuracy=False returns the loss alone: accuracy needs a reduction over the whole vocabulary, which on
    a small model costs a visible share of the step.
    """
    flat_logits = logits.float().reshape(-1, logits.size(-1))
    flat_targets = targets.reshape(-1)
    loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    if not accuracy:
        return {"loss": loss}
    with torch.no_grad():
        mask = flat_targets != IGNORE_INDEX
        num_tokens = mask.sum()
        # "the target has the top logit", via amax + gather: several times cheaper than argmax on CPU
        target_logit = flat_logits.gather(1, flat_targets.clamp(min=0)[:, None]).squeeze(1)
        correct = ((target_logit >= flat_logits.amax(-1)) & mask).sum()
        accuracy = correct.float() / num_tokens.clamp(min=1)
    return {"loss": loss, "accuracy": accuracy, "num_tokens": num_tokens}


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
    diagnostics: bool = True,
) -> dict[str, torch.Tensor]:
    """alpha * T^2 * KL(P_teacher(T) || P_student(T)) + (1 - alpha) * CE, over targets != -100.

    The KL is summed over the vocabulary and averaged over tokens; T^2 keeps its gradient scale
    independent of the temperature (Hinton et al. 2015). diagnostics=False leaves out the student's
    accuracy and its agreement with the teacher (two argmaxes over the vocabulary).
    """
    mask = targets.reshape(-1) != IGNORE_INDEX
    vocab = student_logits.size(-1)
    student = student_logits.float().reshape(-1, vocab)[mask]
    teacher = teacher_logits.float().reshape(-1, vocab)[mask]
    kl = F.kl_div(
        F.log_softmax(student / temperature, -1),
        F.log_softmax(teacher / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    kd = temperature**2 * kl
    ce = F.cross_entropy(student, targets.reshape(-1)[mask])
    out = {"loss": alpha * kd + (1 - alpha) * ce, "kd_loss": kd.detach(), "ce_loss": ce.detach()}
    if not diagnostics:
        return out
    with torch.no_grad():
        predicted = student.argmax(-1)
        num_tokens = mask.sum()
        accuracy = (predicted == targets.reshape(-1)[mask]).float().mean()
        agreement = (predicted == teacher.argmax(-1)).float().mean()
    return {**out, "student_accuracy": accuracy, "teacher_agreement": agreement, "num_tokens": num_tokens}
