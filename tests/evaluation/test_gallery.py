"""The error gallery picks the most confident mistakes."""

import numpy as np
import pytest

from products10k.scores import SplitScores


def test_worst_errors_are_the_most_confident_mistakes():
    from products10k.evaluation.gallery import worst_errors

    logits = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]))
    labels = np.array([1, 1, 1, 0])  # rows 0, 2, 3 are wrong with confidence 0.9, 0.6, 0.7
    scores = SplitScores.from_logits(["a", "b", "c", "d"], labels, logits, k=2)
    errors = worst_errors(scores, 2)
    assert errors["index"].tolist() == [0, 3] and errors["pred"].tolist() == [0, 1]
    assert errors["prob"].tolist() == pytest.approx([0.9, 0.7])
    right = SplitScores.from_logits(["a", "b", "c", "d"], logits.argmax(1), logits, k=2)
    assert worst_errors(right, 5).empty
