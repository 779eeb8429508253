"""Fresh task-head params, drawn from the run's seed like the model's dense layers."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx


def dense_init(model_config, num_outputs: int, seed: int) -> dict:
    """{'kernel': [hidden, num_outputs] truncated normal(initializer_range), 'bias': zeros} (numpy)."""
    init = nnx.initializers.truncated_normal(stddev=model_config.initializer_range)
    kernel = init(jax.random.fold_in(jax.random.key(seed), 1), (model_config.hidden_size, num_outputs))
    return {"kernel": np.asarray(kernel, np.float32), "bias": np.zeros((num_outputs,), np.float32)}
