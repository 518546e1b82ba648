import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cljax import parallel
from cljax.models.layers import Embed, Linear, scan_layers


class ToyStack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = Embed(16, 8, rngs=rngs)
        self.up = Linear(8, 32, axes=("embed", "mlp"), stack=(2,), rngs=rngs)
        self.down = Linear(32, 8, axes=("mlp", "embed"), stack=(2,), rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids (B, T) -> logits (B, T, 16) through a 2-layer scanned residual MLP."""

        def block(layers: "ToyStack", h: jax.Array, _: None) -> tuple[jax.Array, None]:
            return h + layers.down(jax.nn.relu(layers.up(h))), None

        stacked = nnx.Dict(up=self.up, down=self.down)
        h, _ = scan_layers(stacked, block, self.embed(ids))
        return self.embed.attend(h)


def test_make_mesh_defaults_to_data_parallel():
    mesh = parallel.make_mesh()
    assert mesh.shape == {"data": len(jax.devices()), "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="unknown mesh axes"):
        parallel.make_mesh({"model": 2})
    with pytest.raises(ValueError, match="does not divide"):
        parallel.make_mesh({"tensor": 3})
    with pytest.raises(ValueError, match="needs 64 devices"):
        parallel.make_mesh({"data": 64})
    single = parallel.make_mesh({"data": 1})
    assert single.devices.size == 1 and single.devices.flat[0] == jax.devices()[0]


def test_logical_to_spec_uses_each_mesh_axis_once_and_replicates_indivisible_dims():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert parallel.logical_to_spec(("layers", "embed", "mlp"), (2, 8, 32), mesh) == P(
        None, "fsdp", "tensor"
    )
    # 'heads' and 'mlp' both want 'tensor': the second is replicated.
    assert parallel.logical_to_spec(("heads", "mlp"), (4, 4), mesh) == P("tensor", None)
    # An odd vocabulary cannot be split over 2 devices.
    assert parallel.logical_to_spec(("vocab", "embed"), (17, 8), mesh) == P(None, "fsdp")
    assert parallel.logical_to_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)


def test_sharded_module_gives_the_same_outputs():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    model = ToyStack(nnx.Rngs(0))
    ids = jnp.arange(16, dtype=jnp.int32).reshape(8, 2) % 16
    expected = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    parallel.shard_module(model, mesh)
    kernel = model.up.kernel[...]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    ids = jax.device_put(ids, parallel.batch_sharding(mesh))
    got = nnx.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
