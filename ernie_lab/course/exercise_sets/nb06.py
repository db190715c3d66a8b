"""Exercises of notebook 06 (routing by modality): the normalised mutual information behind specialisation.

The judge draws fresh count tables (experts x labels) at several shapes on every call, with the edge
cases a shortcut gets wrong: empty rows and columns (0 log 0 = 0), an expert that names its label (NMI 1),
and compares with ``analysis.routing.information``, the kit's own numbers.
"""

import torch

from ...analysis.routing import information
from ..exercises import Mismatch, call, exercise, expect_tensor, fresh_generator


def _tables(g):
    """Count tables (as float tensors): random ones with an empty row and column, and a permutation (NMI 1)."""
    tables = []
    for experts, labels in ((6, 3), (4, 5), (8, 2)):
        table = torch.randint(0, 9, (experts, labels), generator=g).float()
        table[int(torch.randint(0, experts, (1,), generator=g))] = 0            # an expert nobody chose
        table[0, 0] += 1                                                        # at least one count
        tables.append(table)
    size = int(torch.randint(2, 6, (1,), generator=g))
    permuted = torch.eye(size)[torch.randperm(size, generator=g)] * torch.randint(1, 9, (size, 1), generator=g)
    tables.append(permuted.float())                                             # each expert names one label
    return tables


def _expected(table):
    mi, ha, hb = information(table.long() if not table.is_floating_point() else table)
    return mi, ha, hb, 2 * mi / (ha + hb)


@exercise("06.nmi", hint="p(x, y) = table / table.sum(); p(x), p(y) its row and column sums; I = sum over p(x, y) > 0 "
                         "of p(x, y) log(p(x, y) / (p(x) p(y))); H = -sum p log p over p > 0; NMI = 2 I / (H(A) + H(B)), "
                         "a 0-d tensor.")
def nmi(function) -> str:
    for table in _tables(fresh_generator()):
        mi, ha, hb, expected = _expected(table)
        got = call(function, table)
        if isinstance(got, torch.Tensor) and got.shape == () and torch.isfinite(got).all():
            value = float(got)
            if abs(value - mi) < 1e-6 and abs(mi - expected) > 1e-6:
                raise Mismatch(f"you returned I(A; B) = {mi:.4f}: normalise it by the mean entropy, "
                               "2 I / (H(A) + H(B)), so that 1 means 'names it'")
            for h in (ha, hb, max(ha, hb), min(ha, hb)):
                if abs(value - mi / h) < 1e-6 and abs(mi / h - expected) > 1e-6:
                    raise Mismatch("divide by the mean of the two entropies, (H(A) + H(B)) / 2, not by one of them")
        expect_tensor(f"NMI of a {tuple(table.shape)} count table", got, torch.tensor(expected, dtype=torch.float64),
                      atol=1e-5)
    return ("0 when the expert says nothing about the label, 1 when each determines the other; "
            "the notebook's specialisation numbers are this, per layer.")
