"""LLaMA-like variants against transformers: Mistral (sliding-window attention) and Qwen2
(q/k/v biases, rope theta 1e6) load from their checkpoint directories with logit parity
under padding, export back to directories transformers reads as the same model, and
decode greedily token for token as transformers does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from transformers import MistralConfig as HFMistralConfig
from transformers import Qwen2Config as HFQwen2Config

from cljax.cl.backbone import get_family
from cljax.models import generate as gen
from cljax.models.convert import export_hf_checkpoint, family_for_config, load_hf_checkpoint
from cljax.models.mistral import MistralConfig
from cljax.models.qwen2 import Qwen2Config
from tests.models.test_generate import hf_greedy, prompts_of
from tests.models.test_llama import HF_TINY, hf_logits, padded_batch, perturbed

VARIANTS = {
    # window 5 < the 24-token rows of padded_batch and the longest prompts below
    "mistral": (MistralForCausalLM, HFMistralConfig, MistralConfig, {"sliding_window": 5}),
    "qwen2": (Qwen2ForCausalLM, HFQwen2Config, Qwen2Config, {"rope_theta": 1e6}),
}


def hf_variant(name: str, seed: int = 0) -> torch.nn.Module:
    model_class, config_class, _, extra = VARIANTS[name]
    return perturbed(model_class, config_class(**HF_TINY, **extra), seed)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def loaded(request, tmp_path_factory):
    """(name, transformers model, cljax model loaded from its directory, config)."""
    name = request.param
    hf = hf_variant(name)
    directory = tmp_path_factory.mktemp(name)
    hf.save_pretrained(directory)
    model, cfg = load_hf_checkpoint(directory)
    return name, hf, model, cfg


def test_loads_as_its_own_family_with_logit_parity_under_padding(loaded):
    name, hf, model, cfg = loaded
    assert type(cfg) is VARIANTS[name][2]
    assert family_for_config(cfg).model_type == name
    assert get_family(name).config_class is VARIANTS[name][2]
    ids, mask = padded_batch(cfg.vocab_size, seed=2)
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask)))
    theirs = hf_logits(hf, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=1e-4)


def test_exports_back_to_the_same_transformers_model(loaded, tmp_path):
    name, hf, model, cfg = loaded
    export_hf_checkpoint(model, cfg, tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(again) is VARIANTS[name][0]
    ids, mask = padded_batch(cfg.vocab_size, seed=3)
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        hf_logits(again, ids, mask)[valid], hf_logits(hf, ids, mask)[valid], atol=1e-5
    )


def test_greedy_generation_equals_transformers(loaded):
    name, hf, model, cfg = loaded
    prompts = prompts_of((3, 11, 7), seed=5, vocab=cfg.vocab_size)
    ours = gen.generate_llama(model, prompts, 9, eos_token_ids=(), pad_token_id=0).as_lists()
    assert ours == hf_greedy(hf, prompts, 9, eos=-1)


def test_variant_presets_have_their_published_shapes():
    qwen = Qwen2Config.preset("qwen2.5-0.5b")
    model = nnx.eval_shape(lambda: get_family("qwen2").model_class(qwen, rngs=nnx.Rngs(0)))
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert round(params / 1e6) == 494  # Qwen2.5-0.5B: 0.49 B parameters
    mistral = MistralConfig.preset("mistral-7b")
    assert (mistral.sliding_window, mistral.num_key_value_heads) == (4096, 8)


@pytest.mark.parametrize("family", sorted(VARIANTS))
def test_runs_in_the_continual_loop(tmp_path, family):
    from cljax.cl import loop
    from tests.cl.test_loop import tiny_config

    loop.run_experiment(tiny_config(tmp_path, family, "olora"), log=lambda _: None)
    assert (tmp_path / f"{family}-olora" / "accuracy.json").is_file()
