"""LLaMA-2-7B (bfloat16) on order 2 with every method's published hyperparameters
(cljax/published.py): `cljax run experiments/configs/llama2_7b_order2.py method.name=osf`.
Needs $CLJAX_LLAMA2_7B (HF checkpoint + tokenizer directory) and $CLJAX_DATA_DIR."""

from cljax.config import Config
from cljax.published import llama2_7b


def get_config() -> Config:
    return llama2_7b(order=2)
