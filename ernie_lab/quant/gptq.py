"""GPTQ: quantize a weight one input column at a time, pushing each column's rounding error onto the
columns not yet quantized, weighted by how the layer's inputs correlate.

For a linear layer with inputs X (n, K), rounding W to Q costs  ||X W^T - X Q^T||^2 = tr(E H E^T),
E = W - Q, H = X^T X (the Hessian of that loss, up to a factor 2). Quantizing column j to q_j leaves
an error e = (w_j - q_j) / [H^-1]_jj that the remaining columns absorb:

    W[:, j:] -= e [H^-1]_{j, j:}              (using the Cholesky factor of H^-1, upper triangular)

Columns are processed in blocks ("lazy batch" updates: the block's accumulated errors update the rest
of W in one matmul). H is damped (H += damp * mean(diag H) * I) so it can be inverted; inputs that were
never active (zero diagonal) get weight 0. Each group's scale and zero point are chosen from the
already-updated weights when the group's first column is reached.
"""

from __future__ import annotations

import torch

from . import formats


class HessianCollector:
    """A forward pre-hook that sums X^T X over every row seen by one linear layer (float32, (K, K))."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0
        self.finite = True   # False once an input held NaN / Inf (the Hessian is then meaningless)

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (n, K)
        self.finite = self.finite and bool(torch.isfinite(x).all())
        self.H.addmm_(x.t(), x)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.H / max(self.rows, 1)


def inverse_hessian_factor(H: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, K) Hessian -> (U, dead): U the upper Cholesky factor of the damped H^-1 (H^-1 = U^T U), and the
    (K,) mask of inputs that were never active (their weights are set to 0 by the caller)."""
    H = H.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (K, K)
    return U, dead


def spread_error_(W: torch.Tensor, U: torch.Tensor, j: int, q: torch.Tensor) -> torch.Tensor:
    """GPTQ's column update, in place: column j of the (N, b) weights W takes its quantized values q (N,), and
    the columns after it absorb the error, W[:, j:] -= e U[j, j:] with e = (W[:, j] - q) / U[j, j].
    Returns e (N,), which the lazy-batch update applies to the columns beyond W."""
    err = (W[:, j] - q) / U[j, j]                                   # (N,)
    W[:, j:] -= err[:, None] * U[j, j:][None, :]                    # column j becomes exactly q
    return err


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int, group: int, symmetric: bool = True,
                  damp: float = 0.01, block: int = 128) -> formats.Quantized:
    """Quantize an (N, K) weight with the (K, K) input Hessian ``H``; returns codes, scales, zeros."""
    W = weight.detach().float().clone()                            # (N, K), updated as we go
    N, K = W.shape
    formats.check_group(K, group)
    U, dead = inverse_hessian_factor(H, damp)
    W[:, dead] = 0.0

    block = max(group, block - block % group) if group <= block else group  # blocks hold whole groups
    G = K // group
    codes = torch.zeros(N, K, dtype=torch.int8 if bits == 8 else torch.uint8, device=W.device)
    scales = torch.zeros(N, G, dtype=torch.float32, device=W.device)
    zeros = None if symmetric else torch.zeros(N, G, dtype=torch.uint8, device=W.device)
    for start in range(0, K, block):
        end = min(start + block, K)
        Wb, Ub = W[:, start:end].clone(), U[start:end, start:end]   # (N, b), (b, b)
        errors = torch.zeros_like(Wb)
        for i in range(end - start):
            col = start + i
            if col % group == 0:
                g = col // group
                s, z = formats.group_params(Wb[:, i:i + group][:, None, :], bits, symmetric)
                scales[:, g] = s[:, 0]
                if zeros is not None:
                    zeros[:, g] = z[:, 0]
            g = col // group
            s, z = scales[:, g:g + 1], None if zeros is None else zeros[:, g:g + 1]
            c = formats.encode(Wb[:, i:i + 1, None].transpose(1, 2), s, z, bits)[:, 0]     # (N, 1)
            q = formats.decode(c[:, None], s, z, bits)[:, 0, 0]                              # (N,)
            codes[:, col] = c[:, 0]
            errors[:, i] = spread_error_(Wb, Ub, i, q)
        W[:, end:] -= errors @ U[start:end, end:]
    return formats.Quantized(codes, scales, zeros)
