"""Scale on 8 fake CPU devices: state born sharded like its parameters, a train step that
compiles once, activation constraints, remat, mixed precision, spread SVDs, batch
layout. Shapes are tiny; what is checked is placement and equality of results."""

import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cljax import parallel
from cljax.cl import loop
from cljax.cl.backbone import LLAMA
from cljax.config import Config
from cljax.data.batching import Batch
from cljax.models.layers import DTypePolicy
from cljax.models.llama import Llama, LlamaConfig
from cljax.models.t5 import T5, T5Config
from cljax.optim.osf import osf, osf_bases
from cljax.optim.subspace import batched_svd
from cljax.paths import named_leaves
from tests.models.trees import assert_trees_close

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")


def tiny_llama(**overrides) -> Llama:
    cfg = LlamaConfig.preset(
        "tiny", vocab_size=64, hidden_size=32, intermediate_size=64, **overrides
    )
    return Llama(cfg, rngs=nnx.Rngs(0))


def llama_batch(rows: int = 8, length: int = 16):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 64, (rows, length)), jnp.int32)
    mask = jnp.ones((rows, length), jnp.int32)
    return ids, mask, ids, mask


# --------------------------------------------------------------------------- rules


def test_rules_errors_name_the_axis_at_fault():
    with pytest.raises(ValueError, match="unknown logical axis 'embd'"):
        parallel.rules_with({"embd": "fsdp"})
    with pytest.raises(ValueError, match="unknown mesh axis \\['model'\\]"):
        parallel.rules_with({"embed": "model"})
    rules = dict(parallel.rules_with({"embed": None, "mlp": ["fsdp", "tensor"]}))
    assert rules["embed"] is None and rules["mlp"] == ("fsdp", "tensor")


def test_derived_shardings_follow_the_parameter():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    kernel = jax.ShapeDtypeStruct(
        (2, 32, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp", None))
    )
    params = {"layers": {"up": {"kernel": kernel}}}
    state = {
        "mu": {"layers": {"up": {"kernel": jax.ShapeDtypeStruct((2, 32, 64), jnp.float32)}}},
        "bases": {
            "layers/up/kernel": {
                "left": jax.ShapeDtypeStruct((2, 32, 16), jnp.float32),
                "right": jax.ShapeDtypeStruct((2, 64, 16), jnp.float32),
                "flags": jax.ShapeDtypeStruct((2,), bool),
            }
        },
        "count": jax.ShapeDtypeStruct((), jnp.int32),
        "other": jax.ShapeDtypeStruct((8, 3), jnp.float32),
    }
    out = parallel.derived_shardings(state, params, mesh)
    assert out["mu"]["layers"]["up"]["kernel"].spec == P(None, "fsdp", None)
    basis = out["bases"]["layers/up/kernel"]
    # left (L, m, w) split like m; right (L, n, w): n is not split in the kernel, so the
    # basis is spread over fsdp along n, and the unused data axis along w
    assert basis["left"].spec == P(None, "fsdp", "data")
    assert basis["right"].spec == P(None, "fsdp", "data")
    assert basis["flags"].spec == P(None)
    assert out["count"].spec == P()
    assert out["other"].spec == P("fsdp", None) or out["other"].spec == P(("fsdp",), None)


def test_map_over_devices_svd_matches_and_is_spread():
    mesh = parallel.make_mesh({"fsdp": 8, "data": 1})
    x = jax.random.normal(jax.random.key(0), (3, 12, 8))  # 3 matrices padded to 8
    expected = batched_svd(x)
    with parallel.use_mesh(mesh):
        got = batched_svd(x)
        hlo = jax.jit(batched_svd).lower(x).compile().as_text()
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.abs(np.asarray(a)), np.abs(np.asarray(b)), atol=1e-5)
    # each device decomposes one (1, 12, 8) slice, not the whole stack
    assert "f32[1,12,8]" in hlo


# --------------------------------------------------------------------------- state


@pytest.fixture(scope="module")
def osf_setup():
    """A tiny LLaMA on fsdp=4 x data=2, OSF bases and state, and a sharded train step."""
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    model = tiny_llama()
    parallel.shard_module(model, mesh)
    with parallel.use_mesh(mesh):
        params = nnx.state(model, nnx.Param)
        bases = osf_bases(params, 0.5, targets=LLAMA.osf_targets)
        tx = osf(1e-3, bases)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        opt_sh = loop.optimizer_shardings(tx, params, mesh)
        opt_state = loop.init_optimizer(tx, params, opt_sh)
    return mesh, model, bases, tx, graphdef, params, rest, opt_state, opt_sh


def test_osf_state_is_born_sharded_like_the_parameters(osf_setup):
    mesh, _, bases, _, _, params, _, opt_state, _ = osf_setup
    named = named_leaves(params)
    q_path = "layers/attn/q_proj/kernel"
    kernel = named[q_path]
    assert kernel.sharding.spec == P(None, "fsdp", None)
    basis = bases[q_path]
    assert basis.left.sharding.spec[1] == "fsdp"  # (L, m, w) split along m
    assert basis.left.addressable_shards[0].data.shape[1] == kernel.shape[1] // 4
    # OSF's state holds those very arrays (not a replicated copy) ...
    assert opt_state.bases[q_path].left is basis.left
    # ... and every Adam moment has its parameter's sharding
    mu = named_leaves(opt_state.inner_state[0].mu)
    for path, leaf in named.items():
        assert mu[path].sharding.is_equivalent_to(leaf.sharding, leaf.ndim), path
    # per-device state is a 1/8 share of the total (tiny shapes: bases and moments split
    # over fsdp and data where they divide)
    total = sum(x.nbytes for x in jax.tree.leaves(opt_state))
    local = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(opt_state))
    assert local < 0.3 * total


def test_sharded_step_compiles_once_and_keeps_shardings(osf_setup):
    mesh, _, _, tx, graphdef, params, rest, opt_state, opt_sh = osf_setup
    method = type("NoPenalty", (), {"penalty": lambda self, m, a, b: None})()
    shardings = (loop.shardings_of(params), opt_sh, loop.shardings_of(rest))
    step = loop.make_train_step(LLAMA, method, tx, graphdef, shardings)
    ids, mask, labels, loss_mask = llama_batch()
    fields = dict(input_ids=ids, attention_mask=mask, labels=labels, loss_mask=loss_mask)
    batch = loop.device_batch(Batch(**{f: fields.get(f) for f in Batch._fields}), mesh)
    params = jax.tree.map(jnp.copy, params)
    opt_state = jax.tree.map(jnp.copy, opt_state)
    with parallel.use_mesh(mesh):
        for i in range(3):
            params, opt_state, stats = step(params, opt_state, rest, batch, jax.random.key(i), {})
    assert step._cache_size() == 1
    assert np.isfinite(float(stats["loss"]))
    for leaf, sharding in zip(jax.tree.leaves(opt_state), jax.tree.leaves(opt_sh), strict=True):
        assert leaf.sharding == sharding


def test_loop_step_compiles_once_over_steps_and_tasks(tmp_path, caplog):
    from tests.cl.test_loop import tiny_config

    cfg = tiny_config(
        tmp_path,
        "llama",
        "seqft",
        "run.mesh={'data': 2, 'fsdp': 4}",
        "train.max_steps_per_task=3",
        "train.effective_batch_size=16",
    )
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        run = loop.ContinualRun(cfg, log=lambda _: None)
        assert (run.cfg.train.batch_size, run.cfg.train.grad_accum_steps) == (8, 2)
        run.run()
    pattern = re.compile(r"Compiling (jit\()?step\b")  # JAX 0.10: "Compiling jit(step) ..."
    compiles = [r for r in caplog.records if pattern.match(r.getMessage())]
    assert len(compiles) == 1, [r.getMessage()[:200] for r in compiles]


# --------------------------------------------------------------------------- activations


def test_hidden_states_are_constrained_to_the_batch_axes():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    model = tiny_llama()
    parallel.shard_module(model, mesh)
    ids, mask, labels, loss_mask = llama_batch()
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).loss(i, m, i, m))
    with parallel.use_mesh(mesh):
        hlo = fn.lower(state, ids, mask).as_text()
    # (B, T, D) hidden states split over data x fsdp (Shardy or GSPMD notation)
    assert '[{"data", "fsdp"}, {}, {}]' in hlo or "devices=[8,1,1]" in hlo
    plain = fn.lower(state, ids, mask).as_text()  # outside use_mesh: no constraint
    assert "sharding_constraint" not in plain and "devices=[8,1,1]" not in plain


# --------------------------------------------------------------------------- remat


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients_llama(remat):
    ids, mask, labels, loss_mask = llama_batch(4, 8)

    def loss_and_grads(model):
        graphdef, params = nnx.split(model)
        fn = lambda p: nnx.merge(graphdef, p).loss(ids, mask, labels, loss_mask)
        return jax.jit(jax.value_and_grad(fn))(params)

    base = loss_and_grads(tiny_llama())
    got = loss_and_grads(tiny_llama(remat=remat))
    np.testing.assert_allclose(float(got[0]), float(base[0]), rtol=1e-6)
    assert_trees_close(got[1], base[1], rel=1e-5)


def test_remat_gives_the_same_loss_and_gradients_t5():
    cfg = T5Config.preset("tiny")
    rng = np.random.default_rng(0)
    src = jnp.asarray(rng.integers(2, cfg.vocab_size, (2, 6)), jnp.int32)
    tgt = jnp.asarray(rng.integers(2, cfg.vocab_size, (2, 4)), jnp.int32)
    ones_s, ones_t = jnp.ones_like(src), jnp.ones_like(tgt)

    def loss_and_grads(c):
        graphdef, params = nnx.split(T5(c, rngs=nnx.Rngs(0)))
        fn = lambda p: nnx.merge(graphdef, p).loss(src, ones_s, tgt, ones_t, tgt, ones_t)
        return jax.jit(jax.value_and_grad(fn))(params)

    base = loss_and_grads(cfg)
    got = loss_and_grads(dataclasses.replace(cfg, remat="full"))
    np.testing.assert_allclose(float(got[0]), float(base[0]), rtol=1e-6)
    assert_trees_close(got[1], base[1], rel=1e-5)


def test_remat_bad_name_is_rejected():
    with pytest.raises(ValueError, match="LlamaConfig.remat='everything'"):
        tiny_llama(remat="everything")


# --------------------------------------------------------------------------- precision


def test_float32_master_weights_take_small_updates_that_bf16_weights_lose():
    ids, mask, labels, loss_mask = llama_batch(4, 8)

    def changed_fraction(param_dtype: str) -> float:
        policy = DTypePolicy(param_dtype=param_dtype, compute_dtype="bfloat16")
        model = tiny_llama(policy=policy)
        graphdef, params = nnx.split(model)
        fn = lambda p: nnx.merge(graphdef, p).loss(ids, mask, labels, loss_mask)
        tx = optax.adamw(1e-6)

        @jax.jit
        def step(params):
            updates, _ = tx.update(jax.grad(fn)(params), tx.init(params), params)
            return optax.apply_updates(params, updates)

        new = step(params)
        moved = [
            np.mean(np.asarray(a != b))
            for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True)
            if a.size > 64
        ]
        return float(np.mean(moved))

    master = changed_fraction("float32")
    stored_bf16 = changed_fraction("bfloat16")
    assert master > 0.9  # nearly every weight moves, as in a float32 model
    assert stored_bf16 < 0.2  # a 1e-6 step is below bf16's resolution for most


def test_published_llama_keeps_float32_master_weights():
    from cljax import published

    cfg = published.llama2_7b(1)
    assert (cfg.model.param_dtype, cfg.model.compute_dtype) == ("float32", "bfloat16")
    assert cfg.model.remat != "none"
    assert cfg.train.effective_batch_size == 64


# --------------------------------------------------------------------------- batch layout


@pytest.mark.parametrize(
    "devices,expected", [(1, (1, 64)), (8, (8, 8)), (16, (16, 4)), (64, (64, 1))]
)
def test_batch_layout_keeps_the_effective_batch(devices, expected):
    cfg = Config()
    cfg.train.effective_batch_size = 64
    cfg.eval.batch_size = 64
    out = loop.resolve_batch_layout(cfg, devices)
    assert (out.train.batch_size, out.train.grad_accum_steps) == expected


def test_batch_layout_names_the_numbers_that_do_not_divide():
    cfg = Config()
    cfg.train.effective_batch_size = 64
    with pytest.raises(ValueError, match="effective_batch_size=64 .* 128 data-parallel"):
        loop.resolve_batch_layout(cfg, 128)


def test_random_init_is_born_sharded_and_equal_to_the_eager_one():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    cfg = LlamaConfig.preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64)
    eager_rngs, sharded_rngs = nnx.Rngs(params=3), nnx.Rngs(params=3)
    eager = Llama(cfg, rngs=eager_rngs)
    sharded = parallel.create_sharded(lambda r: Llama(cfg, rngs=r), sharded_rngs, mesh)
    assert_trees_close(nnx.state(sharded), nnx.state(eager), rel=1e-6)  # jit vs eager: 1 ulp
    kernel = sharded.layers.attn.q_proj.kernel.get_value()
    assert kernel.sharding.spec == P(None, "fsdp", None)
    # the rngs advanced as in the eager build (later draws, e.g. LoRA pairs, agree)
    assert int(sharded_rngs.params.count.get_value()) == int(eager_rngs.params.count.get_value())


def test_sharded_generation_matches_and_shards_the_cache():
    from cljax.models.generate import generate_llama

    model = tiny_llama()
    prompts = [[1, 5, 9, 3], [1, 7], [1, 4, 4, 4, 8, 2], [1, 3, 3]] * 2
    expected = generate_llama(model, prompts, 5).as_lists()
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    parallel.shard_module(model, mesh)
    with parallel.use_mesh(mesh):
        got = generate_llama(model, prompts, 5).as_lists()
        graphdef, state = nnx.split(model)
        cache = jax.jit(lambda s: nnx.merge(graphdef, s).init_cache(8, 16))(state)
    assert got == expected
    assert len(cache.k) == model.cfg.num_hidden_layers
    assert cache.k[0].sharding.spec[0] == ("data", "fsdp")  # (B, KV, S, Dh): rows split
