"""Fine-tuning on conversations: supervised fine-tuning with prompt masking, and DPO.

**SFT.** A conversation is rendered with ERNIE's chat format and trained with the ordinary next-token
loss, but only on the assistant's tokens: the prompt is given, not learnt. Each label of a prompt
token is -100 (``IGNORE_INDEX``), which the loss skips::

    <|begin_of_sentence|>User: What colour is the circle?\\nAssistant: rosso.<|end_of_sentence|>
    -100 ...................................................... rosso .  <|end_of_sentence|>

Conversations of different lengths are right-padded into one batch; the attention mask hides the
padding and its labels are -100 too. Batches are functions of the step, ``batches(step, rank,
world_size) -> dict`` (input_ids, labels, attention_mask, and pixel_values / image_grid_thw for the VL
model), the data protocol of the kit's training loop.

**DPO** (Rafailov et al., 2023) learns from pairs of answers to one prompt, a chosen one y_w and a
rejected one y_l, without a reward model. With log pi(y | x) the summed log-probability of an answer's
tokens under the model being trained and log pi_ref under the frozen starting model::

    reward(y)  = beta * (log pi(y | x) - log pi_ref(y | x))       how much more likely training made y
    loss       = -log sigmoid(reward(y_w) - reward(y_l))           push the margin up

The reference is the *same* model with its LoRA adapters switched off (``lora.adapters_disabled``), so
no second copy is held; for full-weight DPO the reference log-probabilities are computed once, before
training, and carried in the batch (``add_reference_logps``). We log the reward margin and the
accuracy (the share of pairs whose chosen answer has the higher reward).

**One loop.** Both run on the kit's training step, ``ernie_lab.train.Trainer``, with its schedule
(``train.learning_rate``: warm-up, then cosine), gradient accumulation and clipping. SFT uses the Trainer's
own objective, the LM loss (under torchrun too, with evaluation and ``logits_for_labels_only``: the LM head
only at the few labelled tokens). DPO plugs in another :class:`~ernie_lab.train.trainer.Objective`
(:func:`dpo_objective`): a mean over *pairs* rather than target tokens (so micro-batches weigh by their
pairs), a pair's two sequences in one micro-batch, a second, gradient-free forward of the reference, and
its own logged metrics (margin, accuracy); it runs in one process. :func:`sft` and :func:`dpo` are the
entry points from conversations and pairs, :func:`train_steps` the same from a ``batches`` callable;
:class:`FineTuner` is the Trainer whose checkpoints of a LoRA model are adapters
(``step-N/adapter_model.safetensors`` + ``trainer_state.pt``, a few hundred kB instead of the whole model).

**Data is checked before training**, each problem named by its index (``conversations[3]: message 1 has no
'content'``, ``pairs[5] has no 'rejected'``): a conversation is a list of messages or a record with a
``"messages"`` list (the records ``finetune_data.instruction_set()`` returns are taken as they are); it ends
with an assistant reply, and no reply is empty (an empty answer would only teach the model to stop). A
preference pair whose chosen and rejected replies are the same tokens is refused (it teaches nothing);
its prompt may be one str (a user turn). Empty datasets, batch sizes < 1 and beta <= 0 are refused.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, require_int
from ..model.decoder import IGNORE_INDEX
from ..model.special_tokens import END_OF_SENTENCE
from .trainer import STATE_FILE, Objective, TrainConfig, Trainer


# ======================================================================================== SFT data
def check_model(model, where: str) -> None:
    """An InputError unless ``model`` is an ernie-lab model (sft(model, tokenizer, ...): a swapped pair is common)."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise InputError(f"{where}: the first argument must be the model (ernie_lab.load_model(...)), got "
                         f"{type(model).__name__}; the order is {where}(model, tokenizer, ...).")


def check_tokenizer(tokenizer, where: str) -> None:
    if not all(callable(getattr(tokenizer, name, None)) for name in ("encode", "decode", "apply_chat_template")):
        raise InputError(f"{where}: tokenizer must be a tokenizer (ernie_lab.load_tokenizer(...)), got "
                         f"{type(tokenizer).__name__}; the order is {where}(model, tokenizer, ...).")


def conversation_messages(conversation, where: str = "the conversation", pictures: bool = False) -> list[dict]:
    """The messages of one training conversation, checked: a list of messages, or a record with a
    ``"messages"`` list (what ``finetune_data.instruction_set()`` returns), ending with a non-empty
    assistant reply; every assistant reply a non-empty str."""
    from ..io.chat_format import check_messages

    if isinstance(conversation, dict) and "messages" in conversation:
        conversation = conversation["messages"]
    elif isinstance(conversation, dict):
        raise InputError(f"{where} is a dict with keys {sorted(conversation)}; give a list of messages "
                         "[{'role': ..., 'content': ...}, ...] or a record with a 'messages' list.")
    try:
        check_messages(conversation, pictures=pictures)
    except InputError as err:
        raise InputError(f"{where}: {err}") from None
    if not conversation or conversation[-1]["role"] != "assistant":
        raise InputError(f"{where}: a training conversation must end with an assistant message (the reply to "
                         "learn).")
    for n, message in enumerate(conversation):
        if message["role"] == "assistant":
            if not isinstance(message["content"], str):
                raise InputError(f"{where}: message {n} (assistant) must have str content, got "
                                 f"{type(message['content']).__name__}.")
            if not message["content"].strip():
                raise InputError(f"{where}: message {n} (assistant) is empty; an empty answer would only teach the "
                                 "model to stop at once. Give the reply, or leave the example out.")
    return list(conversation)


def conversation_list(conversations, name: str = "conversations") -> list:
    """``conversations`` checked as a non-empty list of conversations (not one conversation's messages)."""
    if isinstance(conversations, (str, dict)) or not isinstance(conversations, (list, tuple)):
        raise InputError(f"{name} must be a list of conversations (each a list of messages, or a record with "
                         f"'messages'), got {type(conversations).__name__}.")
    if not conversations:
        raise InputError(f"{name} is empty; fine-tuning needs at least one conversation.")
    if isinstance(conversations[0], dict) and "role" in conversations[0]:
        raise InputError(f"{name} is one conversation's messages, not a list of conversations: wrap it, "
                         f"[messages].")
    return list(conversations)


def conversation_example(tokenizer, messages: list[dict], processor=None, where: str = "the conversation") -> dict:
    """``{"ids", "labels"}`` of one conversation; labels only on assistant replies (and their end token).

    Text models render with ``tokenizer.apply_chat_template``. With a ``processor`` (``VLProcessor``) the
    first user message may hold pictures: it is rendered by the processor (pixels and one placeholder id
    per vision token), later turns in the same text format.
    """
    messages = conversation_messages(messages, where, pictures=processor is not None)
    end = tokenizer.special_tokens[END_OF_SENTENCE]
    ids: list[int] = []
    labels: list[int] = []
    example: dict = {}
    rendered = ""  # the text of the turns already tokenized
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if processor is not None and not ids:
            prompt = processor(messages[:k])
            ids += prompt["input_ids"][0].tolist()
            example.update({key: v for key, v in prompt.items() if key != "input_ids"})
        else:
            text = _render(tokenizer, processor, messages[:k], add_generation_prompt=True)
            if not text.startswith(rendered):
                raise InputError("the chat format does not render this conversation turn by turn; "
                                 "check the messages' roles.")
            ids += tokenizer.encode(text[len(rendered):])
        labels += [IGNORE_INDEX] * (len(ids) - len(labels))
        reply = tokenizer.encode(message["content"]) + [end]
        ids += reply
        labels += reply
        rendered = _render(tokenizer, processor, messages[:k + 1], add_generation_prompt=False)
    return {"ids": ids, "labels": labels, **example}


def _render(tokenizer, processor, messages, add_generation_prompt: bool) -> str:
    if processor is not None:
        return processor.render(messages, add_generation_prompt=add_generation_prompt)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad examples into one batch: padding masked out of attention and loss; pixels concatenated."""
    width = max(len(e["ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id)                       # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX)                    # (B, T)
    attention_mask = torch.zeros(len(examples), width, dtype=torch.long)         # (B, T) 1 = real token
    for row, e in enumerate(examples):
        n = len(e["ids"])
        input_ids[row, :n] = torch.tensor(e["ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if "pixel_values" in examples[0]:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in examples])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in examples])
    return batch


def sft_batches(tokenizer, conversations: list[list[dict]], batch_size: int = 16, processor=None, seed: int = 0):
    """``batches(step, rank=0, world_size=1)`` over ``conversations``, reshuffled each epoch (by seed and
    epoch), each rank taking its own slice of the step's examples."""
    check_tokenizer(tokenizer, "sft")
    conversations = conversation_list(conversations)
    require_int("batch_size", batch_size, 1)
    require_int("seed", seed)
    examples = [conversation_example(tokenizer, c, processor, f"conversations[{i}]")
                for i, c in enumerate(conversations)]
    pad = tokenizer.pad_token_id or 0

    def batches(step: int, rank: int = 0, world_size: int = 1) -> dict:
        per_step = batch_size * world_size
        start = step * per_step
        picked = []
        for i in range(start + rank * batch_size, start + (rank + 1) * batch_size):
            epoch, offset = divmod(i, len(examples))
            order = list(range(len(examples)))
            random.Random(seed * 7919 + epoch).shuffle(order)
            picked.append(examples[order[offset]])
        return collate(picked, pad)

    return batches


# ======================================================================================== SFT on the Trainer
def sft_config(**overrides) -> TrainConfig:
    """The Trainer's config with fine-tuning defaults: ERNIEKit's SFT-LoRA learning rate 3e-4, no weight
    decay (a LoRA starts at B = 0; decay would pull the update back), the LM head only where a label is,
    no progress bar. Any TrainConfig field can be overridden."""
    settings = dict(lr=3e-4, weight_decay=0.0, warmup_steps=0, max_steps=100, logits_for_labels_only=True,
                    progress=False)
    return TrainConfig(**{**settings, **overrides})


class FineTuner(Trainer):
    """The kit's Trainer; a model with LoRA layers checkpoints its adapter (peft format) instead of
    the whole model: ``out_dir/step-N/{adapter_config.json, adapter_model.safetensors, trainer_state.pt}``."""

    def write_weights(self, folder: Path) -> None:
        from .lora import lora_layers, write_adapter

        if not lora_layers(self.model):
            return super().write_weights(folder)
        write_adapter(self.model, folder)                # into the Trainer's atomic folder, beside the state

    def resume(self, folder) -> "FineTuner":
        """Continue from ``step-N``: the adapter (or, for a model without LoRA layers, the whole model),
        optimizer, step, history and RNG; all read and checked before anything changes."""
        from .lora import ADAPTER_CONFIG, load_adapter

        folder = Path(folder)
        if not (folder / ADAPTER_CONFIG).is_file():
            return super().resume(folder)
        state = self.read_state(folder)                  # checked against this Trainer before the adapter loads
        load_adapter(self.model, folder)                 # all or nothing
        self.load_state_dict(state, str(folder / STATE_FILE))
        return self


def sft(model, tokenizer, conversations: list[list[dict]], config: TrainConfig | None = None, *,
        batch_size: int = 16, processor=None, eval_conversations: list[list[dict]] | None = None,
        seed: int = 0) -> list[dict]:
    """Supervised fine-tuning of ``model`` (LoRA or full weights) on chat conversations, prompt-masked,
    on the kit's Trainer. ``config``: :func:`sft_config` by default; with ``eval_conversations`` and
    ``config.eval_every`` the held-out loss is logged too. Returns the Trainer's history."""
    if config is not None and not isinstance(config, TrainConfig):
        config = TrainConfig(**config) if isinstance(config, dict) else config
        if not isinstance(config, TrainConfig):
            raise InputError(f"config must be a TrainConfig (sft_config(...)), got {type(config).__name__}.")
    check_model(model, "sft")
    data = sft_batches(tokenizer, conversations, batch_size, processor, seed)
    config = config or sft_config()
    eval_data = None
    if eval_conversations:
        eval_conversations = conversation_list(eval_conversations, "eval_conversations")
        held_out = sft_batches(tokenizer, eval_conversations, batch_size, processor, seed)
        eval_data = lambda i: held_out(i)  # noqa: E731  (i -> batch)
        if not config.eval_every:
            config = TrainConfig(**{**config.__dict__, "eval_every": config.max_steps,
                                    "eval_batches": max(1, len(eval_conversations) // batch_size)})
    model.train()
    history = FineTuner(model, data, config, eval_data).fit()
    model.eval()
    return history


# ======================================================================================== DPO
def pair_examples(tokenizer, prompt: list[dict], chosen: str, rejected: str, processor=None,
                  where: str = "the pair") -> tuple[dict, dict]:
    """(chosen, rejected) examples of one preference pair: the same prompt, two replies (a str prompt is
    one user turn). Refused: a prompt that does not end with a user turn, an empty reply, and two replies
    that are the same tokens (the pair would teach nothing)."""
    if isinstance(prompt, str) and not prompt.strip():
        raise InputError(f"{where}: 'prompt' is empty; give the user turn that the chosen and rejected replies answer.")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise InputError(f"{where}: 'prompt' must be a non-empty list of messages (or one str), got {prompt!r}.")
    if isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
        raise InputError(f"{where}: 'prompt' ends with an assistant message; it must end with the user turn the "
                         "chosen and rejected replies answer.")
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(reply, str):
            raise InputError(f"{where}: '{key}' must be the reply as a str, got {type(reply).__name__}.")
    pair = []
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        pair.append(conversation_example(tokenizer, list(prompt) + [{"role": "assistant", "content": reply}],
                                         processor, f"{where} ({key})"))
    if pair[0]["ids"] == pair[1]["ids"]:
        raise InputError(f"{where}: 'chosen' and 'rejected' are the same reply ({chosen!r}); DPO learns from their "
                         "difference, so this pair teaches nothing. Leave it out or fix the rejected reply.")
    return pair[0], pair[1]


def pair_list(pairs) -> list[dict]:
    if isinstance(pairs, (str, dict)) or not isinstance(pairs, (list, tuple)):
        raise InputError(f"pairs must be a list of dicts with 'prompt', 'chosen' and 'rejected', got "
                         f"{type(pairs).__name__}.")
    if not pairs:
        raise InputError("pairs is empty; DPO needs at least one preference pair.")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            raise InputError(f"pairs[{i}] must be a dict with 'prompt', 'chosen' and 'rejected', got "
                             f"{type(pair).__name__}.")
        missing = [key for key in ("prompt", "chosen", "rejected") if key not in pair]
        if missing:
            raise InputError(f"pairs[{i}] has no {' and no '.join(map(repr, missing))}; a preference pair is "
                             "{'prompt': [messages], 'chosen': 'reply', 'rejected': 'reply'}.")
    return list(pairs)


def dpo_batches(tokenizer, pairs: list[dict], batch_size: int = 8, processor=None, seed: int = 0):
    """``batches(step, rank, world_size)`` of preference pairs (dicts with ``prompt`` messages, ``chosen``
    and ``rejected`` replies). A batch stacks the B chosen sequences, then the B rejected ones: (2B, T)."""
    check_tokenizer(tokenizer, "dpo")
    pairs = pair_list(pairs)
    require_int("batch_size", batch_size, 1)
    require_int("seed", seed)
    examples = [pair_examples(tokenizer, p["prompt"], p["chosen"], p["rejected"], processor, f"pairs[{i}]")
                for i, p in enumerate(pairs)]
    pad = tokenizer.pad_token_id or 0

    def batches(step: int, rank: int = 0, world_size: int = 1) -> dict:
        start = step * batch_size * world_size + rank * batch_size
        picked = []
        for i in range(start, start + batch_size):
            epoch, offset = divmod(i, len(examples))
            order = list(range(len(examples)))
            random.Random(seed * 7919 + epoch).shuffle(order)
            picked.append(examples[order[offset]])
        return collate([c for c, _ in picked] + [r for _, r in picked], pad)

    return batches


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """(B,) summed log-probability of each row's labelled tokens (the reply), next-token aligned."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "reference_logps")}
    logits = model(**inputs).logits[:, :-1].float()                        # (B, T-1, V) predicts token t+1
    targets = batch["labels"][:, 1:]                                       # (B, T-1)
    mask = targets != IGNORE_INDEX
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)                                    # (B,)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """The DPO loss of (B,) summed log-probs, and its metrics: rewards, margin, accuracy."""
    chosen_reward = beta * (policy_chosen - ref_chosen)                   # (B,)
    rejected_reward = beta * (policy_rejected - ref_rejected)             # (B,)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    metrics = {"reward_margin": margin.mean().item(), "accuracy": (margin > 0).float().mean().item(),
               "chosen_reward": chosen_reward.mean().item(), "rejected_reward": rejected_reward.mean().item()}
    return loss, metrics


def reference_logps(model, batch: dict) -> torch.Tensor:
    """(2B,) log-probs under the frozen reference: carried in the batch, else the model with adapters off."""
    if "reference_logps" in batch:
        return batch["reference_logps"]
    from .lora import adapters_disabled, lora_layers

    if not lora_layers(model):
        raise InputError("full-weight DPO needs the reference log-probs in the batch: wrap the batches with "
                         "add_reference_logps(model, batches) before training (or train LoRA adapters).")
    with torch.no_grad(), adapters_disabled(model):
        return sequence_logps(model, batch)


def add_reference_logps(model, batches, steps: int):
    """Full-weight DPO: compute the reference log-probs of the first ``steps`` batches now, with the
    untrained model, and return ``batches`` that carry them (the data must repeat after ``steps``)."""
    cache = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for step in range(steps):
            cache[step] = sequence_logps(model, batches(step))
    model.train(was_training)

    def with_reference(step: int, rank: int = 0, world_size: int = 1) -> dict:
        return {**batches(step, rank, world_size), "reference_logps": cache[step % steps]}

    return with_reference


def dpo_batch_loss(model, batch: dict, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """The DPO loss of one (2B, T) batch: chosen rows first, rejected after."""
    rows = batch["input_ids"].shape[0]
    if rows % 2:
        raise InputError(f"a DPO batch stacks B chosen rows, then B rejected ones; this batch has {rows} rows. "
                         "Make the batches with dpo_batches.")
    half = rows // 2
    ref = reference_logps(model, batch)
    policy = sequence_logps(model, batch)
    return dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], beta)


def check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < float("inf"):
        raise InputError(f"beta (DPO's reward scale) must be a positive number, got {beta!r}.")
    return beta


def dpo_objective(beta: float = 0.1) -> Objective:
    """DPO as the training step's objective: a mean over the batch's pairs (half its rows), logging the
    rewards, their margin and the accuracy."""
    check_beta(beta)
    return Objective("dpo_loss", count=lambda batch: batch["input_ids"].shape[0] // 2,
                     loss=lambda model, batch, n: dpo_batch_loss(model, batch, beta))


def dpo(model, tokenizer, pairs: list[dict], config: TrainConfig | None = None, *, beta: float = 0.1,
        batch_size: int = 8, processor=None, seed: int = 0) -> list[dict]:
    """DPO of ``model`` (LoRA: the reference is the model with its adapters off) on preference ``pairs``
    (:func:`dpo_batches`), on the kit's Trainer. ``config``: :func:`sft_config` by default. Returns the
    Trainer's history (``dpo_loss``, ``reward_margin``, ``accuracy``, ... per logged step)."""
    check_beta(beta)
    check_model(model, "dpo")
    check_tokenizer(tokenizer, "dpo")
    from .lora import lora_layers

    if not lora_layers(model):
        raise InputError("dpo() trains LoRA adapters (the reference is the model with them off): apply_lora(model) "
                         "first; for full-weight DPO use dpo_batches + add_reference_logps + train_steps.")
    data = dpo_batches(tokenizer, pairs, batch_size, processor, seed)
    model.train()
    history = FineTuner(model, data, config or sft_config(), objective=dpo_objective(beta)).fit()
    model.eval()
    return history


# ======================================================================================== from a batches callable
def train_steps(model, batches, steps: int, lr: float = 3e-4, *, objective: str = "sft", beta: float = 0.1,
                grad_accum: int = 1, weight_decay: float = 0.0, warmup: int = 0, log_every: int = 10,
                progress: bool = False) -> list[dict]:
    """Train for ``steps`` updates of the kit's training step on ``batches(index)`` (warm-up, then cosine
    to 0; gradient accumulation): ``objective`` "sft" (the LM loss on the labels) or "dpo"
    (:func:`dpo_objective`). Returns the log: the Trainer's history entries, ``"step"`` 0-based, with
    ``"seconds"`` since the start, every ``log_every`` steps and at the last."""
    if not any(p.requires_grad for p in model.parameters()):
        raise InputError("nothing to train: every parameter is frozen (apply_lora, or unfreeze for full fine-tuning).")
    if objective not in ("sft", "dpo"):
        raise InputError(f"objective must be 'sft' or 'dpo', got {objective!r}.")
    if not callable(batches):
        raise InputError(f"batches must be a callable index -> batch dict (sft_batches / dpo_batches), got "
                         f"{type(batches).__name__}.")
    require_int("steps", steps, 1)
    require_int("grad_accum", grad_accum, 1)
    require_int("log_every", log_every, 1)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"warmup must be an integer >= 0, got {warmup!r}.")
    config = sft_config(lr=lr, max_steps=steps, grad_accum_steps=grad_accum, weight_decay=weight_decay,
                        warmup_steps=min(warmup, steps - 1), min_lr_ratio=0.0, log_every=1, progress=progress)
    step_starts = []                                              # when each update asked for its data

    def timed(index: int, rank: int = 0, world_size: int = 1) -> dict:
        if index % grad_accum == 0:
            step_starts.append(time.perf_counter())
        return batches(index, rank, world_size)

    started = time.perf_counter()
    model.train()
    history = FineTuner(model, timed, config, objective=dpo_objective(beta) if objective == "dpo" else None).fit()
    step_ends = step_starts[1:] + [time.perf_counter()]
    log = []
    for entry in history:
        step = entry["step"] - 1                                  # the Trainer counts updates done
        if step % log_every == 0 or step == steps - 1:
            log.append({**entry, "step": step, "seconds": step_ends[step] - started})
    model.eval()
    return log
