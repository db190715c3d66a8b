"""Solutions to notebook 06's exercises, with the reasoning behind each step and the mistakes to avoid.

SOLUTIONS maps an exercise to its answers; WRONG lists plausible wrong answers (tests/test_exercises.py
checks that every one of them fails, and that the judge names the mistake where a "says" phrase is given).
"""

import torch


def _parts(table):
    """p(x, y), and I(A; B), H(A), H(B) in nats.

    * Probabilities are counts over the total: p(x, y) = n_xy / n; the marginals are its row and column sums.
    * An empty cell contributes nothing: p log p -> 0 as p -> 0. Computing log 0 gives -inf, and 0 * -inf is
      NaN, so the sums run over the non-zero cells only (an expert nobody chose is an empty row).
    """
    joint = table.double() / table.sum()                             # (A, B)
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)  # (A, 1), (1, B)
    cells = joint > 0
    mi = (joint[cells] * (joint[cells] / (pa @ pb)[cells]).log()).sum()

    def entropy(p):
        p = p[p > 0]
        return -(p * p.log()).sum()
    return mi, entropy(pa), entropy(pb)


def nmi(table):
    """NMI = 2 I(A; B) / (H(A) + H(B)): the mutual information divided by the mean of the two entropies, so
    that it is 1 when each variable determines the other and 0 when they are independent. I alone has no
    fixed scale (it grows with the number of experts and labels): numbers of different layers or models
    could not be compared."""
    mi, ha, hb = _parts(table)
    return 2 * mi / (ha + hb)


SOLUTIONS = {"06.nmi": (nmi,)}
WRONG = {"06.nmi": [{"answers": (lambda t: _parts(t)[0],), "says": "normalise it by the mean entropy"},
                    {"answers": (lambda t: _parts(t)[0] / _parts(t)[2],), "says": "not by one of them"},
                    (lambda t: torch.nan_to_num(nmi(t + 0.5)),),
                    (lambda t: nmi(t).item(),)]}
