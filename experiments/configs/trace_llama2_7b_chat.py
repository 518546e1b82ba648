"""LLaMA-2-7B-chat on TRACE, the OSF paper's decoder-only setting (cljax/published.py):
`cljax run experiments/configs/trace_llama2_7b_chat.py method.name=osf`.
Needs $CLJAX_LLAMA2_7B_CHAT (HF checkpoint + tokenizer directory with its chat template)
and $CLJAX_TRACE_DIR (TRACE's released data: one directory per task)."""

from cljax.config import Config
from cljax.published import trace_llama2_7b_chat


def get_config() -> Config:
    return trace_llama2_7b_chat()
