"""Training learns and is deterministic for a seed."""

from typing import Any

import numpy as np

from pleas_jax import data, models, train


def test_training_learns_and_is_seeded():
    d = data.load("digits[0-2]", image_size=16)
    m = models.resnet20(num_classes=3, width=4)
    v1 = train.train(m, d, epochs=3, batch_size=64, learning_rate=0.1, seed=0)
    v2 = train.train(m, d, epochs=3, batch_size=64, learning_rate=0.1, seed=0)
    acc = train.accuracy(train.predict(m, v1, d.x_test), d.y_test)
    assert acc > 0.8, acc  # chance is 1/3
    np.testing.assert_array_equal(
        np.asarray(v1["params"]["fc"]["kernel"]), np.asarray(v2["params"]["fc"]["kernel"])
    )


def test_bad_arguments_are_value_errors():
    import pytest

    d = data.load("digits[0-2]", image_size=8)
    m = models.resnet20(num_classes=3, width=4)
    cases: tuple[tuple[dict[str, Any], str], ...] = (
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"learning_rate": 0.0}, "learning_rate must be a positive number"),
        ({"learning_rate": float("inf")}, "learning_rate must be a positive number"),
        ({"weight_decay": -1e-4}, "weight_decay must be a number >= 0"),
    )
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            train.train(m, d, **kw)
    empty = data.Dataset(
        d.x_train[:0], d.y_train[:0], d.x_test, d.y_test, d.classes, "e", d.mean, d.std
    )
    with pytest.raises(ValueError, match="'e': the training split is empty"):
        train.train(m, empty)
