"""InfLoRA: A_t lies outside the stored input subspace, only B_t trains, and inputs of
earlier tasks (inside the stored subspace) meet an unchanged adapter."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cljax.cl import loop
from cljax.cl.methods import InfLoRA
from cljax.models import lora
from tests.cl.test_loop import tiny_config


def adapter_output(module: lora.LoRALinear, x: jax.Array) -> np.ndarray:
    """Layer 0's base + every LoRA pair on inputs x (N, d_in), in float32."""
    kernel = module.base.kernel[...][0].astype(jnp.float32)
    return np.asarray(x @ kernel + x @ module.delta_kernel()[0])


def test_inputs_of_earlier_tasks_meet_an_unchanged_adapter(tmp_path, monkeypatch):
    seen = {}
    end_task = InfLoRA.end_task

    def recording_end_task(self, t, model, opt_state, fisher):
        out = end_task(self, t, model, opt_state, fisher)
        path, module = lora.lora_modules(model)[0]
        if t == 0:
            # inputs inside the subspace stored after task 1, and generic ones
            used = int(self.arrays["used"][path][0])
            space = self.arrays["space"][path][0][:, :used]
            assert 0 < used < space.shape[0]
            seen["space"] = space
            seen["inside"] = (space @ jax.random.normal(jax.random.key(0), (used, 4))).T
            seen["generic"] = jax.random.normal(jax.random.key(1), (4, space.shape[0]))
        seen[t] = {k: adapter_output(module, seen[k]) for k in ("inside", "generic")}
        seen[f"a{t}"] = module.lora_a[...][0].astype(jnp.float32)
        return out

    monkeypatch.setattr(InfLoRA, "end_task", recording_end_task)
    cfg = tiny_config(
        tmp_path, "llama", "inflora", "train.learning_rate=0.05", "train.max_steps_per_task=3"
    )
    loop.run_experiment(cfg, log=lambda _: None)

    def relative(k):
        return np.abs(seen[1][k] - seen[0][k]).max() / np.abs(seen[0][k]).max()

    assert np.abs(np.asarray(seen["space"].T @ seen["a1"])).max() < 1e-5  # A_2 outside
    assert relative("inside") <= 1e-5  # earlier tasks' inputs: the same outputs
    assert relative("generic") > 1e-3  # while task 2 did change the adapter


def test_only_b_trains(tmp_path):
    run = loop.ContinualRun(tiny_config(tmp_path, "llama", "inflora"), log=lambda _: None)
    trained = nnx.state(run.model, run.method.trainable())
    names = [str(path[-1]) for path, _ in nnx.to_flat_state(trained)]
    assert names and all(name == "lora_b" for name in names)
