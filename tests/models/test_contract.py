"""Every built-in model meets its architecture's protocol (cljax.models.contract)."""

import pytest
from flax import nnx

from cljax.cl.backbone import get_family
from cljax.models.contract import DecoderOnly, EncoderDecoder


@pytest.mark.parametrize(
    "family, protocol",
    [
        ("llama", DecoderOnly),
        ("mistral", DecoderOnly),
        ("qwen2", DecoderOnly),
        ("t5", EncoderDecoder),
    ],
)
def test_models_meet_their_architectures_protocol(family, protocol):
    record = get_family(family)
    cfg = record.config_class.preset("tiny")
    model = nnx.eval_shape(lambda: record.model_class(cfg, rngs=nnx.Rngs(0)))
    assert isinstance(model, protocol)
    other = EncoderDecoder if protocol is DecoderOnly else DecoderOnly
    assert not isinstance(model, other)
    assert record.format == ("decoder" if protocol is DecoderOnly else "seq2seq")
