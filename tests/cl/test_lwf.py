"""Learning without Forgetting: its term equals a hand computation from the old and the
new model's logits and is off on the first task (test_loop runs it in the loop)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cljax.cl import loop
from tests.cl.test_loop import tiny_config


def log_softmax(x, t):
    x = np.asarray(x, np.float64) / t
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_lwf_term_is_the_kl_to_the_previous_model(tmp_path):
    cfg = tiny_config(tmp_path, "llama", "lwf", "method.options.temperature=2.0")
    run = loop.ContinualRun(cfg, log=lambda _: None)
    method, model, family = run.method, run.model, run.family
    batch = next(
        iter(
            loop.batching.train_batches(
                run.data.train[0], run.data.tokenizer, run.batch_config, epoch=0, seed=0
            )
        )
    )
    method.begin_task(0, model, lambda: [])
    assert float(method.penalty(model, method.arrays, batch)) == 0.0  # no previous model
    method.begin_task(1, model, lambda: [])
    old = copy.deepcopy(model)
    # the new model moves away from the old one
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jnp.sign(x), params))
    got = float(method.penalty(model, method.arrays, batch))
    teacher = np.asarray(family.logits(old, batch))
    student = np.asarray(family.logits(model, batch))
    mask = np.asarray(batch.attention_mask, bool)
    p, q = log_softmax(teacher, 2.0), log_softmax(student, 2.0)
    per_position = np.sum(np.exp(p) * (p - q), axis=-1)
    expected = 4.0 * per_position[mask].mean()
    assert expected > 1e-4
    np.testing.assert_allclose(got, expected, rtol=1e-4)
