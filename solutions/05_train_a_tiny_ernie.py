"""Solutions to notebook 05's exercises."""


def answer_labels(ids, is_answer):
    return [token if answer else -100 for token, answer in zip(ids, is_answer)]


SOLUTIONS = {"05.answer_labels": (answer_labels,)}
WRONG = {"05.answer_labels": [(lambda ids, is_answer: [-100 if a else t for t, a in zip(ids, is_answer)],),
                              (lambda ids, is_answer: [t if a else 0 for t, a in zip(ids, is_answer)],),
                              (lambda ids, is_answer: list(ids),)]}
