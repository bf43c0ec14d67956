"""Training learns and is deterministic for a seed."""

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
