"""The Flax LLaMA against transformers' LlamaForCausalLM (random tiny configs, no
download), plus configs, presets, parameter layout, dtype policy and the loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from cljax.models.convert import load_hf_checkpoint
from cljax.models.layers import DTypePolicy, Linear, logical_axes
from cljax.models.llama import (
    Llama,
    LlamaConfig,
    attend,
    attend_prefill,
    causal_lm_loss,
    positions_from_mask,
)
from cljax.models.lora import LoRAParam, apply_lora
from tests.models.trees import assert_trees_close

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the test positions (< 24) cross all three frequency bands.
    "original_max_position_embeddings": 16,
}

# name -> HF config kwargs. Together: GQA and MHA, tied and untied embeddings, llama3 and
# linear rope scaling, an odd vocabulary size.
HF_VARIANTS = {
    "gqa-llama3-untied-oddvocab": dict(
        vocab_size=101,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_scaling=LLAMA3_ROPE,
        rope_theta=10000.0,
    ),
    "mha-tied-linear": dict(
        vocab_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        rope_theta=500000.0,
        attention_bias=True,  # q, k, v and o biases
    ),
}


# The shape of every small random transformers model of the LLaMA family's tests
# (std 0.2 so that logits are not flat).
HF_TINY = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def hf_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A small random transformers LLaMA in float32 (``HF_TINY`` with ``overrides``)."""
    return perturbed(LlamaForCausalLM, HFLlamaConfig(**{**HF_TINY, **overrides}), seed)


def perturbed(model_class, config, seed: int):
    """A random ``model_class(config)`` in eval mode whose norm scales (1 at init) and
    biases (0) are perturbed, so that a missed or misplaced one shows."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # Norm scales start at 1; perturb them so a missed or misplaced norm shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):  # biases start at 0
                p.add_(0.1 * torch.randn_like(p))
    return model


def padded_batch(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ids, mask (3, 24): one full row, one left-padded, one right-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (3, 24)).astype(np.int64)
    mask = np.ones((3, 24), np.int64)
    mask[1, :9] = 0
    mask[2, 15:] = 0
    ids[mask == 0] = 0
    return ids, mask


def hf_logits(model: LlamaForCausalLM, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers logits with positions counted over unmasked tokens (its plain
    forward would number left-padded rows from the first pad)."""
    positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(HF_VARIANTS))
def loaded_variant(request, tmp_path_factory):
    """(name, HF model, cljax model loaded from its save_pretrained directory, config)."""
    name = request.param
    hf = hf_llama(**HF_VARIANTS[name])
    directory: Path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(directory)
    model, cfg = load_hf_checkpoint(directory)
    return name, hf, model, cfg


@pytest.fixture(scope="module")
def forward():
    return nnx.jit(lambda model, ids, mask: model(ids, attention_mask=mask))


def test_logits_match_transformers_with_padding(loaded_variant, forward):
    name, hf, model, cfg = loaded_variant
    ids, mask = padded_batch(cfg.vocab_size)
    ours = np.asarray(forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    ref = hf_logits(hf, ids, mask)
    assert ours.dtype == np.float32 and ours.shape == (3, 24, cfg.vocab_size)
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - ref[valid]).max() <= 1e-4, name
    # Padding must not leak: the padded rows equal the same tokens run unpadded.
    alone = hf_logits(hf, ids[1:2, 9:], mask[1:2, 9:])
    assert np.abs(ours[1, 9:] - alone[0]).max() <= 1e-4


def test_config_variants_are_what_they_claim(loaded_variant):
    name, _, model, cfg = loaded_variant
    state = nnx.state(model, nnx.Param)
    if "tied" in name.split("-"):
        assert cfg.tie_word_embeddings and model.lm_head is None
        assert "lm_head" not in state
    else:
        assert state["lm_head"]["kernel"].get_value().shape == (cfg.hidden_size, cfg.vocab_size)
    if "gqa" in name:
        assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] in name


def test_rope_scaling_changes_logits(loaded_variant, forward):
    """The rope scaling path is live: dropping it moves the logits."""
    _, hf, model, cfg = loaded_variant
    unscaled = Llama(dataclasses.replace(cfg, rope_scaling=None), rngs=nnx.Rngs(0))
    nnx.update(unscaled, nnx.state(model))
    ids, mask = padded_batch(cfg.vocab_size)
    a = forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    b = forward(unscaled, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_parameter_layout_and_logical_axes():
    cfg = LlamaConfig.preset("tiny")
    model = Llama(cfg, rngs=nnx.Rngs(0))
    L, D, M, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    expected = {
        ("embed", "embedding"): ((V, D), ("vocab", "embed")),
        ("layers", "attn", "q_proj", "kernel"): ((L, D, q), ("layers", "embed", "heads")),
        ("layers", "attn", "k_proj", "kernel"): ((L, D, kv), ("layers", "embed", "kv")),
        ("layers", "attn", "v_proj", "kernel"): ((L, D, kv), ("layers", "embed", "kv")),
        ("layers", "attn", "o_proj", "kernel"): ((L, q, D), ("layers", "heads", "embed")),
        ("layers", "mlp", "gate_proj", "kernel"): ((L, D, M), ("layers", "embed", "mlp")),
        ("layers", "mlp", "up_proj", "kernel"): ((L, D, M), ("layers", "embed", "mlp")),
        ("layers", "mlp", "down_proj", "kernel"): ((L, M, D), ("layers", "mlp", "embed")),
        ("layers", "input_norm", "scale"): ((L, D), ("layers", "embed")),
        ("layers", "post_attn_norm", "scale"): ((L, D), ("layers", "embed")),
        ("final_norm", "scale"): ((D,), ("embed",)),
        ("lm_head", "kernel"): ((D, V), ("embed", "vocab")),
    }
    flat = {path: var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert set(flat) == set(expected)
    for path, (shape, axes) in expected.items():
        assert flat[path].get_value().shape == shape, path
        assert logical_axes(flat[path]) == axes, path
    assert isinstance(model.layers.attn.q_proj, Linear)


@pytest.mark.parametrize(
    "preset, billions, kv_heads",
    [("llama-2-7b", 6.738, 32), ("llama-3.1-8b", 8.030, 8)],
)
def test_presets_have_the_published_sizes(preset, billions, kv_heads):
    cfg = LlamaConfig.preset(preset)
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    count = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert abs(count / 1e9 - billions) < 0.005
    assert cfg.num_key_value_heads == kv_heads
    with pytest.raises(ValueError, match="unknown LLaMA preset 'llama-9'"):
        LlamaConfig.preset("llama-9")


def test_linear_layers_are_called_as_modules(forward):
    """A wrapper with Linear's call signature replacing q_proj (as a LoRA module will)
    takes effect inside the scanned blocks."""

    class Doubled(nnx.Module):
        def __init__(self, inner: Linear):
            self.inner = inner

        def __call__(self, x):
            return 2.0 * self.inner(x)

    cfg = LlamaConfig.preset("tiny")
    model = Llama(cfg, rngs=nnx.Rngs(0))
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) + 3
    mask = jnp.ones_like(ids)
    before = forward(model, ids, mask)
    model.layers.attn.q_proj = Doubled(model.layers.attn.q_proj)
    after = forward(model, ids, mask)
    assert float(jnp.abs(after - before).max()) > 1e-4


def test_bfloat16_policy_keeps_norms_and_logits_in_float32(forward):
    cfg = LlamaConfig.preset("tiny")
    model32 = Llama(cfg, rngs=nnx.Rngs(0))
    cfg16 = dataclasses.replace(cfg, policy=DTypePolicy("bfloat16", "bfloat16"))
    model16 = Llama(cfg16, rngs=nnx.Rngs(0))
    assert model16.layers.attn.q_proj.kernel.get_value().dtype == jnp.bfloat16
    ids = (jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 7) % cfg.vocab_size
    mask = jnp.ones_like(ids)
    logits16 = forward(model16, ids, mask)
    logits32 = forward(model32, ids, mask)
    assert logits16.dtype == jnp.float32
    assert float(jnp.abs(logits16 - logits32).max()) < 0.05
    normed = model16.final_norm(jnp.ones((2, cfg.hidden_size), jnp.bfloat16))
    assert normed.dtype == jnp.float32


def test_from_hf_dict_rejects_unsupported_fields():
    base = hf_llama().config.to_dict()
    cfg = LlamaConfig.from_hf_dict(base)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (2, 8, 101)
    legacy = {k: v for k, v in base.items() if k != "rope_parameters"}
    legacy |= {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}}
    parsed = LlamaConfig.from_hf_dict(legacy)
    assert parsed.rope_theta == 5e5 and parsed.rope_scaling == {
        "rope_type": "linear",
        "factor": 4.0,
    }
    cases = [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, r"rope_scaling.rope_type 'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, r"lacks field.*low_freq_factor"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
        ({"mlp_bias": True}, r"mlp_bias=True"),
        ({"sliding_window": 512}, r"unsupported config field\(s\) \['sliding_window'\]"),
        ({"hidden_size": "32"}, r"hidden_size must be a positive int"),
        ({"num_key_value_heads": 3}, r"not a multiple of num_key_value_heads 3"),
        # cljax's own fields never come from a config.json
        ({"scan_unroll": 2}, r"unsupported config field\(s\) \['scan_unroll'\]"),
    ]
    for change, message in cases:
        bad = {k: v for k, v in legacy.items() if k not in change}
        with pytest.raises(ValueError, match=message):
            LlamaConfig.from_hf_dict(bad | change)


def test_unrolled_layers_match_the_scan(loaded_variant, forward):
    """``scan_unroll=L`` compiles the stack without a loop and gives the logits and the
    gradients of the scanned model (and so of transformers)."""
    name, hf, model, cfg = loaded_variant
    unrolled = Llama(dataclasses.replace(cfg, scan_unroll=cfg.num_hidden_layers), rngs=nnx.Rngs(1))
    nnx.update(unrolled, nnx.state(model))
    ids, mask = padded_batch(cfg.vocab_size)
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    valid = np.asarray(mask).astype(bool)
    ours = np.asarray(forward(unrolled, ids, mask))
    assert np.abs(ours[valid] - hf_logits(hf, *map(np.asarray, (ids, mask)))[valid]).max() <= 1e-4
    np.testing.assert_allclose(ours, np.asarray(forward(model, ids, mask)), atol=1e-5, rtol=0)

    def loss_and_grads(m):
        graphdef, params = nnx.split(m)
        loss = lambda p: causal_lm_loss(nnx.merge(graphdef, p)(ids, mask), ids, mask)
        return jax.jit(jax.value_and_grad(loss)), params

    step, params = loss_and_grads(unrolled)
    scan_step, scan_params = loss_and_grads(model)
    assert "while" not in step.lower(params).as_text()
    assert "while" in scan_step.lower(scan_params).as_text()
    (loss, grads), (scan_loss, scan_grads) = step(params), scan_step(scan_params)
    np.testing.assert_allclose(float(loss), float(scan_loss), rtol=1e-6)
    assert_trees_close(grads, scan_grads)
    with pytest.raises(ValueError, match="LlamaConfig.scan_unroll must be a positive int, got 0"):
        dataclasses.replace(cfg, scan_unroll=0)


def test_training_loss_matches_the_loss_of_the_logits(loaded_variant):
    """``Llama.loss`` (chunked, no (B, T, V) logits) has the value and the gradients of
    ``causal_lm_loss`` on the logits; a LoRA-wrapped output layer (no longer one
    matrix) goes through the logits and agrees too."""
    name, _, model, cfg = loaded_variant
    ids, mask = map(jnp.asarray, padded_batch(cfg.vocab_size))
    labels = jnp.roll(ids, -1, axis=1)
    loss_mask = mask.at[:, -1].set(0)

    def check(m: Llama) -> None:
        graphdef, params = nnx.split(m)
        train = lambda p: nnx.merge(graphdef, p).loss(ids, mask, labels, loss_mask)
        via_logits = lambda p: causal_lm_loss(nnx.merge(graphdef, p)(ids, mask), labels, loss_mask)
        loss, grads = jax.jit(jax.value_and_grad(train))(params)
        expected, expected_grads = jax.jit(jax.value_and_grad(via_logits))(params)
        np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
        assert_trees_close(grads, expected_grads)

    assert model.output_kernel().shape == (cfg.hidden_size, cfg.vocab_size)
    check(model)
    if cfg.tie_word_embeddings:
        return
    wrapped = Llama(cfg, rngs=nnx.Rngs(1))
    nnx.update(wrapped, nnx.state(model))
    apply_lora(wrapped, r"^lm_head$", rank=2, alpha=4.0, rngs=nnx.Rngs(2))
    factors = nnx.state(wrapped, LoRAParam)
    nnx.update(wrapped, jax.tree.map(lambda x: jnp.full_like(x, 0.05), factors))
    assert wrapped.output_kernel() is None
    check(wrapped)


def test_causal_lm_loss_scores_only_answer_tokens():
    # bos=1 + prompt [5, 6] + answer [7, 8] + eos=2, right-padded with 0 to 8: position t
    # predicts sequence[t + 1]; positions 2, 3, 4 predict 7, 8 and eos (the answer).
    labels = np.array([[5, 6, 7, 8, 2, 0, 0, 0]], np.int32)
    loss_mask = np.array([[0, 0, 1, 1, 1, 0, 0, 0]], np.int32)
    logits = jax.random.normal(jax.random.key(0), (1, 8, 10))
    loss = causal_lm_loss(logits, labels, loss_mask)
    # By hand: mean of -log softmax(logits[t])[label[t]] over t = 2, 3, 4.
    p = np.asarray(jax.nn.softmax(logits[0], axis=-1))
    by_hand = -np.mean([np.log(p[2, 7]), np.log(p[3, 8]), np.log(p[4, 2])])
    np.testing.assert_allclose(float(loss), by_hand, rtol=1e-5)
    # New logits at prompt and padding positions leave the loss unchanged; at an answer
    # position they change it.
    noise = 3.0 * jax.random.normal(jax.random.key(1), (5, 10))
    changed = logits.at[0, jnp.array([0, 1, 5, 6, 7])].set(noise)
    np.testing.assert_allclose(float(causal_lm_loss(changed, labels, loss_mask)), float(loss))
    moved = causal_lm_loss(logits.at[0, 3].set(noise[0]), labels, loss_mask)
    assert abs(float(moved) - float(loss)) > 1e-3


def test_chunked_prefill_attention_equals_full_attention():
    """``attend_prefill`` (query chunks over the keys up to their end, heads first, the
    softmax written out) gives ``attend``'s output over causal + left-padding masks:
    150 tokens = two chunks of 64 and a partial one, 4 heads over 2 kv heads."""
    rng = np.random.default_rng(0)
    b, t, h, kv, dh = 3, 150, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((b, t, h, dh)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, kv, dh)), jnp.float32) for _ in range(2))
    starts = np.array([0, 37, 149])  # left padding per row
    valid = np.arange(t)[None, :] >= starts[:, None]
    mask = jnp.asarray(valid[:, None, :] & np.tril(np.ones((t, t), bool))[None])
    full = np.asarray(attend(q, k, v, mask))
    chunked = np.asarray(attend_prefill(q, k, v, mask))
    np.testing.assert_allclose(chunked[valid], full[valid], atol=1e-5, rtol=1e-5)
