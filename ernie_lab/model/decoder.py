"""The ERNIE 4.5 text decoder: embeddings, a stack of pre-norm decoder layers, a tied LM head.

    h_0 = E[ids]
    h   = h + Attention(RMSNorm(h))      # mixes information across positions
    h   = h + MLP(RMSNorm(h))            # transforms each position (SwiGLU, or MoE in MoE layers)
    logits = RMSNorm(h_L) E^T            # tied embeddings: the LM head reuses E

One decoder serves every ERNIE 4.5 model. Its layers' MLPs come from an *MLP factory*: a SwiGLU or,
where ``config.is_moe_layer(i)``, a mixture of experts (``moe.MoEBlock``); the vision-language model
(``vl_model.py``) is this decoder with a factory whose MoE blocks hold a text and a vision expert group,
a 3-D rotary function, and a vision encoder whose tokens enter as ``inputs_embeds``. The KV cache, the
training loss (``labels``) and the routers' decisions (``output_router_logits``) are options of the same
forward, so no second copy of the model exists for any of them.

    loss = cross_entropy(logits[:, :-1], labels[:, 1:])     # next-token prediction; label -100 is ignored
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, padding_mask
from .config import ErnieConfig
from ..errors import InputError
from .kv_cache import KVCache, StaticKVCache
from .mlp import SwiGLU
from .moe import MoEBlock, RouterOutput
from .norm import RMSNorm
from .rope import rope_angles


IGNORE_INDEX = -100  # labels with this value carry no loss (prompts, padding, picture placeholders)


def query_key_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weight rows that make queries and keys: every decoder ``q_proj`` / ``k_proj``, and the first
    two thirds of each fused ViT ``qkv`` (its rows are q, then k, then v)."""
    weights = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj"):
            weights.append(module.weight)
        elif isinstance(module, nn.Linear) and name.endswith("attn.qkv"):
            weights.append(module.weight[: 2 * module.weight.shape[0] // 3])
    return weights


@dataclass
class CausalLMOutput:
    logits: torch.Tensor                     # (B, T, vocab)
    cache: KVCache | None = None             # the cache passed in, now holding these T tokens too
    loss: torch.Tensor | None = None         # () mean next-token cross-entropy, when labels were given
    router_logits: list[RouterOutput] | None = None  # one per MoE layer, when output_router_logits=True


MLPFactory = Callable[[ErnieConfig, int], nn.Module]  # (decoder config, layer index) -> the layer's MLP


def make_mlp(config: ErnieConfig, layer_idx: int) -> nn.Module:
    """The feed-forward block of layer ``layer_idx`` of a text model: dense SwiGLU or mixture of experts."""
    if config.is_moe_layer(layer_idx):
        return MoEBlock(config, layer_idx)
    return SwiGLU(config.hidden_size, config.intermediate_size, config.use_bias)


class DecoderLayer(nn.Module):
    def __init__(self, config: ErnieConfig, layer_idx: int, mlp_factory: MLPFactory = make_mlp):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp_factory(config, layer_idx)

    def forward(self, x, rope, mask=None, cache=None, modality=None, router_logits: list | None = None):
        """(B, T, hidden) -> (B, T, hidden). An MoE layer appends its RouterOutput to ``router_logits``
        when that is a list; ``modality`` (B, T) tells an MoE layer each token's expert group."""
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        h = self.mlp_norm(x)
        if not isinstance(self.mlp, MoEBlock):
            return x + self.mlp(h)
        y, routing = self.mlp(h, modality)
        if router_logits is not None:
            router_logits.append(routing)
        return x + y


class ErnieForCausalLM(nn.Module):
    """The ERNIE 4.5 decoder: dense (0.3B) or text MoE (21B-A3B, 300B-A47B); the VL model extends it."""

    def __init__(self, config, *, mlp_factory: MLPFactory = make_mlp):
        super().__init__()
        self.config = config                      # the whole config (a VL model's holds .text and .vision)
        text = config.get_text_config()           # the decoder's part of it
        self.embed = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(text, i, mlp_factory) for i in range(text.num_hidden_layers))
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if text.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def text_config(self) -> ErnieConfig:
        return self.config.get_text_config()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations flow in (the final norm's: norms are never quantized or wrapped)."""
        return self.norm.weight.dtype

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary angles (cos, sin), each (B, T, D/2), for (B, T) positions: 1-D RoPE on interleaved pairs."""
        return rope_angles(position_ids, self.text_config.head_dim, self.text_config.rope_theta)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None,
                logits_to_keep: int = 0, *, inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_router_logits: bool = False,
                modality: torch.Tensor | None = None, logits_for_labels_only: bool = False) -> CausalLMOutput:
        """input_ids (B, T), or inputs_embeds (B, T, hidden); attention_mask (B, past + T) of 0/1;
        logits_to_keep > 0 keeps the last n; labels (B, T) aligned with the inputs (shifted here);
        modality (B, T) the expert group of each token (MoE models with several groups).
        ``logits_for_labels_only`` (training): the LM head runs only on the K positions that predict a
        label, ``logits`` is then (K, vocab) and the loss is the same; it saves most of the head's work
        when prompts, pictures and padding carry no loss."""
        text = self.text_config
        past = cache.length if cache is not None else 0
        if inputs_embeds is None:
            check_input_ids(input_ids, text, past)
            inputs_embeds = self.embed(input_ids)  # (B, T, hidden)
        B, T = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device).expand(B, T)
        mask = attention_mask_for(attention_mask, cache, T, inputs_embeds.device)
        router_logits = [] if output_router_logits else None
        h = self.run_layers(inputs_embeds, position_ids, mask, cache, modality, router_logits)
        if cache is not None:
            cache.advance(T)
        if logits_to_keep:
            if labels is not None:
                raise InputError("labels need the logits of every position: leave logits_to_keep at 0.")
            h = h[:, -logits_to_keep:]
        if logits_for_labels_only and labels is not None:
            logits, loss = self._loss_at_labels(h, labels)
        else:
            logits = self.lm_head(self.norm(h))
            loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, cache=cache, loss=loss, router_logits=router_logits)

    def run_layers(self, h: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None = None,
                   cache: KVCache | None = None, modality: torch.Tensor | None = None,
                   router_logits: list | None = None) -> torch.Tensor:
        """The stack of decoder layers, (B, T, hidden) -> (B, T, hidden), and nothing else: no checks and
        no cache bookkeeping, so a compiled decode step (``fast_decode.py``) runs exactly this code."""
        rope = self.rotary(position_ids)  # (B, T, D/2) x2
        for layer in self.layers:
            h = layer(h, rope, mask, cache, modality, router_logits)
        return h

    def _loss_at_labels(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, vocab) logits of the positions that predict a label, and their mean cross-entropy."""
        if labels.shape != h.shape[:2]:
            raise InputError(f"labels {tuple(labels.shape)} must have the (batch, tokens) shape of the inputs "
                             f"{tuple(h.shape[:2])}.")
        targets = labels[:, 1:].to(h.device)                         # (B, T-1)
        keep = targets != IGNORE_INDEX
        if not bool(keep.any()):
            raise InputError(f"every label is {IGNORE_INDEX} (ignored): there is nothing to learn from this batch.")
        logits = self.lm_head(self.norm(h[:, :-1][keep]))             # (K, vocab)
        return logits, F.cross_entropy(logits.float(), targets[keep])

    def init_weights(self, std: float = 0.02, seed: int | None = None,
                     attention_std: float | None = None) -> "ErnieForCausalLM":
        """Initialise for training from scratch; returns the model. PyTorch's defaults start the loss far
        above log(vocab): nn.Embedding draws N(0, 1), and the tied LM head multiplies by those rows again.

            Linear / Embedding weights (routers too, so experts start distinguishable) ~ N(0, std^2)
            query / key projections (decoder and ViT)                        ~ N(0, attention_std^2)
            biases, the MoE correction bias                                             = 0
            RMSNorm scales, LayerNorm scales (ViT, adapter) / shifts                   = 1 / 0

        ``attention_std`` (default ``std``) sets how sharp attention starts. On a normalised input
        (RMS 1, width h) an attention logit q . k / sqrt(d) is about std^2 h in size: 0.05 at std 0.02
        and h 128, so every head starts almost uniform, and a task that needs a head to pick *one*
        token (which picture token is the circle?) sits on a long plateau first. Query / key weights
        4x larger (logits 16x larger, about 0.8) shorten it.
        ``seed`` draws from a private CPU generator (same weights on every device); None uses torch's."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        done: set[int] = set()  # a tied head shares the embedding's weight: draw it once
        with torch.no_grad():
            for module in self.modules():
                for name, param in module.named_parameters(recurse=False):
                    if id(param) in done:
                        continue
                    done.add(id(param))
                    if isinstance(module, (nn.Linear, nn.Embedding)) and name == "weight":
                        param.copy_(torch.randn(param.shape, generator=generator) * std)
                    elif isinstance(module, (RMSNorm, nn.LayerNorm)) and name == "weight":
                        param.fill_(1.0)
                    elif name in ("bias", "e_score_correction_bias"):
                        param.zero_()
            if attention_std is not None:
                for weight in query_key_weights(self):
                    weight.mul_(attention_std / std)
        return self

    def num_parameters(self) -> int:
        """Parameters counted once (the tied LM head shares the embedding's)."""
        return sum(p.numel() for p in self.parameters())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of predicting token t + 1 from position t (labels aligned with the inputs)."""
    if labels.shape != logits.shape[:2]:
        raise InputError(f"labels {tuple(labels.shape)} must have the (batch, tokens) shape of the inputs "
                         f"{tuple(logits.shape[:2])}.")
    # shift the labels, not the logits: slicing (B, T, vocab) logits would copy them, and its backward
    # would fill a second tensor of that size (a tenth of a LoRA step at the 0.3B's 103k vocabulary)
    shifted = F.pad(labels[:, 1:].to(logits.device), (0, 1), value=ignore_index)  # (B, T): next token, or ignored
    if not bool((shifted != ignore_index).any()):
        raise InputError(f"every label is {ignore_index} (ignored): there is nothing to learn from this batch.")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                           ignore_index=ignore_index)


def attention_mask_for(attention_mask: torch.Tensor | None, cache: KVCache | None, T: int,
                       device: torch.device) -> torch.Tensor | None:
    """The bool mask attention gets: None (plain causal) without padding; (B, 1, T, past + T) with it;
    (B, 1, T, S_max) over the whole buffer of a :class:`StaticKVCache`."""
    if isinstance(cache, StaticKVCache):
        cache.reserve(T)
        return cache.mask(T, attention_mask)
    if attention_mask is not None and not bool(attention_mask.all()):
        return padding_mask(attention_mask.to(device), T)
    return None


def check_input_ids(input_ids, config: ErnieConfig, past: int = 0) -> None:
    """Reject token ids the model cannot embed, with a message that says what to do."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"input_ids must be a torch.LongTensor of shape (batch, tokens), got {type(input_ids).__name__}. "
                         "Wrap a list with torch.tensor([ids]).")
    if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}. Use .long().")
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be 2-D (batch, tokens), got shape {tuple(input_ids.shape)}. "
                         "For one prompt use ids[None] or ids.unsqueeze(0).")
    if input_ids.numel() == 0:
        raise InputError("input_ids is empty: give at least one token.")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise InputError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size}). "
                         "Was the text encoded with a different tokenizer?")
    total = past + input_ids.shape[1]
    if total > config.max_position_embeddings:
        raise InputError(f"{total} tokens ({past} cached + {input_ids.shape[1]} new) exceed the model's context of "
                         f"{config.max_position_embeddings} (max_position_embeddings). Shorten the prompt.")
