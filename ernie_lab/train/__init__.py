"""Training: the step and the loop, the MoE losses, LoRA, and the fine-tuning objectives (SFT, DPO).

    trainer     Trainer / TrainConfig: one training step, warm-up + cosine, checkpoints and resume, DDP
    fsdp        FSDP2 (TrainConfig(parallel="fsdp")): sharding, sharded checkpoints, consolidate into the Hub folder
    losses      load balancing (per modality group), router z-loss, orthogonal loss, token-balanced LM loss
    lora/       layer.py: LoRA linears (the math, apply, merge, unmerge); peft_format.py: peft-format adapters
    finetune    SFT with prompt masking, DPO (another Objective), through the same step; the one collate

May import: ``ernie_lab.errors``, ``ernie_lab.atomic``, ``ernie_lab.model``, ``ernie_lab.quant``, ``ernie_lab.io``.

``ernie_lab.train`` also answers with the trainer's names (``train.Trainer``, ``train.TrainConfig``, ...).
"""

from .trainer import (STATE_FILE, Objective, TrainConfig, Trainer, TrainingDiverged, checkpoints,  # noqa: F401
                      from_batches, latest_checkpoint, learning_rate, leave_processes, parameter_groups,
                      part_learning_rate, train)

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "Objective", "train", "learning_rate", "parameter_groups", "part_learning_rate",
           "from_batches", "checkpoints", "latest_checkpoint", "leave_processes", "STATE_FILE"]
