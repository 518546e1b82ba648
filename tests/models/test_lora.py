"""LoRA adapters: B = 0 leaves the model unchanged, merged equals unmerged, a new pair
freezes the old one, dropout, bad targets; on a toy scanned module and the tiny LLaMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cljax.models import layers, lora
from cljax.models.llama import Llama, LlamaConfig
from cljax.optim.gorp import end_task, gorp
from cljax.optim.nnx_optimizer import map_opt_state, opt_state_of
from cljax.optim.shared_space import shared_bases
from cljax.paths import path_to_str

L, D = 2, 8


class Toy(nnx.Module):
    """Two stacked Linears applied per layer inside ``scan_layers`` + an unstacked head."""

    def __init__(self, rngs: nnx.Rngs):
        self.block = nnx.Dict(
            up=layers.Linear(D, 2 * D, axes=("embed", "mlp"), rngs=rngs, stack=(L,)),
            down=layers.Linear(2 * D, D, axes=("mlp", "embed"), rngs=rngs, stack=(L,)),
        )
        self.head = layers.Linear(D, 5, axes=("embed", "vocab"), rngs=rngs, init_std=0.3)

    def __call__(self, x):
        def body(block, h, _):
            return h + block["down"](jnp.tanh(block["up"](h))), None

        h, _ = layers.scan_layers(self.block, body, x)
        return self.head(h)


@nnx.jit
def fwd(model, *args, **kwargs):
    """One jitted forward: a model is re-compiled only when its graph changes."""
    return model(*args, **kwargs)


def _x(shape=(3, 4, D)):
    return jax.random.normal(jax.random.key(7), shape)


def _randomize_b(model, seed):
    for i, (_, m) in enumerate(lora.lora_modules(model)):
        key = jax.random.fold_in(jax.random.key(seed), i)
        m.lora_b[...] = 0.3 * jax.random.normal(key, m.lora_b.shape)


def test_zero_b_is_identity_and_init():
    model = Toy(nnx.Rngs(0))
    x = _x()
    before = fwd(model, x)
    wrapped = lora.apply_lora(model, ["up", "head"], rank=3, alpha=6.0, rngs=nnx.Rngs(1))
    assert wrapped == ["block/up", "head"]
    np.testing.assert_array_equal(fwd(model, x), before)
    up = model.block["up"]
    assert up.lora_a.shape == (L, D, 3) and up.lora_b.shape == (L, 3, 2 * D)
    assert float(jnp.max(jnp.abs(up.lora_a[...]))) <= 1 / np.sqrt(D)
    assert float(jnp.std(up.lora_a[...])) > 0.5 / np.sqrt(3 * D)  # not degenerate
    assert float(jnp.max(jnp.abs(up.lora_b[...]))) == 0.0
    assert layers.logical_axes(up.lora_a) == ("layers", "embed", None)
    assert layers.logical_axes(up.lora_b) == ("layers", None, "mlp")


def test_forward_equals_hand_computation():
    """Unstacked head: y = x W + (alpha / r) x A B."""
    model = Toy(nnx.Rngs(0))
    lora.apply_lora(model, "head", rank=2, alpha=5.0, rngs=nnx.Rngs(1))
    _randomize_b(model, 3)
    head = model.head
    h = _x((4, D))
    want = h @ head.base.kernel[...] + 2.5 * (h @ head.lora_a[...]) @ head.lora_b[...]
    np.testing.assert_allclose(head(h), want, atol=1e-6)


def test_merge_equals_unmerged_and_new_task_freezes():
    model = Toy(nnx.Rngs(0))
    x = _x()
    lora.apply_lora(model, ["up", "down", "head"], rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    _randomize_b(model, 1)
    old = {p: (m.lora_a[...], m.lora_b[...]) for p, m in lora.lora_modules(model)}
    task1 = fwd(model, x)
    lora.new_task(model, nnx.Rngs(2))
    np.testing.assert_allclose(fwd(model, x), task1, atol=1e-6)  # fresh B = 0
    for path, m in lora.lora_modules(model):
        assert m.num_past_tasks == 1
        np.testing.assert_array_equal(m.past_a[...], old[path][0])
        np.testing.assert_array_equal(m.past_b[...], old[path][1])
        assert not np.array_equal(m.lora_a[...], old[path][0])
    trainable = nnx.state(model, lora.LoRAParam)
    frozen = nnx.state(model, lora.FrozenLoRA)
    assert _leaf_names(trainable) == {"lora_a", "lora_b"}
    assert _leaf_names(frozen) == {"past_a", "past_b"}
    # A second task's pair on top of the first: merged == unmerged with both.
    _randomize_b(model, 2)
    unmerged = fwd(model, x)
    assert float(jnp.max(jnp.abs(unmerged - task1))) > 1e-3
    assert set(lora.merge_lora(model)) == {"block/up", "block/down", "head"}
    assert lora.lora_modules(model) == []
    assert isinstance(model.head, layers.Linear)
    np.testing.assert_allclose(fwd(model, x), unmerged, atol=1e-5)


def _leaf_names(state):
    return {
        path_to_str(p).split("/")[-1] for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]
    }


def test_optimizer_trains_only_the_current_pair():
    model = Toy(nnx.Rngs(0))
    lora.apply_lora(model, "up", rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    _randomize_b(model, 1)
    lora.new_task(model, nnx.Rngs(2))
    before = nnx.clone(model)
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=lora.LoRAParam)
    x = _x()

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, lora.LoRAParam))(
            model
        )
        opt.update(model, grads)

    step(model, opt)
    up, up0 = model.block["up"], before.block["up"]
    assert float(jnp.max(jnp.abs(up.lora_b[...] - up0.lora_b[...]))) > 0
    np.testing.assert_array_equal(up.past_a[...], up0.past_a[...])
    np.testing.assert_array_equal(up.past_b[...], up0.past_b[...])
    np.testing.assert_array_equal(up.base.kernel[...], up0.base.kernel[...])


def test_dropout_deterministic_and_reseeded():
    model = Toy(nnx.Rngs(0))
    x = _x()
    lora.apply_lora(model, "up", rank=2, alpha=4.0, rngs=nnx.Rngs(1), dropout=0.5)
    _randomize_b(model, 1)
    assert model.block["up"].dropout_key.shape[0] == L
    model.eval()
    clean = fwd(model, x)
    model.train()
    lora.reseed_dropout(model, jax.random.key(0))
    a = fwd(model, x)
    a_again = fwd(model, x)
    lora.reseed_dropout(model, jax.random.key(1))
    b = fwd(model, x)
    np.testing.assert_array_equal(a, a_again)  # same keys, same masks
    assert float(jnp.max(jnp.abs(a - clean))) > 1e-3
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    # Dropout touches only the adapter input: with B = 0 train mode equals the base.
    lora.new_task(model, nnx.Rngs(3))
    for _, m in lora.lora_modules(model):
        m.past_b[...] = jnp.zeros_like(m.past_b[...])
    model.eval()
    base = fwd(model, x)
    model.train()
    np.testing.assert_allclose(fwd(model, x), base, atol=1e-6)


def test_bad_targets():
    model = Toy(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'q_proj' matches no Linear.*block/up"):
        lora.apply_lora(model, ["up", "q_proj"], rank=2, alpha=1.0, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"rank 9 for 'block/up'.*\[1, 8\]"):
        lora.apply_lora(model, "up", rank=9, alpha=1.0, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.new_task(model, nnx.Rngs(1))
    lora.apply_lora(model, "up", rank=2, alpha=1.0, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already wrapped: \\['block/up'\\]"):
        lora.apply_lora(model, "up", rank=2, alpha=1.0, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def llama():
    cfg = LlamaConfig.preset("tiny")
    model = Llama(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (2, 6), 0, cfg.vocab_size)
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]])
    return model, ids, mask


def test_tiny_llama_zero_b_merge_and_gorp(llama):
    base_model, ids, mask = llama
    model = nnx.clone(base_model)
    base = fwd(model, ids, attention_mask=mask)
    wrapped = lora.apply_lora(
        model, [r"attn/(q|v)_proj$"], rank=4, alpha=8.0, rngs=nnx.Rngs(1), dropout=0.1
    )
    assert wrapped == ["layers/attn/q_proj", "layers/attn/v_proj"]
    model.eval()
    np.testing.assert_array_equal(fwd(model, ids, attention_mask=mask), base)
    _randomize_b(model, 5)
    lora.new_task(model, nnx.Rngs(2))
    _randomize_b(model, 6)
    unmerged = fwd(model, ids, attention_mask=mask)
    assert float(jnp.max(jnp.abs(unmerged - base))) > 1e-3

    # GORP on LoRA + full gate_proj through nnx.Optimizer: frozen pairs and other base
    # weights stay, the targeted kernel and the current pair move.
    model.train()
    trained = nnx.clone(model)
    wrt = lora.trainable_filter(nnx.PathContains("gate_proj"))
    tx = gorp(1e-2, 4, 2, full_targets="gate_proj/kernel", lora_a_targets="lora_a",
              full_learning_rate=1e-3)  # fmt: skip
    opt = nnx.Optimizer(trained, tx, wrt=wrt)

    @nnx.jit
    def step(model, opt, key):
        lora.reseed_dropout(model, key)
        loss = lambda m: jnp.mean(m(ids, attention_mask=mask) ** 2)
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model)
        opt.update(model, grads)

    step(trained, opt, jax.random.key(0))
    map_opt_state(opt, lambda s: end_task(s, 0.999))  # in place: S grows, counts restart
    grown = [u for _, u in shared_bases(opt_state_of(opt))]
    assert len(grown) == 3 and all(int(jnp.min(u)) >= 1 for u in grown)  # gate, 2 x lora_a
    assert int(opt.opt_state[0].count[...]) == 0
    step(trained, opt, jax.random.key(1))
    q, q0 = trained.layers.attn.q_proj, model.layers.attn.q_proj
    assert float(jnp.max(jnp.abs(q.lora_a[...] - q0.lora_a[...]))) > 0
    np.testing.assert_array_equal(q.past_a[...], q0.past_a[...])
    np.testing.assert_array_equal(q.base.kernel[...], q0.base.kernel[...])
    gate, gate0 = trained.layers.mlp.gate_proj.kernel[...], model.layers.mlp.gate_proj.kernel[...]
    assert float(jnp.max(jnp.abs(gate - gate0))) > 0
    np.testing.assert_array_equal(
        trained.layers.mlp.up_proj.kernel[...], model.layers.mlp.up_proj.kernel[...]
    )

    model.eval()
    lora.merge_lora(model)
    np.testing.assert_allclose(fwd(model, ids, attention_mask=mask), unmerged, atol=2e-5)
