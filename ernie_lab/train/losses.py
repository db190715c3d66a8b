"""Auxiliary losses that keep a mixture of experts healthy while it trains.

Left alone, a router tends to collapse: a few experts win early, get more gradient, win more.
Three small extra terms, added to the language-model loss with small coefficients, push back:

    load balancing (Switch Transformer)  L_bal  = E * sum_e f_e P_e          (uniform routing gives k)
    router z-loss (ST-MoE)               L_z    = mean_t (logsumexp_e z_te)^2  (keeps logits small)
    router orthogonal loss (ERNIE 4.5)   L_orth = mean_ij (w_i . w_j - [i = j])^2 over unit router rows

f_e is the fraction of tokens that chose expert e (non-differentiable), P_e the mean router probability
of e (differentiable): only P carries gradient, and it is pushed down where f is high. The orthogonal
loss is ERNIE's addition: router rows pointing in different directions make experts specialise.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InputError


def _layers(router_logits) -> list[torch.Tensor]:
    """A list of per-layer (N, E) logits from one tensor, a list of tensors, or a model output's list of
    ``moe.RouterOutput`` (``out.router_logits`` with ``output_router_logits=True``)."""
    layers = [router_logits] if isinstance(router_logits, torch.Tensor) else list(router_logits)
    return [getattr(z, "logits", z) for z in layers]


def _rows(router_logits: torch.Tensor | Sequence[torch.Tensor], attention_mask: torch.Tensor | None):
    """Stack per-layer (N, E) logits into one (L*N, E) table, with a (L*N,) token mask (1 = counts)."""
    layers = _layers(router_logits)
    if not layers:
        raise InputError("router_logits is empty: pass an (N, E) tensor or a list with one per MoE layer.")
    layers = [z.reshape(-1, z.shape[-1]).float() for z in layers]  # (N, E) each; (B, T, E) is flattened
    logits = torch.cat(layers)                                      # (L*N, E)
    if attention_mask is None:
        return logits, torch.ones(logits.shape[0], device=logits.device)
    mask = attention_mask.reshape(-1).to(logits.device, torch.float32)  # (N,)
    if mask.shape[0] != layers[0].shape[0]:
        raise InputError(f"attention_mask has {mask.shape[0]} tokens but the router logits have {layers[0].shape[0]} rows.")
    return logits, mask.repeat(len(layers))


def load_balancing_loss(router_logits: torch.Tensor | Sequence[torch.Tensor], k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Switch-Transformer balancing loss over router logits (N, E), or a list of them (one per layer).

        L = E * sum_e f_e * P_e,   f_e = (1/N) sum_t [e in topk_k(p_t)],   P_e = (1/N) sum_t p_te

    with p_t = softmax(z_t). Tokens whose ``attention_mask`` is 0 are left out of both averages. A list
    of layers is pooled into one table first (as ``transformers``' ``load_balancing_loss_func`` does).
    Perfectly uniform routing gives f_e = k/E, P_e = 1/E and L = k; full collapse onto k experts gives E.
    """
    logits, mask = _rows(router_logits, attention_mask)
    E = logits.shape[-1]
    probs = logits.softmax(dim=-1)                                     # (N, E)
    chosen = probs.topk(k, dim=-1).indices                            # (N, k)
    hits = torch.zeros_like(probs).scatter(1, chosen, 1.0)            # (N, E) one-hot of the k choices
    total = mask.sum().clamp(min=1)
    f = (hits * mask[:, None]).sum(0) / total                          # (E,) fraction routed to e (sums to k)
    P = (probs * mask[:, None]).sum(0) / total                         # (E,) mean probability of e
    return E * (f * P).sum()


def router_z_loss(router_logits: torch.Tensor | Sequence[torch.Tensor],
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""ST-MoE router z-loss: the mean over tokens of the squared log-partition function.

        L_z = (1/N) sum_t ( log sum_e exp z_te )^2

    Large logits make the softmax brittle (and overflow in low precision); this keeps them near 0.
    """
    logits, mask = _rows(router_logits, attention_mask)
    log_z = logits.logsumexp(dim=-1)                                   # (N,)
    return (log_z.square() * mask).sum() / mask.sum().clamp(min=1)


def router_orthogonal_loss(router_weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    r"""ERNIE 4.5's router orthogonal loss for one router weight of shape (E, H).

        w_i <- w_i / max(||w_i||, eps)           every expert's router row made unit length
        L_orth = (1/E^2) sum_ij (w_i . w_j - [i = j])^2

    It is 0 when the E rows are orthonormal directions (needs H >= E) and grows as two experts'
    rows align, i.e. as two experts would be chosen by the same tokens.
    """
    if router_weight.dim() != 2:
        raise InputError(f"router_weight must be 2-D (num_experts, hidden), got shape {tuple(router_weight.shape)}.")
    w = router_weight.float()
    w = w / w.norm(dim=1, keepdim=True).clamp(min=eps)                 # (E, H) unit rows
    gram = w @ w.T                                                     # (E, E) cosines between rows
    eye = torch.eye(gram.shape[0], device=gram.device)
    return (gram - eye).square().mean()


# =============================================================================================
# Vision-language losses (ERNIE 4.5 VL). Multimodal batches mix samples with a few answer tokens
# after a large picture and samples with long texts; routed tokens come in two isolated groups.
# =============================================================================================
def token_balanced_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    r"""Multimodal token-balanced language-model loss: each sample's mean, then the mean over samples.

        L = (1/B') sum_b (1/|T_b|) sum_{t in T_b} -log p(y_bt | x_b<t)

    T_b are the positions of sample b that have a target (labels != ignore_index: picture placeholders,
    prompts and padding are set to ignore_index), B' the samples with at least one target. The usual
    token mean, sum_b sum_t / sum_b |T_b|, lets a sample with 500 answer tokens outweigh one with 5
    (a short caption after a big picture) a hundredfold; here every sample counts once.
    ``logits`` (B, T, V) and ``labels`` (B, T) are aligned: labels[b, t] is what logits[b, t] predicts.
    """
    if logits.shape[:2] != labels.shape:
        raise InputError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must agree on (batch, tokens).")
    per_token = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=ignore_index,
                                                  reduction="none")  # (B, T), 0 where ignored
    counts = (labels != ignore_index).sum(dim=1)                    # (B,) targets per sample
    has_targets = counts > 0
    if not bool(has_targets.any()):
        raise InputError("no sample has a target token (every label is ignore_index).")
    per_sample = per_token.sum(dim=1)[has_targets] / counts[has_targets]
    return per_sample.mean()


def modality_balancing_losses(router_logits: torch.Tensor | Sequence[torch.Tensor], modality: torch.Tensor | None,
                              k: int) -> dict[str, torch.Tensor]:
    r"""Load-balancing loss computed separately for the text group and the vision group.

        L_text   = E * sum_e f_e^text P_e^text     over the text tokens and the text experts
        L_vision = E * sum_e f_e^vis  P_e^vis      over the vision tokens and the vision experts

    (f, P as in :func:`load_balancing_loss`.) The groups share no experts, and their token counts differ
    wildly from batch to batch (one picture is hundreds of tokens), so each group is balanced over its
    own tokens. Pooling them would let a balanced group hide a collapsed one: two text tokens both on
    expert 0 next to two vision tokens split 0/1 look half-balanced pooled.
    ``router_logits``: (N, E) per MoE layer (each row from its own group's router); ``modality`` (N,) 0/1.
    ``modality`` None takes it from ``moe.RouterOutput`` entries (a model output's ``router_logits``).
    Returns {"text": ..., "vision": ...}; a group without tokens gives 0.
    """
    if modality is None:
        first = router_logits[0] if not isinstance(router_logits, torch.Tensor) else None
        if getattr(first, "modality", None) is None:
            raise InputError("modality is None: pass the (N,) modality codes, or the RouterOutput list of a model output.")
        modality = first.modality
    layers = _layers(router_logits)
    modality = modality.reshape(-1)
    losses = {}
    for name, code in (("text", 0), ("vision", 1)):
        rows = (modality == code).to(layers[0].device)
        if not bool(rows.any()):
            losses[name] = layers[0].new_zeros(())
            continue
        losses[name] = load_balancing_loss([z.reshape(-1, z.shape[-1])[rows] for z in layers], k)
    return losses
