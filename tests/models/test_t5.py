"""T5 parity with transformers' ``T5ForConditionalGeneration`` on small random models
(no download): encoder outputs and logits within 1e-4 in float32, for ReLU (v1.0) and
gated-GELU (v1.1 / Flan) feed-forward, tied and untied output layers, padding on both
sides; the seq2seq loss; relative position buckets; configs and presets.

``build_hf_t5`` and the ``t5_checkpoints`` fixture are shared with the T5 conversion and
generation tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file
from transformers import T5Config as HFT5Config
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from cljax.models.convert import load_hf_checkpoint
from cljax.models.generate import generate_t5
from cljax.models.layers import DTypePolicy, logical_axes
from cljax.models.t5 import (
    T5,
    T5Config,
    dropout,
    relative_position_buckets,
    seq2seq_loss,
)
from cljax.paths import path_to_str
from tests.models.trees import assert_trees_close

# The reference models are tiny: torch's thread pool only adds contention on a shared
# 2-core machine (measured: greedy generate 0.07 s with one thread, seconds with two).
torch.set_num_threads(1)

VOCAB = 99  # odd on purpose: no accidental agreement with a power-of-two vocabulary
TOL = 1e-4

# (feed_forward_proj, tied): v1.0 is relu + tied, v1.1 / Flan gated-gelu + untied; the
# two other combinations make sure the two options are independent.
VARIANTS = [("relu", True), ("gated-gelu", False), ("relu", False), ("gated-gelu", True)]


def build_hf_t5(directory: Path, *, proj: str, tied: bool, seed: int = 0, decoder_layers: int = 3):
    """Save a small random HF T5 to ``directory`` and return it (eval mode).

    2 encoder and ``decoder_layers`` decoder layers (3: different on purpose; HF's
    ``generate`` needs them equal), 8 relative buckets with max distance 20 so that short
    sequences reach the logarithmic and the clamped buckets. HF's own initialisation
    (``initializer_factor=1``): larger weights make float32 itself drift past 1e-4.
    An untied model gets its own random ``lm_head.weight`` in the file and
    ``tie_word_embeddings: false``, as in the Flan-T5 / v1.1 checkpoints.
    """
    torch.manual_seed(seed)
    config = HFT5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=decoder_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj=proj,
        tie_word_embeddings=tied,
        decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(directory)
    if not tied:
        tensors = load_file(directory / "model.safetensors")
        tensors["lm_head.weight"] = torch.randn(
            VOCAB, 32, generator=torch.Generator().manual_seed(seed + 1)
        )
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        raw = json.loads((directory / "config.json").read_text())
        raw["tie_word_embeddings"] = False
        raw.pop("scale_decoder_outputs", None)  # the pre-transformers-5 layout
        (directory / "config.json").write_text(json.dumps(raw))
    return T5ForConditionalGeneration.from_pretrained(directory).eval()


@pytest.fixture(
    scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-{'tied' if v[1] else 'untied'}"
)
def t5_checkpoints(request, tmp_path_factory):
    """(hf_model, checkpoint dir, cljax model, cljax config) for one variant."""
    proj, tied = request.param
    directory = tmp_path_factory.mktemp(f"t5-{proj}-{tied}")
    hf = build_hf_t5(directory, proj=proj, tied=tied)
    model, cfg = load_hf_checkpoint(directory)
    return hf, directory, model, cfg


def padded_batch(seed: int = 0):
    """Sources (3, 24) and decoder inputs (3, 10) with padding: source row 1 right-padded,
    row 2 left-padded; decoder row 1 right-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, (3, 24))
    mask = np.ones((3, 24), np.int64)
    mask[1, 15:] = 0
    mask[2, :6] = 0
    dec = rng.integers(2, VOCAB, (3, 10))
    dec_mask = np.ones((3, 10), np.int64)
    dec_mask[1, 7:] = 0
    return ids, mask, dec, dec_mask


@nnx.jit
def _forward(model: T5, ids, mask, dec, dec_mask):
    encoder_out = model.encode(ids, mask)
    return encoder_out, model.decode(dec, encoder_out, mask, dec_mask)


def test_config_matches_checkpoint(t5_checkpoints):
    hf, _, _, cfg = t5_checkpoints
    assert cfg.feed_forward_proj == hf.config.feed_forward_proj
    assert cfg.tie_word_embeddings == (hf.lm_head.weight is hf.shared.weight)
    assert cfg.scale_decoder_outputs == hf.config.scale_decoder_outputs
    assert (cfg.num_layers, cfg.num_decoder_layers) == (2, 3)


def test_encoder_and_logits_match_transformers(t5_checkpoints):
    hf, _, model, _ = t5_checkpoints
    ids, mask, dec, dec_mask = padded_batch()
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec),
            decoder_attention_mask=torch.tensor(dec_mask),
            output_hidden_states=True,
        )
    encoder_out, logits = _forward(model, *map(jnp.asarray, (ids, mask, dec, dec_mask)))
    # Padded positions are garbage in both implementations: compare the real ones.
    real, real_dec = mask.astype(bool), dec_mask.astype(bool)
    ref_enc = out.encoder_last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(encoder_out)[real], ref_enc[real], atol=TOL, rtol=0)
    ref_logits = out.logits.numpy()
    assert np.abs(ref_logits).max() > 1.0  # a meaningful scale for the tolerance
    np.testing.assert_allclose(np.asarray(logits)[real_dec], ref_logits[real_dec], atol=TOL, rtol=0)


def test_unrolled_layers_match_the_scan(t5_checkpoints):
    """``scan_unroll`` (here through ``load_hf_checkpoint``'s config overrides) runs the
    encoder and decoder stacks without a loop, with the scanned model's outputs; greedy
    decoding through the cached ``decode_step`` gives the same tokens."""
    _, directory, model, cfg = t5_checkpoints
    unrolled, unrolled_cfg = load_hf_checkpoint(directory, scan_unroll=3)
    assert unrolled_cfg.scan_unroll == 3 and cfg.scan_unroll == 1
    batch = tuple(map(jnp.asarray, padded_batch()))
    assert "while" not in _forward.lower(unrolled, *batch).as_text()
    for ours, scanned in zip(_forward(unrolled, *batch), _forward(model, *batch), strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(scanned), atol=1e-5, rtol=0)
    sources = [[5, 9, 3, 1], [7, 1]]
    np.testing.assert_array_equal(
        generate_t5(unrolled, sources, 6).tokens, generate_t5(model, sources, 6).tokens
    )
    with pytest.raises(ValueError, match="T5Config.scan_unroll must be a positive int"):
        T5Config.preset("t5-small", scan_unroll=True)


def _right_padded(rows: list[list[int]], length: int, pad: int) -> np.ndarray:
    out = np.full((len(rows), length), pad, np.int32)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return out


def test_seq2seq_loss_matches_transformers(t5_checkpoints):
    hf, _, model, cfg = t5_checkpoints
    rng = np.random.default_rng(1)
    pairs = [(9, 4), (20, 7), (5, 1)]  # (source, target) lengths, eos (1) last
    rows = [
        ([*rng.integers(2, VOCAB, n - 1).tolist(), 1], [*rng.integers(2, VOCAB, t - 1).tolist(), 1])
        for n, t in pairs
    ]
    sources, targets = [s for s, _ in rows], [t for _, t in rows]
    # The shapes of padded_batch (24, 10): reuses the compiled _forward.
    input_ids = _right_padded(sources, 24, cfg.pad_token_id)
    attention_mask = _right_padded([[1] * len(s) for s in sources], 24, 0)
    labels = _right_padded(targets, 10, cfg.pad_token_id)
    loss_mask = _right_padded([[1] * len(t) for t in targets], 10, 0)
    # Shifted right by hand: the decoder reads the previous target token.
    decoder_input_ids = _right_padded(
        [[cfg.decoder_start_token_id, *t[:-1]] for t in targets], 10, cfg.pad_token_id
    )
    hf_labels = np.where(loss_mask == 1, labels, -100)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            attention_mask=torch.tensor(attention_mask),
            labels=torch.tensor(hf_labels, dtype=torch.long),
        ).loss.item()
    _, logits = _forward(
        model,
        jnp.asarray(input_ids),
        jnp.asarray(attention_mask),
        jnp.asarray(decoder_input_ids),
        jnp.ones((3, 10), jnp.int32),  # causal masking alone keeps padding out of the loss
    )
    loss = seq2seq_loss(logits, jnp.asarray(labels), jnp.asarray(loss_mask))
    assert float(loss) == pytest.approx(ref, abs=TOL)

    # The training loss (no logits materialised) has the same value and gradients.
    args = tuple(map(jnp.asarray, (input_ids, attention_mask, decoder_input_ids)))
    args += (jnp.ones((3, 10), jnp.int32), jnp.asarray(labels), jnp.asarray(loss_mask))
    graphdef, params = nnx.split(model)

    def via_logits(p):
        return seq2seq_loss(nnx.merge(graphdef, p)(*args[:4]), *args[4:])

    train, grads = jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(*args)))(params)
    expected, expected_grads = jax.jit(jax.value_and_grad(via_logits))(params)
    assert float(train) == pytest.approx(ref, abs=TOL)
    np.testing.assert_allclose(float(train), float(expected), rtol=1e-6)
    assert_trees_close(grads, expected_grads)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 20)])
def test_relative_position_buckets_match_transformers(bidirectional, num_buckets, max_distance):
    relative = torch.arange(-3000, 3000)
    ref = HFT5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    ).numpy()
    ours = relative_position_buckets(
        relative.numpy(),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name", ["t5-small", "t5-base", "t5-large", "flan-t5-large", "tiny"])
def test_preset_parameter_count_matches_transformers(name):
    cfg = T5Config.preset(name)
    with torch.device("meta"):
        hf = T5ForConditionalGeneration(HFT5Config(**cfg.to_hf_dict()))
    # transformers 5 builds every T5 with lm_head tied to shared (an untied head exists
    # only when a checkpoint brings its own): count the untied head ourselves.
    assert hf.lm_head.weight is hf.shared.weight
    hf_count = sum(p.numel() for p in hf.parameters())  # shared tensors counted once
    if not cfg.tie_word_embeddings:
        hf_count += cfg.vocab_size * cfg.d_model
    abstract = nnx.eval_shape(lambda: T5(cfg, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert ours == hf_count


def test_parameters_carry_logical_axes():
    model = nnx.eval_shape(lambda: T5(T5Config.preset("tiny"), rngs=nnx.Rngs(0)))
    flat = {path_to_str(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert logical_axes(flat["decoder/layers/cross_attn/q_proj/kernel"]) == (
        "layers",
        "embed",
        "heads",
    )
    assert logical_axes(flat["encoder/layers/mlp/wo/kernel"]) == ("layers", "mlp", "embed")
    assert logical_axes(flat["shared/embedding"]) == ("vocab", "embed")
    assert logical_axes(flat["lm_head/kernel"]) == ("embed", "vocab")
    for path, var in flat.items():
        axes = logical_axes(var)
        assert axes is not None and len(axes) == var.ndim, path
        assert (axes[0] == "layers") == ("/layers/" in path), path


def test_config_validation_names_the_field():
    base = T5Config.preset("t5-small").to_hf_dict()
    with pytest.raises(ValueError, match="feed_forward_proj.*'gated-swish'"):
        T5Config.from_hf_dict({**base, "feed_forward_proj": "gated-swish"})
    with pytest.raises(ValueError, match="dense_act_fn"):
        T5Config.from_hf_dict({**base, "dense_act_fn": "gelu"})
    missing = {k: v for k, v in base.items() if k != "d_kv"}
    with pytest.raises(ValueError, match="'d_kv'"):
        T5Config.from_hf_dict(missing)
    with pytest.raises(ValueError, match="num_heads"):
        T5Config.from_hf_dict({**base, "num_heads": 0})
    with pytest.raises(ValueError, match="unknown T5 preset 't5-xxl'"):
        T5Config.preset("t5-xxl")
    # v1.0 files (no scale_decoder_outputs) rescale exactly when they tie.
    legacy = {k: v for k, v in base.items() if k != "scale_decoder_outputs"}
    assert T5Config.from_hf_dict(legacy).scale_decoder_outputs
    untied = T5Config.from_hf_dict({**legacy, "tie_word_embeddings": False})
    assert not untied.scale_decoder_outputs and not untied.tie_word_embeddings


# config.json of google/flan-t5-large and (task_specific_params left out) t5-large on
# the Hugging Face hub: the presets and the strict field check must accept them as is.
FLAN_T5_LARGE_CONFIG = {
    "architectures": ["T5ForConditionalGeneration"],
    "d_ff": 2816,
    "d_kv": 64,
    "d_model": 1024,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "n_positions": 512,
    "num_decoder_layers": 24,
    "num_heads": 16,
    "num_layers": 24,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.23.1",
    "use_cache": True,
    "vocab_size": 32128,
}
T5_LARGE_CONFIG = {
    "architectures": ["T5ForConditionalGeneration"],
    "d_ff": 4096,
    "d_kv": 64,
    "d_model": 1024,
    "decoder_start_token_id": 0,
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "n_positions": 512,
    "num_heads": 16,
    "num_layers": 24,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_num_buckets": 32,
    "task_specific_params": {"translation_en_to_de": {"prefix": "translate English to German: "}},
    "vocab_size": 32128,
}


def test_published_configs_parse_to_the_presets():
    assert T5Config.from_hf_dict(FLAN_T5_LARGE_CONFIG) == T5Config.preset("flan-t5-large")
    assert T5Config.from_hf_dict(T5_LARGE_CONFIG) == T5Config.preset("t5-large")


def test_unsupported_config_fields_are_named():
    with pytest.raises(ValueError, match=r"unsupported T5 field\(s\) \['rotary_dim'\]"):
        T5Config.from_hf_dict({**T5_LARGE_CONFIG, "rotary_dim": 64})
    with pytest.raises(ValueError, match="'is_decoder'=True"):
        T5Config.from_hf_dict({**T5_LARGE_CONFIG, "is_decoder": True})


def test_bfloat16_policy_stays_close_to_float32(tmp_path):
    hf = build_hf_t5(tmp_path, proj="gated-gelu", tied=False)
    model, cfg = load_hf_checkpoint(tmp_path, policy=DTypePolicy("bfloat16", "bfloat16"))
    assert model.encoder.layers.mlp.wi_0.kernel[...].dtype == jnp.bfloat16
    ids, mask, dec, dec_mask = padded_batch()
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec),
            decoder_attention_mask=torch.tensor(dec_mask),
        ).logits.numpy()
    _, logits = _forward(model, *map(jnp.asarray, (ids, mask, dec, dec_mask)))
    assert logits.dtype == jnp.float32
    real = dec_mask.astype(bool)
    error = np.abs(np.asarray(logits)[real] - ref[real]).max()
    assert error < 0.03 * np.abs(ref[real]).max()


@nnx.jit
def _train_logits(model: T5, ids, dec, key):
    return model(ids, None, dec, dropout_key=key)


def test_dropout_only_with_a_key():
    model = T5(T5Config.preset("tiny", dropout_rate=0.3), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(2, 256, (2, 12)))
    dec = jnp.asarray(rng.integers(2, 256, (2, 5)))
    # rbg keys, as t5x uses for dropout: on CPU the threefry default compiles this
    # forward pass in ~11 s instead of ~2.5 s.
    key = jax.random.key(0, impl="rbg")
    first, again = _train_logits(model, ids, dec, key), _train_logits(model, ids, dec, key)
    other = _train_logits(model, ids, dec, jax.random.key(1, impl="rbg"))
    clean = _train_logits(model, ids, dec, None)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))  # reproducible
    assert not np.allclose(first, other, atol=1e-3)  # the key matters
    assert not np.allclose(first, clean, atol=1e-3)  # dropout is on with a key
    np.testing.assert_allclose(clean, model(ids, None, dec), atol=1e-5)  # none without one


def test_dropout_keeps_the_expected_value():
    x = jnp.ones((200_000,))
    y = np.asarray(dropout(x, 0.1, jax.random.key(0)))
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.9], rtol=1e-6)
    assert abs((y == 0).mean() - 0.1) < 0.005
    assert abs(y.mean() - 1.0) < 0.01
    np.testing.assert_array_equal(np.asarray(dropout(x, 0.1, None)), np.asarray(x))
