"""The pre-flight plan printed by `dry_run=true`: sizes, token budget, FLOPs, memory and the LR schedule."""

from __future__ import annotations

import os

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from exp.config import component
from exp.model import adapters
from exp.model.protocol import declared, flops_per_token, model_spec, num_params
from exp.optim import freeze, group_rules, param_groups

# Optimizer state tensors kept per parameter (exp_avg/exp_avg_sq, momentum buffer, square average).
STATE_PER_PARAM = {"AdamW": 2, "Adam": 2, "SGD": 1, "RMSprop": 1}


def make_plan(cfg: DictConfig, stage, hardware) -> dict:
    """Everything the plan reports, computed with the model on the meta device."""
    with torch.device("meta"):
        model = instantiate(component(cfg, "model"))
    adapter = adapters.adapter_config(OmegaConf.to_container(cfg.model, resolve=True).get("adapter"))
    if adapter is not None:  # exp.config checked it: peft is there and the target finds layers
        adapters.inject(model, adapter)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    seq_len = cfg.data.seq_len
    tokens_per_step = stage.batch_size_per_gpu * stage.gradient_accumulation_steps * world_size * seq_len
    total_tokens = tokens_per_step * stage.num_steps
    n_params = num_params(model)
    options = OmegaConf.to_container(cfg.optimizer, resolve=True)
    frozen = freeze(model, cfg.model.get("freeze"))
    groups = [
        {
            "name": g["name"],
            "num_params": sum(p.numel() for p in g["params"]),
            "lr_mult": g["lr_mult"],
            "weight_decay": g["weight_decay"],
        }
        for g in param_groups(model, options.get("weight_decay", 0.0), group_rules(options.get("param_groups")))
    ]
    device = hardware.torch_device()
    dtype = hardware.torch_dtype(stage.dtype)

    optimizer_name = cfg.optimizer._target_.rsplit(".", 1)[-1]
    num_states = STATE_PER_PARAM.get(optimizer_name, 2)
    if optimizer_name == "SGD" and not cfg.optimizer.get("momentum"):
        num_states = 0
    trainable, frozen_params = adapters.count(model)  # frozen: the base under an adapter, model.freeze
    weights = n_params * 4  # fp32 master weights and gradients; autocast keeps them fp32
    grads = trainable * 4  # a frozen parameter has no gradient and no optimizer state
    optimizer_state = num_states * trainable * 4
    activations, layers_known = _activation_bytes(model, stage.batch_size_per_gpu, seq_len, dtype)

    dummy = torch.nn.Parameter(torch.zeros(1))
    base_lr = float(cfg.optimizer.lr)
    optimizer = instantiate(component(cfg, "optimizer"))([dummy])
    scheduler = instantiate(cfg.scheduler)(optimizer)
    milestones = sorted(
        {1, *(max(1, round(stage.num_steps * f)) for f in (0.1, 0.25, 0.5, 0.75, 0.9)), stage.num_steps}
    )
    lr_at = {s: base_lr * scheduler.lr_lambdas[0](s - 1) for s in milestones}

    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "compile": hardware.compile,
        "num_params": n_params,
        "num_params_non_embedding": num_params(model, exclude_embeddings=True),
        "world_size": world_size,
        "tokens_per_step": tokens_per_step,
        "num_steps": stage.num_steps,
        "param_groups": groups,  # the optimizer's groups: name, parameter count, lr multiplier, weight decay
        "num_frozen_tensors": frozen,
        "num_trainable_params": trainable,
        "num_frozen_params": frozen_params,
        "adapter": None
        if adapter is None
        else {**adapter.to_dict(), "num_layers": len(adapters.info(model)["targets"])},
        "optimizer_state_saved": num_states * frozen_params * 4,  # bytes full fine-tuning would hold besides
        "num_epochs": stage.num_epochs,  # num_steps was derived from it (exp.config)
        "total_tokens": total_tokens,
        "train_flops": flops_per_token(model, seq_len) * total_tokens,
        "memory_bytes": {
            "weights": weights,
            "gradients": grads,
            "optimizer": optimizer_state,
            "activations": activations,
            "total": weights + grads + optimizer_state + activations,
        },
        "activations_of_layers": layers_known,  # False: the model declares no layers, only logits counted
        "lr_at_step": lr_at,
    }


def _activation_bytes(model, batch_size: int, seq_len: int, dtype: torch.dtype) -> tuple[int, bool]:
    """Stored activations for backward (Korthikanti et al. 2022, no recompute) plus the fp32 logits, and
    whether the layers were counted: only for a model that declares n_layer, d_model and n_head."""
    d, n_layer, n_head = (declared(model, k) for k in ("d_model", "n_layer", "n_head"))
    vocab_size, _ = model_spec(model)
    logits = 3 * batch_size * seq_len * (vocab_size or 0) * 4  # logits, their fp32 copy and gradient
    if not (d and n_layer and n_head):
        return int(logits), False
    half = dtype in (torch.bfloat16, torch.float16)
    per_layer = seq_len * batch_size * d * (34 + 5 * n_head * seq_len / d) * (1 if half else 2)
    if declared(model, "activation_checkpointing"):
        per_layer = seq_len * batch_size * d * (2 if half else 4)  # only each block's input is kept
    return int(n_layer * per_layer + logits), True


def format_plan(plan: dict) -> str:
    """The plan as an aligned text block."""
    mem = plan["memory_bytes"]
    lines = [
        "plan (dry run: nothing was trained or written)",
        f"  device            {plan['device']} / {plan['dtype']}{' / compiled' if plan['compile'] else ''}",
        f"  parameters        {plan['num_params']:,} ({plan['num_params_non_embedding']:,} non-embedding)",
        f"  tokens per step   {plan['tokens_per_step']:,} (micro-batch x accumulation x world size "
        f"{plan['world_size']} x sequence length)",
        f"  steps             {plan['num_steps']:,}"
        + (f" (stage.num_epochs={plan['num_epochs']:g}, derived)" if plan.get("num_epochs") else ""),
        f"  total tokens      {plan['total_tokens']:,}",
        f"  training FLOPs    {plan['train_flops']:.3e}",
        f"  memory estimate   {_mb(mem['total'])} = weights {_mb(mem['weights'])} + gradients "
        f"{_mb(mem['gradients'])} + optimizer {_mb(mem['optimizer'])} + activations {_mb(mem['activations'])}"
        + ("" if plan["activations_of_layers"] else " (logits only: the model declares no n_layer/d_model/n_head)"),
        "  optimizer groups  "
        + "; ".join(
            f"{g['name']}: {g['num_params']:,} params, lr x{g['lr_mult']:g}, wd {g['weight_decay']:g}"
            for g in plan["param_groups"]
        )
        + (f" ({plan['num_frozen_tensors']} frozen tensors: model.freeze)" if plan["num_frozen_tensors"] else ""),
        *_trainable_lines(plan),
        "  learning rate     " + ", ".join(f"step {s}: {lr:.3g}" for s, lr in plan["lr_at_step"].items()),
    ]
    return "\n".join(lines)


def _trainable_lines(plan: dict) -> list[str]:
    """What trains and what is frozen, and the optimizer state that saves; nothing when everything trains."""
    if not plan["num_frozen_params"]:
        return []
    trainable, frozen = plan["num_trainable_params"], plan["num_frozen_params"]
    share = trainable / max(trainable + frozen, 1)
    adapter = plan["adapter"]
    why = (
        f"{adapter['kind']} r={adapter['r']} alpha={adapter['alpha']:g} on {adapter['num_layers']} layers"
        if adapter
        else "model.freeze"
    )
    return [
        f"  trainable         {trainable:,} parameters ({share:.2%}); {frozen:,} frozen ({why})",
        f"  optimizer state   {_mb(plan['memory_bytes']['optimizer'])}, {_mb(plan['optimizer_state_saved'])} "
        f"saved against training every parameter (gradients: {_mb(frozen * 4)} saved)",
    ]


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.1f} MiB"
