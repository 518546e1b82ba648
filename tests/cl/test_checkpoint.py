import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import parallel
from cljax.cl.checkpoint import RunCheckpointer


def _state(scale: float) -> dict:
    return {
        "model": {"w": jnp.full((8, 4), scale, jnp.float32), "b": jnp.arange(4.0) * scale},
        "opt": {"count": jnp.asarray(int(scale), jnp.int32), "mu": jnp.ones((8, 4), jnp.bfloat16)},
    }


def test_save_restore_roundtrip_keeps_values_dtypes_and_record(tmp_path):
    record = {"task": 1, "step_in_task": 7, "accuracy": [[50.0, None], [40.0, 60.0]]}
    with RunCheckpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        ckpt.save(3, _state(1.0), {"task": 0})
        ckpt.save(10, _state(2.0), record)
        assert ckpt.latest_step() == 10
        state, got_record = ckpt.restore(_state(0.0))
    assert got_record == record
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state, _state(2.0)
    )
    assert state["opt"]["mu"].dtype == jnp.bfloat16
    # A new manager on the same directory (a restarted run) finds the same checkpoint.
    with RunCheckpointer(tmp_path / "ckpt") as again:
        state3, rec3 = again.restore(_state(0.0), step=3)
    assert rec3 == {"task": 0}
    np.testing.assert_array_equal(np.asarray(state3["model"]["w"]), 1.0)


def test_kept_steps_survive_rotation_and_a_restart(tmp_path):
    with RunCheckpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        ckpt.save(1, _state(1.0), {"task": 0}, keep=True)
        for step in (2, 3, 4):
            ckpt.save(step, _state(float(step)), {"task": 1})
        assert ckpt.all_steps() == [1, 3, 4] and ckpt.kept_steps() == [1]
    with RunCheckpointer(tmp_path / "ckpt", max_to_keep=2) as again:
        assert again.kept_steps() == [1]  # read back from the records
        again.save(5, _state(5.0), {"task": 1})
        assert again.all_steps() == [1, 4, 5]
        _, record = again.restore(_state(0.0), step=1)
    assert record == {"task": 0, "kept": True}


def test_restore_keeps_the_sharding_of_the_live_state(tmp_path):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = parallel.make_mesh({"data": 8})
    sharding = parallel.batch_sharding(mesh)
    live = {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4), sharding)}
    with RunCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, live, {})
        restored, _ = ckpt.restore(live)
    assert restored["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(live["w"]))


def test_restore_without_checkpoint_names_the_directory(tmp_path):
    with RunCheckpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(FileNotFoundError, match="empty"):
            ckpt.restore(_state(0.0))


def test_read_record_without_arrays(tmp_path):
    with RunCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(5, _state(1.0), {"phase": 2})
        assert ckpt.read_record() == {"phase": 2}


def test_zero_size_leaves_and_named_tuples_round_trip(tmp_path):
    import optax

    params = {"a": jnp.ones((3, 0)), "w": jnp.arange(6.0).reshape(2, 3)}
    opt = optax.adam(1e-3).init(params)
    with RunCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, {"params": params, "opt": opt}, {})
        state, _ = ckpt.restore({"params": params, "opt": optax.adam(1e-3).init(params)})
    assert state["params"]["a"].shape == (3, 0)
    assert type(state["opt"][0]).__name__ == "ScaleByAdamState"
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(params["w"]))


def test_restore_names_a_leaf_of_another_shape_and_unreadable_files(tmp_path):
    from cljax.cl.checkpoint import CorruptCheckpointError
    from cljax.errors import CheckpointError

    with RunCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, _state(1.0), {"task": 0})
        ckpt.save(2, _state(2.0), {"task": 1})
        wider = _state(0.0)
        wider["model"]["w"] = jnp.zeros((8, 5))
        with pytest.raises(CheckpointError, match=r"'model.w' was saved with shape \(8, 4\)"):
            ckpt.restore(wider)
        (tmp_path / "ckpt" / "2" / "record" / "metadata").write_text("{not json")
        with pytest.raises(CorruptCheckpointError, match="ckpt/2 is unreadable"):
            ckpt.read_record(2)
        kept = ckpt.set_aside(2)
        assert kept.name == "corrupt-2" and ckpt.latest_step() == 1
        assert ckpt.read_record() == {"task": 0}
