"""Solutions to notebook 06's exercises."""

import math
from collections import Counter


def nmi(a, b):
    n = len(a)
    joint, pa, pb = Counter(zip(a, b)), Counter(a), Counter(b)
    mi = sum(c / n * math.log(c * n / (pa[x] * pb[y])) for (x, y), c in joint.items())
    entropy = lambda counts: -sum(c / n * math.log(c / n) for c in counts.values())  # noqa: E731
    return 2 * mi / (entropy(pa) + entropy(pb))


def _mi_only(a, b):
    n = len(a)
    joint, pa, pb = Counter(zip(a, b)), Counter(a), Counter(b)
    return sum(c / n * math.log(c * n / (pa[x] * pb[y])) for (x, y), c in joint.items())


def _divided_by_label_entropy(a, b):
    n = len(b)
    return _mi_only(a, b) / -sum(c / n * math.log(c / n) for c in Counter(b).values())


SOLUTIONS = {"06.nmi": (nmi,)}
WRONG = {"06.nmi": [(_mi_only,), (_divided_by_label_entropy,), (lambda a, b: float(a == b),)]}
