"""Exercises of notebook 06 (routing by modality): the normalised mutual information behind specialisation."""

import math

from ...analysis.routing import contingency, information
from ..exercises import Mismatch, as_number, call, exercise, expect_close


CASES = [
    (["V1", "V1", "V2", "V2"], ["red", "red", "blue", "blue"]),            # the expert names the colour: 1
    (["V1", "V2", "V1", "V2"], ["red", "red", "blue", "blue"]),            # independent: 0
    (["V0", "V0", "V0", "V3", "V3", "V5"], ["red", "red", "blue", "blue", "green", "green"]),
    (["V2", "V4", "V4", "V4", "V7", "V2", "V2"], ["bg", "bg", "bg", "red", "red", "bg", "green"]),
]


@exercise("06.nmi", hint="NMI(A; B) = 2 I(A; B) / (H(A) + H(B)), with I(A; B) = sum_xy p(x, y) log(p(x, y) / "
                         "(p(x) p(y))) and H(A) = -sum_x p(x) log p(x), probabilities as counts / n.")
def nmi(function) -> str:
    for experts, labels in CASES:
        mi, ha, hb = information(contingency(experts, labels))  # I(A; B), H(A), H(B) in nats
        expected = 2 * mi / (ha + hb)
        got = as_number(f"NMI of experts {experts} and labels {labels}", call(function, list(experts), list(labels)))
        if math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9):
            continue
        if math.isclose(got, mi, rel_tol=1e-6) and not math.isclose(mi, expected, rel_tol=1e-6):
            raise Mismatch(f"for experts {experts} and labels {labels} you returned I(A; B) = {mi:.4f}: "
                           "normalise it by the mean entropy, 2 I / (H(A) + H(B)), so that 1 means 'names it'")
        if math.isclose(got, mi / max(ha, hb), rel_tol=1e-6) or math.isclose(got, mi / min(ha, hb), rel_tol=1e-6):
            raise Mismatch("divide by the mean of the two entropies, (H(A) + H(B)) / 2, not by one of them")
        expect_close(f"NMI of experts {experts} and labels {labels}", got, expected, rel=1e-6, abs_=1e-9)
    return ("0 when the expert says nothing about the label, 1 when each determines the other; "
            "the notebook's specialisation numbers are this, per layer.")
