"""Exercises of notebook 05 (training): the labels of answers-only training."""

from ..exercises import Mismatch, as_ints, call, exercise, expect_equal

IGNORE = -100   # the label cross-entropy skips (ernie_lab.losses and transformers agree)


@exercise("05.answer_labels",
          hint="labels[t] = ids[t] where is_answer[t], else -100 (the loss ignores -100); same length as ids.")
def answer_labels(function) -> str:
    cases = [([5, 6, 7, 8, 9], [False, False, True, True, False]), ([1, 2], [True, True]), ([3, 4], [False, False])]
    for ids, is_answer in cases:
        expected = [i if a else IGNORE for i, a in zip(ids, is_answer)]
        got = call(function, list(ids), list(is_answer))
        got = as_ints(f"labels of ids {ids}", got)
        if got == expected:
            continue
        if got == [IGNORE if a else i for i, a in zip(ids, is_answer)]:
            raise Mismatch("the mask is the wrong way round: keep the answer tokens, ignore the prompt")
        if got == [i if a else 0 for i, a in zip(ids, is_answer)]:
            raise Mismatch("0 is a real token id; the loss skips only -100")
        expect_equal(f"labels of ids {ids} with is_answer {is_answer}", got, expected)
    return "Only the answer's tokens teach the model; the prompt is context."
