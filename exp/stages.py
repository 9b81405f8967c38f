"""Training stages: the recipe fields every stage shares, and each stage's train and eval step."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exp.losses import DPO_LOSS_TYPES, IGNORE_INDEX, dpo_loss, kd_loss, lm_loss
from exp.model.layers import document_ids
from exp.model.protocol import logits_of, router_losses

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class StageConfig:
    """The recipe of one stage. Optimizer and scheduler configs interpolate these fields."""

    name: str
    num_steps: int
    batch_size_per_gpu: int
    num_epochs: float | None = None  # instead of num_steps, for finite data: exp.config derives num_steps
    learning_rate: float
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_decay_ratio: float = 0.1
    gradient_accumulation_steps: int = 1
    dtype: str = "auto"
    log_every_n_steps: int = 10
    eval_every_n_steps: int = 100
    num_eval_batches: int = 8
    eval_at_start: bool = False  # evaluate before the first step too (val loss before this stage's training)
    init_from: str | None = None  # start from these weights: a checkpoint, run dir or exported model

    def __post_init__(self):
        checks = [
            (self.num_steps > 0, "num_steps", "must be > 0"),
            (self.batch_size_per_gpu > 0, "batch_size_per_gpu", "must be > 0"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.max_grad_norm > 0, "max_grad_norm", "must be > 0 (clipping cannot be switched off with 0)"),
            (
                0 <= self.warmup_steps < self.num_steps,
                "warmup_steps",
                f"must be in [0, stage.num_steps={self.num_steps})",
            ),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
            (0 <= self.lr_decay_ratio <= 1, "lr_decay_ratio", "must be in [0, 1]"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1"),
            (self.dtype in DTYPE_NAMES, "dtype", f"must be one of {', '.join(DTYPE_NAMES)}"),
            (self.log_every_n_steps > 0, "log_every_n_steps", "must be > 0"),
            (self.eval_every_n_steps > 0, "eval_every_n_steps", "must be > 0"),
            (self.num_eval_batches > 0, "num_eval_batches", "must be > 0"),
            (self.init_from is None or Path(self.init_from).exists(), "init_from", "does not exist"),
            (self.num_epochs is None or self.num_epochs > 0, "num_epochs", "must be > 0 or null"),
        ]
        for ok, key, rule in checks:
            if not ok:
                raise ValueError(f"stage.{key}={getattr(self, key)!r} {rule}")
        # not a config key: the data's end-of-text id when its rows pack documents (data.document_mask), set by
        # exp.run; the models then get each row's document ids (exp.model.protocol.takes_documents)
        self.document_token: int | None = None

    @property
    def samples_per_step(self) -> int:
        return self.batch_size_per_gpu * self.gradient_accumulation_steps

    def check(self, model_cfg: dict) -> None:
        """Checks that need the (student) model's config; raise ValueError naming the key."""

    def check_data(self, data) -> None:
        """Checks that need the run's data; raise ValueError naming the key. Preference pairs train only in DPO."""
        if getattr(data, "paired", False):
            raise ValueError(
                f"data={getattr(data, 'name', type(data).__name__)} gives preference pairs (chosen and rejected "
                f"rows), which stage={self.name} would train on as text alike: use stage=dpo"
            )

    def logits(self, model, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for x; with documents packed in the rows, each row's document ids go with it."""
        if self.document_token is None:
            return logits_of(model(x))
        return logits_of(model(x, doc_ids=document_ids(x, self.document_token)))

    def setup(self, model, rt) -> None:
        """Build what the stage needs beside the trained model (a teacher), on the run's device."""

    def train_step(self, model, batch, diagnostics: bool = True) -> dict[str, torch.Tensor]:
        """One micro-batch forward: `loss` to backpropagate, plus detached metrics averaged over the log
        interval. With `diagnostics` also the metrics that cost extra work (accuracy): the loop asks for
        them on the last micro-batch of the step that closes each log interval."""
        raise NotImplementedError

    def eval_step(self, model, batch) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy on the labelled positions: comparable across stages."""
        x, y = batch
        return lm_loss(self.logits(model, x), y)


def frozen_model(path: str | None, model_cfg: dict | None, source: str, rt) -> torch.nn.Module:
    """A model that only runs forward beside the trained one (a distillation teacher, DPO's reference): the weights
    at `path`, else `model_cfg` randomly initialised; on the run's device, in eval mode, without gradients, in the
    stage dtype. Never in the optimizer or the checkpoint."""
    from exp.checkpoint import build_model, load_model_for_inference

    if path is not None:
        model, _ = load_model_for_inference(path, device=rt.device)
    else:
        with torch.device(rt.device):
            model = build_model(dict(model_cfg), source).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if rt.dtype is not torch.float32:
        model.to(rt.dtype)  # it only runs forward: keep it in the stage dtype
    return model


def with_router_losses(model, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add a mixture-of-experts model's router losses to the stage loss, each also reported on its own."""
    router = router_losses(model)
    if not router:
        return out
    return {**out, "loss": out["loss"] + router["router_loss"], **router}


@dataclass(kw_only=True)
class Pretrain(StageConfig):
    """Causal language modelling: next-token cross-entropy on every position."""

    label_smoothing: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"stage.label_smoothing={self.label_smoothing} must be in [0, 1)")

    def train_step(self, model, batch, diagnostics: bool = True) -> dict[str, torch.Tensor]:
        """One micro-batch forward: `loss` to backpropagate, plus detached metrics.

        diagnostics=False skips the metrics that cost extra work (accuracy): the loop asks for them only
        on the step that closes a log interval.
        """
        x, y = batch
        logits = self.logits(model, x)
        return with_router_losses(model, lm_loss(logits, y, self.label_smoothing, accuracy=diagnostics))


@dataclass(kw_only=True)
class SFT(Pretrain):
    """Supervised fine-tuning: the loss counts completion tokens only (the data masks prompts and padding)."""

    eval_at_start: bool = True

    def train_step(self, model, batch, diagnostics: bool = True) -> dict[str, torch.Tensor]:
        from exp.data.tokenizer import PAD

        out = super().train_step(model, batch, diagnostics)
        if not diagnostics:
            return out
        x, y = batch
        with torch.no_grad():  # labelled tokens over real (non-pad) input tokens
            out["completion_ratio"] = (y != IGNORE_INDEX).sum().float() / (x != PAD).sum().clamp(min=1).float()
        return out


@dataclass(kw_only=True)
class TeacherConfig:
    """Where a distillation teacher comes from."""

    path: str | None = None  # a checkpoint folder, run directory or exported model
    model: dict[str, Any] | None = None  # or a model config (randomly initialised: ablations and tests)


@dataclass(kw_only=True)
class Distill(StageConfig):
    """Knowledge distillation: L = alpha * T^2 * KL(P_teacher(T) || P_student(T)) + (1 - alpha) * CE.

    The teacher is frozen: eval mode, no gradients, never in the optimizer or the student's checkpoint.
    `stage=distill` selects it, and `stage=midtrain` (its first name) too.
    """

    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    temperature: float = 2.0
    alpha: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"stage.temperature={self.temperature} must be > 0")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"stage.alpha={self.alpha} must be in [0, 1]")
        if self.teacher.path is None and self.teacher.model is None:
            raise ValueError(
                "stage.teacher.path is required (a checkpoint, run dir or exported model), or stage.teacher.model"
            )
        if self.teacher.path is not None and not Path(self.teacher.path).exists():
            raise ValueError(f"stage.teacher.path={self.teacher.path} does not exist")
        self._teacher = None

    def _teacher_config(self) -> dict:
        if self.teacher.path is not None:
            from exp.checkpoint import model_config_of

            return model_config_of(self.teacher.path)
        return dict(self.teacher.model)

    def check(self, model_cfg: dict) -> None:
        from exp.checkpoint.weights import model_class
        from exp.model.protocol import takes_documents

        teacher_cfg = self._teacher_config()
        source = f"stage.teacher.path={self.teacher.path}" if self.teacher.path else "stage.teacher.model"
        cls = model_class(teacher_cfg.get("_target_"), source)  # an unallowed teacher class is refused now
        if self.document_token is not None and not takes_documents(cls):
            raise ValueError(
                f"{source}: the teacher's {cls.__qualname__}.forward takes no doc_ids, and data.document_mask is on "
                "(the teacher would see across documents)"
            )
        # model=hf: config.json's (as saved, grown or not), else the model node's
        teacher_vocab = (teacher_cfg.get("config") or {}).get("vocab_size") or teacher_cfg.get("vocab_size")
        student_vocab = model_cfg.get("vocab_size")
        if teacher_vocab != student_vocab:
            raise ValueError(
                f"{source}: the teacher's vocab_size {teacher_vocab} differs from the student's "
                f"{model_cfg.get('vocab_size')}; distillation needs one vocabulary"
            )

    def setup(self, model, rt) -> None:
        self._teacher = frozen_model(self.teacher.path, self.teacher.model, "stage.teacher.model", rt)

    def train_step(self, model, batch, diagnostics: bool = True) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self.logits(model, x)
        with torch.no_grad():
            teacher_logits = self.logits(self._teacher, x)
        out = kd_loss(logits, teacher_logits, y, self.temperature, self.alpha, diagnostics)
        return with_router_losses(model, out)


# The first name of Distill: conf/stage/midtrain.yaml targets it, as do the configs that checkpoints of
# `stage=midtrain` runs saved, so resuming one (which compares the configs) still matches.
Midtrain = Distill


@dataclass(kw_only=True)
class ReferenceConfig:
    """Where DPO's reference model comes from."""

    path: str | None = None  # a checkpoint folder, run directory or exported model; null: stage.init_from's weights
    model: dict[str, Any] | None = None  # or a model config (randomly initialised: a pipeline's validation, tests)


@dataclass(kw_only=True)
class DPO(StageConfig):
    """Direct Preference Optimization on (prompt, chosen, rejected) pairs (exp.losses.dpo_loss).

    The policy starts from stage.init_from; the reference is those starting weights, or stage.reference.path,
    frozen: eval mode, no gradients, in the stage dtype, never in the optimizer or the checkpoint (as the
    distillation teacher). Batches hold B pairs as 2B rows (exp.data.preference). Validation reports the DPO loss
    on held-out pairs as val/loss, with the rewards, log-probabilities and the chosen responses' cross-entropy
    (val/chosen_nll, comparable with an SFT stage's val/loss).
    """

    eval_perplexity = False  # val/loss is DPO's loss: no perplexity (a class attribute, not a config key)

    reference: ReferenceConfig = dataclasses.field(default_factory=ReferenceConfig)
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0  # conservative DPO: the preference label flipped with this probability
    eval_at_start: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"stage.beta={self.beta} must be > 0")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"stage.loss_type={self.loss_type!r} must be one of {', '.join(DPO_LOSS_TYPES)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"stage.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(
                f"stage.label_smoothing={self.label_smoothing} is for loss_type=sigmoid (conservative DPO)"
            )
        if self.reference.path is None and self.reference.model is None and self.init_from is None:
            raise ValueError(
                "stage.init_from is required: DPO starts from a trained model (an SFT run), which is also the "
                "frozen reference unless stage.reference.path names another"
            )
        if self.reference.path is not None and not Path(self.reference.path).exists():
            raise ValueError(f"stage.reference.path={self.reference.path} does not exist")
        self._reference = None

    @property
    def reference_path(self) -> str | None:
        return self.reference.path or (None if self.reference.model is not None else self.init_from)

    def check(self, model_cfg: dict) -> None:
        from exp.checkpoint import model_config_of

        if self.reference_path is None:
            reference_cfg, source = dict(self.reference.model), "stage.reference.model"
        else:
            reference_cfg = model_config_of(self.reference_path)  # a transformers folder too
            key = "stage.reference.path" if self.reference.path else "stage.init_from"
            source = f"{key}={self.reference_path}"
        if reference_cfg.get("vocab_size") != model_cfg.get("vocab_size"):
            raise ValueError(
                f"{source}: the reference's vocab_size {reference_cfg.get('vocab_size')} differs from the policy's "
                f"{model_cfg.get('vocab_size')}; DPO compares their log-probabilities of the same tokens"
            )

    def check_data(self, data) -> None:
        if not getattr(data, "paired", False):
            raise ValueError(
                f"stage=dpo trains on preference pairs, and data={getattr(data, 'name', type(data).__name__)} gives "
                "none: use data=preference_jsonl data.path=PAIRS.jsonl (or the built-in data=preference_pystdlib)"
            )

    def setup(self, model, rt) -> None:
        self._reference = frozen_model(self.reference_path, self.reference.model, "stage.reference.model", rt)

    def _loss(self, model, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x, y = batch
        logits = self.logits(model, x)
        with torch.no_grad():
            ref_logits = self.logits(self._reference, x)
        return dpo_loss(logits, ref_logits, y, self.beta, self.loss_type, self.label_smoothing), logits

    def train_step(self, model, batch, diagnostics: bool = True) -> dict[str, torch.Tensor]:
        out, _ = self._loss(model, batch)
        return with_router_losses(model, out)

    def eval_step(self, model, batch) -> dict[str, torch.Tensor]:
        """DPO's loss and metrics over the batch's pairs (each pair weighs one), and the chosen responses' mean
        token cross-entropy."""
        out, logits = self._loss(model, batch)
        num_pairs = batch[0].size(0) // 2
        chosen = lm_loss(logits[:num_pairs], batch[1][:num_pairs], accuracy=False)["loss"]
        return {**out, "chosen_nll": chosen, "num_tokens": torch.tensor(num_pairs, device=logits.device)}
