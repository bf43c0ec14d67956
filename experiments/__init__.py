"""The paper's experiments, launch grids and reports, on top of :mod:`pleas_jax`."""
