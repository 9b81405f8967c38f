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


DPO_LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the log-probabilities of each row's targets != -100, their count): (B,) and (B,).

    Computed as -cross_entropy per position in float32, so a (B, T, V) log-softmax is never kept beside the logits.
    """
    flat = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = targets != IGNORE_INDEX
    return -flat.view_as(targets).sum(1), mask.sum(1)


def dpo_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    targets: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Direct Preference Optimization over rows [chosen_1..chosen_B, rejected_1..rejected_B] (Rafailov et al. 2023).

    logits and ref_logits (2B, T, V) of the policy and the frozen reference, targets (2B, T) labelling the
    responses only. With the log-ratios r = log pi(y|x) - log pi_ref(y|x) summed over each response's tokens:
    - sigmoid: -log sigmoid(beta * (r_chosen - r_rejected)); with label_smoothing e, conservative DPO:
      -(1 - e) log sigmoid(beta * d) - e log sigmoid(-beta * d) (the preference label flipped with probability e);
    - ipo: (d' - 1 / (2 beta))^2 with d' the difference of the per-token means of r (IPO, Azar et al. 2023, as TRL
      normalises it by each response's length).
    Metrics as TRL names them: rewards/chosen, rewards/rejected (beta * r), rewards/accuracies (the share of
    pairs whose chosen reward is higher), rewards/margins, logps/chosen, logps/rejected (the policy's summed
    log-probabilities); all means over the B pairs, detached.
    """
    logps, counts = sequence_logps(logits, targets)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(ref_logits, targets)
    chosen, rejected = logps.chunk(2)
    ratios = logps - ref_logps
    chosen_ratio, rejected_ratio = ratios.chunk(2)
    if loss_type == "sigmoid":
        delta = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)
    elif loss_type == "ipo":
        chosen_n, rejected_n = counts.clamp(min=1).chunk(2)
        losses = (chosen_ratio / chosen_n - rejected_ratio / rejected_n - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r} must be one of {', '.join(DPO_LOSS_TYPES)}")
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }
    return {"loss": losses.mean(), **metrics}
