"""T5 conversion both ways (HF directory <-> cljax) through ``cljax.models.convert``:
round trip back to transformers, the tied / untied output layer as transformers decides
it, and bad checkpoints that fail naming the tensor or field at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import T5ForConditionalGeneration

from cljax.errors import CheckpointError
from cljax.models.convert import export_hf_checkpoint, load_hf_checkpoint
from tests.models.test_t5 import build_hf_t5, padded_batch


@pytest.fixture(scope="module")
def v11_dir(tmp_path_factory) -> Path:
    """A v1.1 / Flan-style checkpoint: gated-gelu, separate lm_head."""
    directory = tmp_path_factory.mktemp("t5-v11")
    build_hf_t5(directory, proj="gated-gelu", tied=False)
    return directory


@pytest.fixture(scope="module")
def v10_dir(tmp_path_factory) -> Path:
    """A v1.0-style checkpoint: relu, lm_head tied to the shared embedding."""
    directory = tmp_path_factory.mktemp("t5-v10")
    build_hf_t5(directory, proj="relu", tied=True)
    return directory


def hf_logits(directory: Path) -> np.ndarray:
    hf = T5ForConditionalGeneration.from_pretrained(directory).eval()
    ids, mask, dec, dec_mask = padded_batch()
    with torch.no_grad():
        logits = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec),
            decoder_attention_mask=torch.tensor(dec_mask),
        ).logits
    return logits.numpy()[dec_mask.astype(bool)]


def copy_checkpoint(src: Path, dst: Path, *, edit_tensors=None, edit_config=None) -> Path:
    """A copy of a checkpoint directory with its tensors and/or config.json edited."""
    shutil.copytree(src, dst)
    if edit_tensors is not None:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        raw = json.loads((dst / "config.json").read_text())
        edit_config(raw)
        (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize("which", ["v10_dir", "v11_dir"])
def test_round_trip_back_to_transformers(which, request, tmp_path):
    source: Path = request.getfixturevalue(which)
    model, cfg = load_hf_checkpoint(source)
    exported = export_hf_checkpoint(model, cfg, tmp_path / "exported")
    # Same tensors, bit for bit, under the same names (tied copies are not duplicated).
    original, written = (
        load_file(source / "model.safetensors"),
        load_file(exported / "model.safetensors"),
    )
    assert sorted(written) == sorted(original)
    for name, array in original.items():
        np.testing.assert_array_equal(written[name], array, err_msg=name)
    # transformers reads the export back as the same model.
    np.testing.assert_allclose(hf_logits(exported), hf_logits(source), atol=1e-5, rtol=0)
    again, cfg_again = load_hf_checkpoint(exported)
    assert cfg_again == cfg


def test_transformers5_layout_untied_head(v11_dir, tmp_path):
    """transformers 5 saves a loaded Flan-T5 with ``tie_word_embeddings: true`` and
    ``scale_decoder_outputs: false`` beside a distinct lm_head: still untied."""
    resaved = tmp_path / "resaved"
    T5ForConditionalGeneration.from_pretrained(v11_dir).save_pretrained(resaved)
    raw = json.loads((resaved / "config.json").read_text())
    assert raw["tie_word_embeddings"] is True and raw["scale_decoder_outputs"] is False
    _, cfg = load_hf_checkpoint(resaved)
    assert not cfg.tie_word_embeddings and not cfg.scale_decoder_outputs


def test_tied_copies_are_checked(v10_dir, tmp_path):
    def add_copies(tensors):
        tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].copy()
        tensors["lm_head.weight"] = tensors["shared.weight"].copy()

    _, cfg = load_hf_checkpoint(
        copy_checkpoint(v10_dir, tmp_path / "copies", edit_tensors=add_copies)
    )
    assert cfg.tie_word_embeddings and cfg.scale_decoder_outputs

    def bad_copy(tensors):
        tensors["decoder.embed_tokens.weight"] = tensors["shared.weight"] + 1.0

    bad = copy_checkpoint(v10_dir, tmp_path / "bad", edit_tensors=bad_copy)
    with pytest.raises(CheckpointError, match="'decoder.embed_tokens.weight' differs"):
        load_hf_checkpoint(bad)


def test_cross_attention_bias_of_old_checkpoints_is_skipped(v10_dir, tmp_path):
    name = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"

    def add(tensors):
        tensors[name] = np.zeros((8, 4), np.float32)

    model, _ = load_hf_checkpoint(copy_checkpoint(v10_dir, tmp_path / "old", edit_tensors=add))
    assert model.decoder.relative_bias.shape == (8, 4)


def test_missing_tensor_is_named(v11_dir, tmp_path):
    name = "decoder.block.2.layer.1.EncDecAttention.k.weight"
    broken = copy_checkpoint(v11_dir, tmp_path / "missing", edit_tensors=lambda t: t.pop(name))
    with pytest.raises(
        CheckpointError, match=f"missing tensor '{name}'.*decoder.layers.cross_attn.k_proj"
    ):
        load_hf_checkpoint(broken)


def test_missing_untied_head_is_named(v11_dir, tmp_path):
    broken = copy_checkpoint(
        v11_dir, tmp_path / "nohead", edit_tensors=lambda t: t.pop("lm_head.weight")
    )
    with pytest.raises(CheckpointError, match="missing tensor 'lm_head.weight'"):
        load_hf_checkpoint(broken)


def test_misshaped_tensor_is_named(v11_dir, tmp_path):
    name = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"

    def shrink(tensors):
        tensors[name] = tensors[name][:40]

    broken = copy_checkpoint(v11_dir, tmp_path / "shape", edit_tensors=shrink)
    with pytest.raises(
        CheckpointError, match=rf"'{name}' has shape \(40, 32\), expected \(48, 32\)"
    ):
        load_hf_checkpoint(broken)


def test_relu_weights_under_a_gated_config_fail(v10_dir, tmp_path):
    def gated(raw):
        raw.update(feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)

    broken = copy_checkpoint(v10_dir, tmp_path / "gated", edit_config=gated)
    with pytest.raises(
        CheckpointError, match="missing tensor 'encoder.block.0.layer.1.DenseReluDense.wi_0"
    ):
        load_hf_checkpoint(broken)


def test_unknown_feed_forward_proj_is_named(v11_dir, tmp_path):
    broken = copy_checkpoint(
        v11_dir,
        tmp_path / "proj",
        edit_config=lambda raw: raw.update(feed_forward_proj="gated-swish"),
    )
    with pytest.raises(CheckpointError, match=r"config\.json.*'feed_forward_proj'='gated-swish'"):
        load_hf_checkpoint(broken)
