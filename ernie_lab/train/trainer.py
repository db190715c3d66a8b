"""Training from scratch: one loop for dense, MoE and vision-language models, in one process or many.

    trainer = Trainer(model.init_weights(seed=0), train_data, TrainConfig(lr=1e-3, max_steps=200))
    history = trainer.fit()        # list of dicts, one per logged step (and one per evaluation)

The objective of one optimizer step (``c_*`` are the config's loss weights, 0 = off):

    loss = LM + c_bal L_bal + c_z L_z + c_orth sum_routers L_orth              (losses.py has each term)
    LM   = sum_tokens CE / #targets       (mean next-token cross-entropy, ``out.loss``), or, with
           ``token_balanced``, the mean over samples of each sample's mean (``losses.token_balanced_loss``)
    L_bal = load balancing: per modality group for VL (text + vision), over all tokens for a text MoE

Learning rate at update t = 0 .. T-1 (T = ``max_steps``, W = ``warmup_steps``): linear warm-up, cosine decay

    lr_t = lr (t + 1) / W                                                     t < W
    lr_t = min_lr + (lr - min_lr) (1 + cos(pi p)) / 2,  p = (t - W) / (T - 1 - W)    t >= W   (lr_{T-1} = min_lr)

AdamW (Adam with *decoupled* weight decay, Loshchilov & Hutter): with the averaged gradient g,

    m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2,   m^ = m / (1 - b1^t),   v^ = v / (1 - b2^t)
    theta <- theta - lr_t ( m^ / (sqrt(v^) + eps) + wd theta )

The decay shrinks the weight directly instead of entering g (where Adam's scaling would undo it). It
applies to the matrices of linear layers (attention, MLPs, experts, routers, the ViT), not to norm
scales (they should stay near 1, decay pulls them to 0), biases, or embeddings (nor the tied LM head that
shares them): an embedding row of a rare token would shrink during every step that does not see it.
The MoE correction bias is not trained here (it has no gradient; aux-free balancing would update it).

Parts of the model can learn at their own pace: ``lr_scale={"vision": 0.1}`` multiplies the learning
rate of every parameter whose name starts with ``vision.``, and ``frozen_steps={"vision": 200}`` holds
those parameters fixed (learning rate 0) for the first 200 updates. A VL model trained from scratch
needs both: in its first updates the fastest way to lower the loss is to turn every image token into the
same vector (a constant the answers lean on), and once the adapter has collapsed the picture that way,
nothing about the individual shapes reaches the decoder again. With the ViT and adapter held at their
random initialisation (whose features do differ from patch to patch) the decoder first learns to read
them, and then the whole model refines them, slowly.

Data, deterministic by index. ``train_data(index, rank, world_size) -> batch`` is called for micro-batch
``index = step * grad_accum_steps + micro`` (step 0-based). A batch is a dict of tensors: ``input_ids``
(B, T), ``labels`` (B, T, aligned with the inputs; -100 ignored; default: input_ids with padding ignored),
optional ``attention_mask`` and whatever else the model's forward takes (``pixel_values``,
``image_grid_thw``). Because a batch depends only on (index, rank, world_size), a resumed run sees
exactly the batches the uninterrupted one would have. ``eval_data(i) -> batch`` for i < ``eval_batches``.
:func:`from_batches` turns a list of text batches into such a callable (rows split over ranks).

One step over micro-batches i < A on ranks r < R. The step's gradient is that of the *combined* batch:

    LM = sum_{r,i} n_ri LM_ri / N,   N = sum_{r,i} n_ri    (n = target tokens; samples with a target
                                                           when token_balanced)
    micro-batch (r, i) backpropagates   (R n_ri / N) LM_ri + (c_bal L_bal,ri + c_z L_z,ri) / A

and DDP averages gradients over ranks (divides by R), which leaves exactly d LM / d theta plus the mean
of the routing losses over micro-batches. (Plain mean losses per rank with DDP's average are exact only
when every micro-batch has the same n; the weights n_ri / N make uneven padding exact too.) L_bal is
computed per micro-batch (f and P over its tokens), so it is not the combined batch's; L_z is a token
mean and equals the combined batch's when every micro-batch has as many tokens. L_orth
depends on the router weights alone, identical on every rank: its gradient is added once per step, after
DDP's reduction, with torch.autograd.grad (a second backward through DDP's hooks would mark a router
that saw no token on this rank as used, and DDP then fails the next step).

Scale-out: under ``torchrun --nproc_per_node=R script.py`` (env WORLD_SIZE > 1) the Trainer joins the
process group (nccl with CUDA, gloo on CPU), puts rank r's model on ``cuda:LOCAL_RANK`` when CUDA exists,
wraps it in DistributedDataParallel (``find_unused_parameters`` on for MoE models: an expert that gets no
token has no gradient) and rank r reads ``train_data(index, r, R)``. Only rank 0 shows the bar and writes.
``parallel="fsdp"`` shards the model instead (FSDP2, ``fsdp.py``): the same gradients and updates, each
rank holding 1/R of the weights, gradients and optimizer state; every rank writes its shards of a checkpoint.

Checkpoints: ``out_dir/step-N/`` (N updates done) holds the model in the Hub layout (``save_model``: loads
with ``ernie_lab.load_model`` and, for text models, with transformers) and ``trainer_state.pt`` (optimizer
state, step, RNG states, history: plain tensors and lists, read back with ``torch.load(weights_only=True)``).
Both are written into one ``ernie_lab.atomic.atomic_folder``: a kill mid-write leaves the previous step-N (and
every other checkpoint) as it was. With ``parallel="fsdp"`` a checkpoint is sharded instead (config.json,
trainer_state.pt without the optimizer, ``shards/``: see fsdp.py) and resumes on any number of ranks.
``Trainer.resume(folder)`` (or ``resume_from``)
continues the same curve (RNG states are rank 0's). ``keep_last`` prunes old ones, except the steps in
``keep_checkpoints_at`` (written even off the ``checkpoint_every`` grid: routing over training wants a few early ones).

Bad input is refused before anything changes, naming the culprit: every TrainConfig field (a numeric
string such as ``lr="3e-4"``, which is how YAML reads it, is accepted for a float setting; an unknown key
is named with the closest setting), every batch (``train_data(index, rank, world_size)`` named: empty,
mis-shaped, float ids, ids outside the vocabulary). A NaN / Inf loss or gradient norm stops the run
*before* the update with :class:`TrainingDiverged` (an InputError and a FloatingPointError) naming the
step and what to try; the weights, the optimizer and the checkpoints stay those of the last good step.
``resume`` reads and checks everything first (a truncated or garbled ``trainer_state.pt``, a checkpoint of
another model, and a change of a setting in ``RESUME_MUST_MATCH`` -- lr, lr_scale, frozen_steps, warm-up,
weight decay, ... -- are refused, naming the file and the setting, with the Trainer as it was); ``max_steps``,
logging, evaluation and checkpointing may change on resume (the cosine follows the new ``max_steps``).

Other objectives (DPO, in ``finetune``) plug into the same step as an :class:`Objective`: a loss that is a
mean over ``count(batch)`` units (target tokens, preference pairs), weighted across micro-batches and ranks
like LM above, plus terms to log.

The public names: :class:`TrainConfig`, :class:`Trainer` (``fit``, ``train_step``, ``evaluate``,
``save_checkpoint``, ``resume``), :class:`Objective`, :func:`train` (``Trainer(...).fit()`` in one call),
:func:`learning_rate`, :func:`parameter_groups`, :func:`part_learning_rate`, :func:`from_batches`,
:func:`checkpoints`, :func:`latest_checkpoint`, :func:`rng_state` / :func:`restore_rng`,
:func:`leave_processes`. History entries: ``step, loss, lm_loss, [balance, balance_text, balance_vision,
z_loss, orthogonal,] lr, grad_norm`` (before clipping), ``tokens_per_s`` (input tokens of all ranks over
the training time since the last entry); evaluation entries ``step, eval_loss``.
"""

from __future__ import annotations

import atexit
import difflib
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from . import fsdp, losses
from ..errors import CheckpointError, ConfigError, InputError, TrainingDiverged
from ..atomic import atomic_folder
from ..io.loading import load_model
from ..io.saving import write_model
from ..model.decoder import IGNORE_INDEX
from ..model.moe import moe_blocks

Batch = dict[str, torch.Tensor]
TrainData = Callable[[int, int, int], Batch]   # (index, rank, world_size) -> batch
EvalData = Callable[[int], Batch]              # i -> batch
STATE_FILE = "trainer_state.pt"
WEIGHTED = ("balance", "z_loss", "orthogonal")  # the loss terms with a weight of the same name in TrainConfig
CHECKPOINT_PREFIX = "step-"


# ================================================================================ the config
@dataclass
class TrainConfig:
    """Everything the loop needs; the batch size per rank is the data's business."""

    lr: float = 3e-4                        # peak learning rate, reached at the end of the warm-up; numeric
                                            # strings ("3e-4", as YAML reads it) are accepted for every float
    min_lr_ratio: float = 0.1               # the cosine ends at min_lr = min_lr_ratio * lr
    weight_decay: float = 0.1               # decoupled, on linear weights only (see the module docstring)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    max_steps: int = 100                    # optimizer updates
    grad_accum_steps: int = 1               # micro-batches per update (per rank)
    max_grad_norm: float | None = 1.0       # clip the global gradient norm; None or 0: no clipping
    autocast: str | None = None             # "bf16": bfloat16 autocast (CPU or CUDA); None: full precision
    seed: int = 0                           # torch's RNG is seeded with seed + rank
    log_every: int = 1                      # a history entry every n steps (and at the last)
    eval_every: int = 0                     # evaluate every n steps (and at the last); 0: never
    eval_batches: int = 0
    checkpoint_every: int = 0               # write out_dir/step-N every n steps (and at the last); 0: never
    keep_last: int = 0                      # delete older periodic checkpoints beyond the newest n; 0: keep all
    keep_checkpoints_at: tuple[int, ...] = ()  # also write these steps, and never delete them
    out_dir: str | None = None
    resume_from: str | None = None          # a step-N folder, or "latest" (newest in out_dir, if any)
    balance: float = 0.0                    # load-balancing loss weight
    z_loss: float = 0.0                     # router z-loss weight
    orthogonal: float = 0.0                 # router orthogonal loss weight (summed over every router)
    token_balanced: bool = False            # LM = token-balanced loss instead of the token mean
    logits_for_labels_only: bool = False    # run the LM head only where a label is (same loss, less work)
    find_unused_parameters: bool | None = None  # DDP; None: on for MoE models
    parallel: str = "ddp"                   # under torchrun: "ddp" (a whole copy per rank) or "fsdp" (FSDP2:
                                            # weights, gradients, optimizer sharded; sharded checkpoints)
    progress: bool = True                   # tqdm bar on rank 0
    lr_scale: dict[str, float] = field(default_factory=dict)   # name prefix -> lr multiplier ("vision": 0.1)
    frozen_steps: dict[str, int] = field(default_factory=dict)  # name prefix -> first updates it sits out

    def __post_init__(self):
        problems = []
        for name in FLOAT_FIELDS:                      # YAML reads 3e-4 as the string "3e-4": accepted
            value = getattr(self, name)
            if name == "max_grad_norm" and value is None:
                continue
            number = _number(value)
            if number is None:
                problems.append(f"{name} must be a number, got {value!r}")
            else:
                setattr(self, name, number)
        for name in INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    setattr(self, name, int(value))
                else:
                    problems.append(f"{name} must be an integer, got {value!r}")
        if problems:
            raise ConfigError("TrainConfig: " + "; ".join(problems) + ".")
        try:
            self.betas = tuple(float(_number(b)) for b in self.betas)
        except (TypeError, ValueError):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        else:
            if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
                problems.append(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        try:
            self.keep_checkpoints_at = tuple(_integer(s) for s in self.keep_checkpoints_at)
        except (TypeError, ValueError):
            problems.append(f"keep_checkpoints_at must be a list of step numbers, got {self.keep_checkpoints_at!r}")
        else:
            if any(s < 1 for s in self.keep_checkpoints_at):
                problems.append(f"keep_checkpoints_at holds steps >= 1, got {list(self.keep_checkpoints_at)}")
        for name in ("max_steps", "grad_accum_steps", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_batches", "checkpoint_every", "keep_last"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.max_steps:
            problems.append(f"warmup_steps ({self.warmup_steps}) must be in [0, max_steps={self.max_steps})")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"lr must be > 0 (got {self.lr}) and min_lr_ratio in [0, 1] (got {self.min_lr_ratio})")
        if not self.eps > 0:
            problems.append(f"eps must be > 0, got {self.eps}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            problems.append(f"max_grad_norm must be > 0, or 0 / None for no clipping, got {self.max_grad_norm}")
        if self.parallel not in PARALLEL:
            problems.append(f"parallel must be one of {list(PARALLEL)}, got {self.parallel!r}")
        if self.autocast not in (None, "bf16"):
            problems.append(f"autocast must be 'bf16' or None, got {self.autocast!r}")
        if min(self.balance, self.z_loss, self.orthogonal, self.weight_decay) < 0:
            problems.append("loss weights (balance, z_loss, orthogonal) and weight_decay must be >= 0")
        if self.eval_every and self.eval_batches < 1:
            problems.append("eval_every needs eval_batches >= 1")
        for name in ("lr_scale", "frozen_steps"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                problems.append(f"{name} must be a dict of name prefix -> value, got {value!r}")
                continue
            try:
                setattr(self, name, {str(k): (float(_number(v)) if name == "lr_scale" else _integer(v))
                                     for k, v in value.items()})
            except (TypeError, ValueError):
                problems.append(f"{name} values must be numbers, got {value!r}")
                continue
            if min([*getattr(self, name).values(), 0]) < 0:
                problems.append("lr_scale and frozen_steps values must be >= 0")
        for name in ("out_dir", "resume_from"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)) or not str(value):
                    problems.append(f"{name} must be a folder path, got {value!r}")
                else:
                    setattr(self, name, os.fspath(value))  # a Path would not load back from trainer_state.pt
        if (self.checkpoint_every or self.keep_checkpoints_at or self.resume_from == "latest") and not self.out_dir:
            problems.append("checkpoints need out_dir")
        if problems:
            raise ConfigError("TrainConfig: " + "; ".join(problems) + ".")

    @property
    def min_lr(self) -> float:
        return self.min_lr_ratio * self.lr


PARALLEL = ("ddp", "fsdp")  # how several ranks share the work (fsdp.py explains FSDP2)
FLOAT_FIELDS = ("lr", "min_lr_ratio", "weight_decay", "eps", "max_grad_norm", "balance", "z_loss", "orthogonal")
INT_FIELDS = ("warmup_steps", "max_steps", "grad_accum_steps", "seed", "log_every", "eval_every", "eval_batches",
              "checkpoint_every", "keep_last")
# Settings a resume must share with the run it continues: each changes the curve from the resumed step on
# (the optimizer's groups and hyper-parameters, the schedule's shape, the loss). max_steps may change
# (train longer or stop sooner: the cosine then follows the new max_steps); logging, evaluation,
# checkpointing, progress and seed (the RNG states come from the checkpoint) may change freely.
RESUME_MUST_MATCH = ("lr", "min_lr_ratio", "weight_decay", "betas", "eps", "warmup_steps", "grad_accum_steps",
                     "max_grad_norm", "autocast", "balance", "z_loss", "orthogonal", "token_balanced",
                     "lr_scale", "frozen_steps")


def _number(value) -> float | None:
    """A finite float from a number or a numeric string ("3e-4", as YAML reads it); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        value = float(value)
        return value if math.isfinite(value) else None
    return None


def _integer(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(value)
    return int(value)


_dataclass_init = TrainConfig.__init__


def _checked_init(self, *args, **kwargs):
    known = {f.name for f in fields(TrainConfig)}
    unknown = [key for key in kwargs if key not in known]
    if unknown:
        hints = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, known, 1))
                 else repr(key) for key in unknown]
        raise ConfigError(f"TrainConfig has no setting {', '.join(hints)}; its settings are {sorted(known)}.")
    _dataclass_init(self, *args, **kwargs)


_checked_init.__doc__ = _dataclass_init.__doc__
TrainConfig.__init__ = _checked_init


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate of update ``step`` (0-based): linear warm-up, then cosine down to min_lr."""
    lr, warmup = config.lr, config.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, config.max_steps - 1 - warmup))
    return config.min_lr + (lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float, parts: tuple[str, ...] = ()) -> list[dict]:
    """AdamW groups: linear weights (routers included) decay; norms, biases and embeddings do not.

    Without ``parts``: [decay, no_decay]. With name prefixes ``parts`` (e.g. ``("vision", "adapter")``),
    each part gets its own pair of groups (key ``"part"``: the prefix, or "" for the rest), so that
    :class:`TrainConfig`'s ``lr_scale`` and ``frozen_steps`` can give it its own learning rate.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # incl. a tied head
    groups = {(part, decays): [] for part in ("", *parts) for decays in (True, False)}
    seen = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            part = next((p for p in parts if full == p or full.startswith(p + ".")), "")
            is_matrix = isinstance(module, nn.Linear) and name == "weight" and id(param) not in embeddings
            groups[part, is_matrix].append(param)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0, **({"part": part} if parts else {})}
            for (part, decays), params in groups.items() if params or not parts]


def check_parts(model: nn.Module, config: TrainConfig) -> None:
    """A ConfigError naming each lr_scale / frozen_steps prefix that names no parameter of the model (a typo
    like "layer.1" for "layers.1" would silently train that part at the full rate)."""
    names = [name for name, _ in model.named_parameters()]
    for setting in ("lr_scale", "frozen_steps"):
        for part in getattr(config, setting):
            if not any(name == part or name.startswith(part + ".") for name in names):
                tops = sorted({name.split(".", 1)[0] for name in names})
                raise ConfigError(f"TrainConfig: {setting} names {part!r}, which is no parameter name prefix of this "
                                  f"{type(model).__name__} (its top-level parts: {tops}); prefixes end at a dot, "
                                  "e.g. 'layers.1' or 'vision'.")


def part_learning_rate(step: int, part: str, config: TrainConfig) -> float:
    """The learning rate of a parameter group: the schedule's, times ``lr_scale[part]``, and 0 while
    ``step < frozen_steps[part]`` (the part sits out the first updates; "" is the rest of the model)."""
    if step < config.frozen_steps.get(part, 0):
        return 0.0
    return learning_rate(step, config) * config.lr_scale.get(part, 1.0)


# ================================================================================ data
def from_batches(batches: list[Batch]) -> TrainData:
    """A ``train_data`` callable over a list of text batches: index i takes batch i mod len, and rank r
    of R its r-th slice of rows (B must divide by R). Pictures need a callable of their own."""
    if not isinstance(batches, (list, tuple)):
        raise InputError(f"from_batches needs a list of batch dicts ({{'input_ids': (B, T) tensor, ...}}), got "
                         f"{type(batches).__name__}; wrap one batch as [batch].")
    if not batches:
        raise InputError("from_batches needs at least one batch.")

    def train_data(index: int, rank: int, world_size: int) -> Batch:
        batch = batches[index % len(batches)]
        if world_size == 1:
            return batch
        extra = set(batch) - {"input_ids", "labels", "attention_mask", "position_ids"}
        rows = batch["input_ids"].shape[0]
        if extra or rows % world_size:
            raise InputError(f"from_batches splits text batches by rows: {rows} rows over {world_size} ranks"
                             f"{', keys ' + str(sorted(extra)) if extra else ''}. Write a train_data callable.")
        per = rows // world_size
        return {key: value[rank * per:(rank + 1) * per] for key, value in batch.items()}

    return train_data


def with_labels(batch: Batch, where: str = "a batch") -> Batch:
    """Check a batch and give it labels (input_ids, padding ignored) when it has none."""
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), torch.Tensor):
        raise InputError(f"{where}: a batch must be a dict with an 'input_ids' tensor (B, T), got {type(batch).__name__}"
                         f"{' with keys ' + str(sorted(batch)) if isinstance(batch, dict) else ''}.")
    if "labels" in batch:
        return batch
    labels = batch["input_ids"].clone()
    if batch.get("attention_mask") is not None:
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    return {**batch, "labels": labels}


def check_batch(batch: Batch, where: str, vocab: int | None = None) -> None:
    """Shapes, dtypes and ranges of a text batch's tensors, each problem named (``where``: which call made it)."""
    ids = batch["input_ids"]
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise InputError(f"{where}: input_ids must be (B, T) with B >= 1 rows and T >= 2 tokens, got shape "
                         f"{tuple(ids.shape)}; an empty batch (batch size 0) has nothing to train on.")
    for key in ("input_ids", "labels", "attention_mask"):
        value = batch.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex():
            raise InputError(f"{where}: {key} must be an integer tensor, got "
                             f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}.")
        if value.shape != ids.shape:
            raise InputError(f"{where}: {key} has shape {tuple(value.shape)}, input_ids {tuple(ids.shape)}; they must match.")
    labels = batch["labels"]
    if vocab is not None:
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise InputError(f"{where}: input_ids hold ids from {int(ids.min())} to {int(ids.max())}; the model's "
                             f"vocabulary is 0 .. {vocab - 1}.")
        targets = labels[labels != IGNORE_INDEX]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
            raise InputError(f"{where}: labels hold {int(targets.min())} .. {int(targets.max())}; labels must be token "
                             f"ids 0 .. {vocab - 1} or {IGNORE_INDEX} (ignored).")


def vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    try:
        return int(config.get_text_config().vocab_size)
    except (AttributeError, TypeError, ValueError):
        return None


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def target_count(labels: torch.Tensor, token_balanced: bool) -> int:
    """n of a batch: target tokens (labels[:, 1:] not ignored) or, token-balanced, samples with a target."""
    has_target = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    return int(has_target.any(dim=1).sum() if token_balanced else has_target.sum())


def input_tokens(batch: Batch) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


# ================================================================================ losses of one forward
def lm_loss(out, labels: torch.Tensor, token_balanced: bool) -> torch.Tensor:
    """The language-model loss of one micro-batch: ``out.loss`` or the token-balanced loss."""
    if token_balanced:
        return losses.token_balanced_loss(out.logits[:, :-1], labels[:, 1:].to(out.logits.device))
    return out.loss


def routing_losses(model: nn.Module, out, batch: Batch, config: TrainConfig) -> dict[str, torch.Tensor]:
    """Balance (split per modality group for VL) and z-loss of one forward, as weighted terms are named."""
    terms = {}
    if config.balance:
        k = moe_blocks(model)[0].k
        if any(block.num_groups > 1 for block in moe_blocks(model)):
            groups = losses.modality_balancing_losses(out.router_logits, None, k)
            terms.update(balance_text=groups["text"], balance_vision=groups["vision"])
            terms["balance"] = groups["text"] + groups["vision"]
        else:
            terms["balance"] = losses.load_balancing_loss(out.router_logits, k, batch.get("attention_mask"))
    if config.z_loss:
        terms["z_loss"] = losses.router_z_loss(out.router_logits, batch.get("attention_mask"))
    return terms


# ================================================================================ objectives
@dataclass(frozen=True)
class Objective:
    """What the training step minimises. ``loss(model, batch, n)`` -> (the micro-batch's loss, terms) is a
    mean over ``n = count(batch)`` units (target tokens, preference pairs); the step weighs micro-batch
    (r, i) by n_ri / N, so the gradient is that of the combined batch's mean. Terms named like a
    TrainConfig loss weight (``WEIGHTED``: balance, z_loss) join the loss with that weight; the others
    (DPO's reward margin, ...) are only logged. Both are averaged over micro-batches and ranks."""

    name: str                                            # the loss's key in the history: "lm_loss", "dpo_loss"
    count: Callable[[Batch], int]
    loss: Callable[[nn.Module, Batch, int], tuple[torch.Tensor, dict]]


# ================================================================================ processes
@dataclass(frozen=True)
class Processes:
    """Where this process stands among the ``torchrun`` workers (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_processes() -> Processes:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), else stay alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch has no torch.distributed.")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():  # joined once per process; later Trainers share the group, left at exit
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # before NCCL starts, so each rank talks from its own GPU
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(leave_processes)
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank)


def leave_processes() -> None:
    """Leave the process group (the end of a torchrun script; also done at exit). The ranks meet first, so
    none tears its connections down while another still uses them (gloo aborts the late one otherwise)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:  # a rank already gone: leave anyway
            pass
        dist.destroy_process_group()


# ================================================================================ the trainer
class Trainer:
    """Trains ``model`` on ``train_data`` (see the module docstring for the protocol); ``fit()`` runs it."""

    def __init__(self, model: nn.Module, train_data: TrainData, config: TrainConfig | None = None,
                 eval_data: EvalData | None = None, objective: Objective | None = None):
        if isinstance(config, dict):
            config = TrainConfig(**config)           # a config read from YAML / JSON: checked the same way
        if config is not None and not isinstance(config, TrainConfig):
            raise InputError(f"config must be a TrainConfig (or a dict of its settings), got {type(config).__name__}.")
        self.config = config = config or TrainConfig()
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an ernie-lab model (a torch nn.Module), got {type(model).__name__}.")
        if not any(p.requires_grad for p in model.parameters()):
            raise InputError("nothing to train: every parameter of the model is frozen (apply_lora to train "
                             "adapters, or requires_grad_(True) for full training).")
        if config.out_dir and Path(config.out_dir).exists() and not Path(config.out_dir).is_dir():
            raise ConfigError(f"out_dir {config.out_dir} is a file; checkpoints need a folder.")
        check_parts(model, config)
        if objective is not None and not isinstance(objective, Objective):
            raise InputError(f"objective must be an Objective, got {type(objective).__name__}.")
        if not callable(train_data):
            raise InputError("train_data must be a callable (index, rank, world_size) -> batch dict; "
                             "wrap a list of batches with ernie_lab.train.from_batches(batches).")
        if config.eval_every and not callable(eval_data):
            raise InputError("eval_every is set: pass eval_data, a callable i -> batch dict.")
        if (config.balance or config.z_loss or config.orthogonal) and not moe_blocks(model):
            raise ConfigError("balance, z_loss and orthogonal weigh router losses: this model has no MoE layer.")
        self.train_data, self.eval_data = train_data, eval_data
        self.objective = objective or Objective("lm_loss", lambda batch: target_count(batch["labels"],
                                                config.token_balanced), self.language_modelling)
        self.procs = join_processes()
        if self.procs.world_size > 1 and torch.cuda.is_available():
            model = model.to(f"cuda:{self.procs.local_rank}")
        if config.parallel == "fsdp":
            fsdp.prepare(model, self.procs.world_size)       # before the optimizer: it steps the shards
        self.model = model                                   # the plain (or sharded) module: saved, evaluated
        self.device = next(model.parameters()).device
        parts = tuple(sorted({*config.lr_scale, *config.frozen_steps}, key=len, reverse=True))  # longest prefix wins
        self.optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay, parts), lr=config.lr,
                                           betas=config.betas, eps=config.eps)
        self.step = 0                                        # updates done
        self.history: list[dict] = []
        self.ddp = self._wrap(model) if self.procs.world_size > 1 and config.parallel == "ddp" else None
        torch.manual_seed(config.seed + self.procs.rank)
        if config.resume_from:
            found = latest_checkpoint(config.out_dir) if config.resume_from == "latest" else config.resume_from
            if found is not None:
                self.resume(found)

    def _wrap(self, model: nn.Module) -> nn.parallel.DistributedDataParallel:
        unused = self.config.find_unused_parameters
        unused = bool(moe_blocks(model)) if unused is None else unused
        device_ids = [self.procs.local_rank] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)

    # ---------------------------------------------------------------------------- the loop
    def fit(self) -> list[dict]:
        """Train until ``max_steps`` updates are done; returns the history (also ``self.history``)."""
        from tqdm.auto import tqdm

        c = self.config
        bar = tqdm(total=c.max_steps, initial=self.step, desc="train", disable=not (c.progress and self.procs.is_main))
        window_tokens, window_seconds = 0, 0.0  # since the last history entry
        self.model.train()
        while self.step < c.max_steps:
            started = time.perf_counter()
            record, tokens = self.train_step()
            window_tokens, window_seconds = window_tokens + tokens, window_seconds + time.perf_counter() - started
            self.step += 1
            bar.update(1)
            last = self.step == c.max_steps
            if self.step % c.log_every == 0 or last:
                record.update(step=self.step, tokens_per_s=window_tokens / max(window_seconds, 1e-9))
                self.history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                window_tokens, window_seconds = 0, 0.0
            if c.eval_every and (self.step % c.eval_every == 0 or last):
                self.history.append({"step": self.step, "eval_loss": self.evaluate()})
            if self._checkpoint_due(last):
                self.save_checkpoint()
        bar.close()
        return self.history

    def train_step(self) -> tuple[dict, int]:
        """One update over grad_accum_steps micro-batches (weighted as in the module docstring): forward,
        loss, backward, clip, AdamW at this update's learning rate. Returns its history entry and the
        input tokens of all ranks."""
        c, A, world, objective = self.config, self.config.grad_accum_steps, self.procs.world_size, self.objective
        batches = [self._batch(self.step * A + i) for i in range(A)]
        counts = [objective.count(b) for b in batches]
        total, tokens = self._sum([sum(counts), sum(input_tokens(b) for b in batches)])
        if total == 0:
            raise InputError(f"step {self.step}: no batch on any rank has a target (every label is -100).")
        for group in self.optimizer.param_groups:                                  # the schedule
            group["lr"] = part_learning_rate(self.step, group.get("part", ""), c)
        sums: dict[str, float] = {}
        for i, (batch, n) in enumerate(zip(batches, counts)):
            with self._sync_gradients(i == A - 1):                                 # DDP reduces on the last
                with self._autocast():
                    loss, terms = objective.loss(self.ddp or self.model, batch, n)  # forward
                routing = sum(getattr(c, name) * value for name, value in terms.items() if name in WEIGHTED)
                (loss * (world * n / total) + routing / A).backward()              # backward
            sums[objective.name] = sums.get(objective.name, 0.0) + loss.item() * n / total  # this rank's share
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + torch.as_tensor(value).item() / (A * world)
        record = dict(zip(sums, self._sum(list(sums.values()))))                  # summed over ranks
        if c.orthogonal:
            record["orthogonal"] = self._add_orthogonal_gradient().item()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        record["loss"] = record[objective.name] + sum(getattr(c, name) * record[name] for name in WEIGHTED
                                                      if name in record)
        self._stop_if_not_finite(record, float(grad_norm))                         # before the weights change
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        record.update(lr=learning_rate(self.step, c), grad_norm=float(grad_norm))
        return record, int(tokens)

    def _stop_if_not_finite(self, record: dict, grad_norm: float) -> None:
        """A NaN / Inf loss or gradient norm stops the run before the update: the weights, the optimizer and
        every checkpoint stay those of the last good step (a NaN would spread into every weight)."""
        bad = {name: value for name, value in {**record, "grad_norm": grad_norm}.items()
               if isinstance(value, float) and not math.isfinite(value)}
        if not bad:
            return
        self.optimizer.zero_grad(set_to_none=True)
        c, step = self.config, self.step + 1
        last = latest_checkpoint(c.out_dir) if c.out_dir else None
        raise TrainingDiverged(
            f"step {step}: " + ", ".join(f"{name} is {value}" for name, value in bad.items())
            + f"; training stopped before update {step}, so the weights and optimizer are those after step {self.step}"
            + (f" (last checkpoint: {last})" if last else "") + ". Lower lr (now "
            f"{learning_rate(self.step, c):.3g}), keep max_grad_norm on, use more warm-up, or look for NaN / Inf in "
            f"the model's weights or in the batches of step {step} (train_data indices "
            f"{self.step * c.grad_accum_steps} .. {step * c.grad_accum_steps - 1}).")

    def language_modelling(self, model: nn.Module, batch: Batch, n: int) -> tuple[torch.Tensor, dict]:
        """The default objective's loss: LM loss and routing-loss terms of one micro-batch (n: its target
        count; 0 gives an LM of 0, with the graph DDP expects)."""
        c = self.config
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        want_router = bool(c.balance or c.z_loss)
        only = c.logits_for_labels_only and not c.token_balanced and n > 0
        extra = {"logits_for_labels_only": True} if only else {}
        out = model(**inputs, labels=batch["labels"] if n else None, output_router_logits=want_router, **extra)
        lm = lm_loss(out, batch["labels"], c.token_balanced) if n else out.logits.sum() * 0.0
        terms = routing_losses(self.model, out, batch, c) if want_router else {}
        return lm, terms

    def _add_orthogonal_gradient(self) -> torch.Tensor:
        """Add c_orth d L_orth / d W to every router's gradient, by hand: L_orth depends on the weights
        alone (the same on every rank), and autograd.grad leaves DDP's gradient hooks out of it. Under FSDP
        a router's weight is a shard: the loss sees it gathered whole, and each rank keeps its slice of the gradient."""
        weights = [router.weight for block in moe_blocks(self.model) for router in block.routers
                   if router.weight.requires_grad]
        orth = sum(losses.router_orthogonal_loss(w.full_tensor() if hasattr(w, "full_tensor") else w)
                   for w in weights)
        for weight, grad in zip(weights, torch.autograd.grad(self.config.orthogonal * orth, weights)):
            weight.grad = grad if weight.grad is None else weight.grad + grad
        return orth.detach()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.autocast == "bf16")

    def _sync_gradients(self, sync: bool):
        """DDP and FSDP reduce gradients only on the last micro-batch of a step (no_sync on the others)."""
        if fsdp.is_sharded(self.model):
            fsdp.gradient_sync(self.model, sync)
        return self.ddp.no_sync() if self.ddp is not None and not sync else nullcontext()

    def _batch(self, index: int) -> Batch:
        where = f"train_data({index}, {self.procs.rank}, {self.procs.world_size})"
        batch = with_labels(self.train_data(index, self.procs.rank, self.procs.world_size), where)
        check_batch(batch, where, vocab_size(self.model))
        fsdp.check_batch(self.model, batch, where)
        return to_device(batch, self.device)

    def _sum(self, values: list[float]) -> list[float]:
        """Sum numbers over ranks (the numbers themselves in one process)."""
        if self.procs.world_size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    # ---------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        """The LM loss (as in training) over eval_data(0 .. eval_batches-1), split over ranks, weighted
        by target counts: the loss of all evaluation batches taken as one. Under FSDP every forward is a
        collective, so each rank runs as many (a rank short of batches reruns batch 0 with weight 0)."""
        c, procs = self.config, self.procs
        weighted, total = 0.0, 0
        sharded = fsdp.is_sharded(self.model)
        rounds = -(-c.eval_batches // procs.world_size) * procs.world_size if sharded else c.eval_batches
        self.model.eval()
        for i in range(procs.rank, rounds, procs.world_size):
            spare = i >= c.eval_batches                            # FSDP's extra forward, not counted
            batch = with_labels(self.eval_data(0 if spare else i), f"eval_data({0 if spare else i})")
            check_batch(batch, f"eval_data({i})", vocab_size(self.model))
            batch = to_device(batch, self.device)
            n = 0 if spare else target_count(batch["labels"], c.token_balanced)
            if n == 0 and not sharded:
                continue
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            with self._autocast():
                out = self.model(**inputs, labels=batch["labels"])
                if n:
                    weighted, total = weighted + float(lm_loss(out, batch["labels"], c.token_balanced)) * n, total + n
        self.model.train()
        weighted, total = self._sum([weighted, total])
        return weighted / total if total else float("nan")

    # ---------------------------------------------------------------------------- checkpoints
    def _checkpoint_due(self, last: bool) -> bool:
        c = self.config
        periodic = c.checkpoint_every and (self.step % c.checkpoint_every == 0 or last)
        return bool(periodic or self.step in c.keep_checkpoints_at)

    def state_dict(self, with_optimizer: bool = True) -> dict:
        """What resuming needs besides the weights: plain tensors, numbers, strings, lists and dicts (a
        sharded checkpoint keeps the optimizer in its shards: ``with_optimizer=False``)."""
        config = {key: (list(v) if isinstance(v, tuple) else v) for key, v in asdict(self.config).items()}
        optimizer = {"optimizer": self.optimizer.state_dict()} if with_optimizer else {}
        return {"step": self.step, **optimizer, "history": self.history, "rng": rng_state(), "config": config}

    def load_state_dict(self, state: dict, where: str = "the trainer state") -> None:
        """The inverse of :meth:`state_dict` (the weights are the caller's); checked whole before any of it is used."""
        self.check_state(state, where)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = int(state["step"]), list(state["history"])
        restore_rng(state["rng"])

    def check_state(self, state, where: str) -> None:
        """A CheckpointError naming ``where`` unless ``state`` fits this Trainer: its keys, its optimizer's
        groups (same number, same parameter counts and shapes) and the settings a resume must keep. A
        sharded checkpoint's state has no optimizer (its shards do: ``fsdp.read_sharded`` checks them)."""
        sharded = isinstance(state, dict) and state.get("sharded") is True
        needed = {"step", "history", "rng"} | (set() if sharded else {"optimizer"})
        if not isinstance(state, dict) or not needed <= set(state):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"{where} is not a trainer state (it holds {keys}, not step, optimizer, history "
                                  "and rng); pass a step-N folder written by Trainer.save_checkpoint.")
        optimizer, rng = state.get("optimizer", {"state": {}, "param_groups": []}), state["rng"]
        if (not isinstance(state["step"], int) or state["step"] < 0 or not isinstance(state["history"], list)
                or not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer)
                or not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or "python" not in rng):
            raise CheckpointError(f"{where} is damaged (its step, history, optimizer or rng entry is not what "
                                  "Trainer.save_checkpoint writes); resume from an earlier checkpoint.")
        try:
            random.Random().setstate(_as_tuple(rng["python"]))           # a dry run: nothing of ours changes
            usable = rng["torch"].dtype == torch.uint8 and rng["torch"].shape == torch.get_rng_state().shape
        except (TypeError, ValueError):
            usable = False
        if not usable:
            raise CheckpointError(f"{where}: its random number generator states are damaged; resume from an "
                                  "earlier checkpoint.")
        if not sharded:
            self._check_optimizer_state(optimizer, where)
        self._check_settings(state.get("config"), where)

    def _check_optimizer_state(self, optimizer: dict, where: str) -> None:
        saved_groups, groups = optimizer["param_groups"], self.optimizer.param_groups
        sizes = [len(g.get("params", ())) for g in saved_groups], [len(g["params"]) for g in groups]
        if sizes[0] != sizes[1]:
            raise CheckpointError(f"{where}: its optimizer has parameter groups of {sizes[0]} tensors, this Trainer's "
                                  f"{sizes[1]}: the checkpoint is of a different model, or was trained with other trainable parameters or other "
                                  "lr_scale / frozen_steps parts.")
        index = {id_: p for g_saved, g in zip(saved_groups, groups) for id_, p in zip(g_saved["params"], g["params"])}
        for id_, entry in optimizer["state"].items():
            param = index.get(id_)
            moments = [v for k, v in entry.items() if k in ("exp_avg", "exp_avg_sq")] if isinstance(entry, dict) else []
            if param is None or any(not isinstance(m, torch.Tensor) or m.shape != param.shape for m in moments):
                raise CheckpointError(f"{where}: its optimizer state does not fit this model's trainable parameters "
                                      f"(tensor {id_}); resume into the model the checkpoint was trained on.")

    def _check_settings(self, saved, where: str) -> None:
        if isinstance(saved, dict):
            ours = {key: (list(v) if isinstance(v, tuple) else v) for key, v in asdict(self.config).items()}
            changed = [key for key in RESUME_MUST_MATCH if key in saved and saved[key] != ours[key]]
            if changed:
                raise CheckpointError(
                    f"{where} was trained with " + ", ".join(f"{key}={saved[key]!r}" for key in changed)
                    + "; this Trainer has " + ", ".join(f"{key}={ours[key]!r}" for key in changed)
                    + ". A resume with other settings would not continue the same curve: use the checkpoint's "
                    "settings (max_steps, logging, evaluation and checkpointing may change), or start a new run "
                    "from its weights (ernie_lab.load_model) without resume.")

    def read_state(self, folder: Path, check: bool = True) -> dict:
        """trainer_state.pt of a checkpoint folder, read safely and (``check``) checked against this Trainer."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder; pass a step-N folder written by Trainer (out_dir/step-N).")
        path = folder / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"{folder} has no {STATE_FILE}: pass a step-N folder written by Trainer "
                                  "(a plain model folder loads with ernie_lab.load_model instead).")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated (EOFError, RuntimeError), garbled (UnpicklingError), unreadable
            raise CheckpointError(f"{path} is truncated or damaged ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''}); resume from an earlier "
                                  f"checkpoint in {folder.parent}.") from None
        if check:
            self.check_state(state, str(path))
        return state

    def save_checkpoint(self) -> Path:
        """Write out_dir/step-N (the weights + trainer_state.pt) in one atomic folder write; rank 0 only.
        With ``parallel="fsdp"``: every rank writes its shards of the weights and the optimizer (fsdp.py)."""
        if not self.config.out_dir:
            raise ConfigError("save_checkpoint needs a folder: set TrainConfig(out_dir=...).")
        out_dir = Path(self.config.out_dir)
        folder = out_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        if self.config.parallel == "fsdp":
            state = {**self.state_dict(with_optimizer=False), "sharded": True}
            fsdp.write_sharded(folder, self.model, self.optimizer, {STATE_FILE: state}, is_main=self.procs.is_main)
            if self.procs.is_main:
                self._prune(out_dir)
        elif self.procs.is_main:
            with atomic_folder(folder) as staging:  # a kill leaves the previous step-N, if any, as it was
                self.write_weights(staging)
                torch.save(self.state_dict(), staging / STATE_FILE)
            self._prune(out_dir)
        if self.procs.world_size > 1:
            dist.barrier()
        return folder

    def write_weights(self, folder: Path) -> None:
        """The weights of a checkpoint: the model in the Hub layout (FineTuner: a LoRA model's adapter)."""
        write_model(self.model, folder)

    def _prune(self, out_dir: Path) -> None:
        """Keep the newest keep_last periodic checkpoints and every one in keep_checkpoints_at."""
        if not self.config.keep_last:
            return
        periodic = [p for step, p in checkpoints(out_dir) if step not in self.config.keep_checkpoints_at]
        for old in periodic[:-self.config.keep_last]:
            shutil.rmtree(old)

    def resume(self, folder: str | os.PathLike) -> "Trainer":
        """Continue from a checkpoint folder: weights, optimizer state, step, history and RNG states.

        Everything is read and checked before anything changes: a damaged state file, a checkpoint of
        another model, or changed settings (``RESUME_MUST_MATCH``: lr, lr_scale, warm-up, ...) are refused
        with this Trainer as it was. ``max_steps`` may differ (the cosine then follows the new one)."""
        if not isinstance(folder, (str, os.PathLike)):
            raise InputError(f"resume needs a checkpoint folder path (out_dir/step-N), got {type(folder).__name__}.")
        folder = Path(folder)
        state = self.read_state(folder, check=False)
        if fsdp.is_sharded_checkpoint(folder):                # written with parallel="fsdp", on any number of ranks
            self.check_state(state, str(folder / STATE_FILE))
            fsdp.read_sharded(folder, self.model, self.optimizer)
            self.load_state_dict(state, str(folder / STATE_FILE))
            return self
        if fsdp.is_sharded(self.model):
            raise CheckpointError(f"{folder} is a whole-model checkpoint (written with parallel='ddp'); this Trainer's "
                                  "model is sharded (parallel='fsdp'). Resume it with parallel='ddp', or start a new "
                                  "FSDP run from its weights (ernie_lab.load_model, without resume).")
        saved = load_model(folder).state_dict()
        ours = self.model.state_dict()
        wrong = sorted(set(saved) ^ set(ours)) or [k for k in ours if saved[k].shape != ours[k].shape]
        if wrong:
            raise CheckpointError(f"{folder} holds a different model than this Trainer's (e.g. tensor {wrong[0]!r}: "
                                  f"{tuple(saved[wrong[0]].shape) if wrong[0] in saved else 'missing'} in the "
                                  f"checkpoint, {tuple(ours[wrong[0]].shape) if wrong[0] in ours else 'missing'} "
                                  "here); resume into the model it was trained on.")
        self.check_state(state, str(folder / STATE_FILE))
        self.model.load_state_dict(saved)
        self.load_state_dict(state, str(folder / STATE_FILE))
        return self


def rng_state() -> dict:
    """The random number generators' states (torch, Python's, CUDA's), for a resume to continue them."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back what :func:`rng_state` captured (CUDA's where this machine has CUDA)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    """random.getstate() comes back from torch.load with lists where tuples were."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of the finished checkpoints in out_dir, oldest first."""
    out_dir = Path(out_dir)
    found = []
    for path in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if out_dir.is_dir() else []:
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest step-N folder in out_dir, or None."""
    found = checkpoints(out_dir)
    return found[-1][1] if found else None


def train(model: nn.Module, train_data: TrainData, config: TrainConfig | None = None,
          eval_data: EvalData | None = None) -> list[dict]:
    """``Trainer(model, train_data, config, eval_data).fit()`` in one call; returns the history."""
    return Trainer(model, train_data, config, eval_data).fit()
