"""T5-large on order 3 with every method's published hyperparameters
(cljax/published.py): `cljax run experiments/configs/t5_large_order3.py method.name=osf`
or `--methods seqft,osf,...`. Needs $CLJAX_T5_LARGE (HF checkpoint + tokenizer
directory) and $CLJAX_DATA_DIR (the full benchmark)."""

from cljax.config import Config
from cljax.published import t5_large


def get_config() -> Config:
    return t5_large(order=3)
