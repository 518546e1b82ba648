"""HF checkpoint directories <-> cljax: round trip through transformers, sharded
indexes, bfloat16 files, and bad checkpoints failing with errors that name the culprit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import LlamaForCausalLM

from cljax.models.convert import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    TensorRule,
    export_hf_checkpoint,
    load_hf_checkpoint,
)
from cljax.models.layers import DTypePolicy
from cljax.models.llama import Llama, LlamaConfig
from tests.models.test_llama import LLAMA3_ROPE, hf_llama, hf_logits, padded_batch


@pytest.fixture(scope="module")
def forward():
    return nnx.jit(lambda model, ids, mask: model(ids, attention_mask=mask))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A saved random HF LLaMA (GQA, untied, llama3 rope) used by the bad-input tests."""
    directory = tmp_path_factory.mktemp("hf")
    hf_llama(rope_scaling=LLAMA3_ROPE).save_pretrained(directory)
    return directory


def params_of(model: nnx.Module) -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, path)): np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def broken_copy(hf_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of hf_dir whose tensors dict went through ``edit`` (in place)."""
    target = tmp_path / "broken"
    shutil.copytree(hf_dir, target)
    tensors = load_file(target / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, target / SINGLE_FILE, metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_cljax_to_transformers_to_cljax(tied, tmp_path, forward):
    """cljax (random) -> sharded HF directory -> transformers loads it -> same logits;
    loading the directory back gives identical parameters."""
    cfg = LlamaConfig.preset(
        "tiny", vocab_size=91, tie_word_embeddings=tied, rope_scaling=dict(LLAMA3_ROPE)
    )
    model = Llama(cfg, rngs=nnx.Rngs(3))
    # Norm scales start at 1; perturb them so a swapped norm would show.
    scale = model.layers.input_norm.scale
    scale.set_value(scale.get_value() + 0.1 * jax.random.normal(jax.random.key(0), scale.shape))
    export_hf_checkpoint(model, cfg, tmp_path, max_shard_bytes=40_000)
    assert (tmp_path / INDEX_FILE).is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1

    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == tied
    ids, mask = padded_batch(cfg.vocab_size, seed=1)
    ours = np.asarray(forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - hf_logits(hf, ids, mask)[valid]).max() <= 1e-4

    back, back_cfg = load_hf_checkpoint(tmp_path)
    assert back_cfg == cfg
    original, reloaded = params_of(model), params_of(back)
    assert original.keys() == reloaded.keys()
    for path in original:
        np.testing.assert_array_equal(original[path], reloaded[path], err_msg=path)


def test_loads_a_sharded_transformers_checkpoint(tmp_path, forward):
    hf = hf_llama(seed=1, vocab_size=77)
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, cfg = load_hf_checkpoint(tmp_path)
    ids, mask = padded_batch(cfg.vocab_size, seed=2)
    ours = np.asarray(forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - hf_logits(hf, ids, mask)[valid]).max() <= 1e-4


def test_loads_bfloat16_tensors_without_torch(tmp_path):
    hf = hf_llama(seed=2).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model, _ = load_hf_checkpoint(tmp_path)
    expected = hf.model.layers[1].self_attn.k_proj.weight.detach().float().numpy().T
    loaded = np.asarray(model.layers.attn.k_proj.kernel.get_value()[1])
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, expected)
    # A bfloat16 policy keeps the checkpoint's values bit for bit.
    model16, cfg16 = load_hf_checkpoint(tmp_path, policy=DTypePolicy("bfloat16", "bfloat16"))
    assert cfg16.policy.param_dtype == "bfloat16"
    kernel16 = model16.layers.attn.k_proj.kernel.get_value()
    assert kernel16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel16[1], np.float32), expected)


def test_missing_tensor_is_named(hf_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    broken = broken_copy(hf_dir, tmp_path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"missing tensor '{name}'.*layers/mlp/up_proj"):
        load_hf_checkpoint(broken)


def test_wrong_shape_names_tensor_and_both_shapes(hf_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"

    def shrink(tensors):
        tensors[name] = tensors[name][:8]

    broken = broken_copy(hf_dir, tmp_path, shrink)
    with pytest.raises(
        CheckpointError, match=rf"'{name}' has shape \(8, 32\), expected \(16, 32\)"
    ):
        load_hf_checkpoint(broken)


def test_unexpected_tensor_is_named(hf_dir, tmp_path):
    def add(tensors):
        tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)

    broken = broken_copy(hf_dir, tmp_path, add)
    # The rotary buffer of old checkpoints is skipped; an unknown weight is not.
    with pytest.raises(
        CheckpointError, match=r"unexpected tensors.*\['model.layers.0.self_attn.q_norm"
    ):
        load_hf_checkpoint(broken)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
            r"config.json: rope_scaling.rope_type 'dynamic' is not supported",
        ),
        ({"model_type": "gemma"}, r"unsupported model_type 'gemma'; supported: \[.*'llama'"),
        ({"hidden_act": "relu"}, r"config.json: config field hidden_act='relu'"),
    ],
)
def test_bad_config_field_is_named(hf_dir, tmp_path, change, message):
    target = tmp_path / "bad_config"
    shutil.copytree(hf_dir, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(CheckpointError, match=message):
        load_hf_checkpoint(target)


def test_missing_files_and_bad_rules_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="unknown transform 'flip'"):
        TensorRule("a.weight", "a.kernel", "flip")
    with pytest.raises(ValueError, match="placeholder goes with num_layers"):
        TensorRule("layers.{layer}.weight", "layers.kernel")


def test_loads_straight_into_shardings(hf_dir):
    """With a mesh every tensor is placed into its sharding: each device holds only its
    shard, and the values are those of the unsharded load."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    from cljax import parallel

    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    expected, _ = load_hf_checkpoint(hf_dir)
    model, _ = load_hf_checkpoint(hf_dir, mesh=mesh)
    got = params_of(model)
    for path, value in params_of(expected).items():
        np.testing.assert_array_equal(got[path], value)
    kernel = model.layers.mlp.up_proj.kernel.get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // 4
    # nothing landed whole on one device
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert len(leaf.sharding.device_set) == 8
