"""jraise.train: supervised fine-tuning (full or LoRA) with a pure jitted step, and Orbax checkpoints.

`step` holds the pure pieces (accumulated AdamW step, eval step, optimizer and schedule; the
response-token loss itself is `jraise.loglik.example_nll`), `loop` the training loop (`train`,
`TrainConfig`), `checkpoint` the Orbax layer (`load_checkpoint`, `restore_model`, `export_model`,
`adam_moments` readers for LESS).
"""

from jraise.train.checkpoint import (
    checkpoint_steps,
    export_model,
    list_checkpoints,
    load_checkpoint,
    load_meta,
    lora_settings,
    restore_model,
)
from jraise.train.loop import (
    StepInfo,
    TrainConfig,
    TrainResult,
    epoch_orders,
    evaluate_loss,
    train,
)
from jraise.train.step import (
    SCHEDULES,
    accumulated_grads,
    adam_moments,
    assign_trainable,
    lr_schedule,
    make_eval_step,
    make_optimizer,
    make_train_step,
    param_dtypes,
    split_trainable,
    trainable_filter,
)

__all__ = [
    "SCHEDULES",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "accumulated_grads",
    "adam_moments",
    "assign_trainable",
    "checkpoint_steps",
    "epoch_orders",
    "evaluate_loss",
    "export_model",
    "list_checkpoints",
    "load_checkpoint",
    "load_meta",
    "lora_settings",
    "lr_schedule",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "param_dtypes",
    "restore_model",
    "split_trainable",
    "train",
    "trainable_filter",
]
