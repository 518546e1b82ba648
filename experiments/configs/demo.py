"""The demo: the built-in synthetic benchmark (3 procedurally generated tasks, no files
needed) learned in sequence from the tiny pretrained LLaMA base committed under
``experiments/bases/tiny-llama`` (made by ``cljax pretrain
experiments/configs/pretrain_tiny.py`` from benchmark text), through SeqFT, OSF, GORP,
O-LoRA and MTL:

    cljax run experiments/configs/demo.py --methods seqft,osf,gorp,olora,mtl

(``make demo``). Sizes keep the five runs within about 3.5 minutes on a 2-core CPU; the
printed comparison ends with a line of plain words per method, derived from its
accuracy matrix. The LoRA-based methods adapt every projection (rank 16): at this model
size, q and v alone learn the tasks too slowly for a demo; O-LoRA learns at 3e-3 (task 1
at 99% and 94% of SeqFT's with seeds 7 and 11; 5e-3 gave 82% and 54%, 2e-3 95% with
seed 7). Settings were chosen on runs with ``data.seed=7 train.seed=7`` and
``data.seed=11 train.seed=11`` (other synthetic samples), not on the demo's own.
"""

from pathlib import Path

from cljax.config import Config

BASE = Path(__file__).resolve().parents[1] / "bases" / "tiny-llama"
ALL_PROJECTIONS = [r"attn/[qkvo]_proj$", r"mlp/(gate|up|down)_proj$"]


def get_config() -> Config:
    cfg = Config()
    cfg.model.family = "llama"
    cfg.model.checkpoint = str(BASE)
    cfg.data.source = "synthetic"
    cfg.data.order = "topic,sentiment,entailment"
    cfg.data.train_per_class = 48
    cfg.data.test_per_class = 32
    cfg.data.tokenizer = str(BASE)
    cfg.data.max_source_length = 128
    cfg.data.length_buckets = [144]
    cfg.train.batch_size = 8
    cfg.train.epochs = 9
    cfg.train.learning_rate = 2e-3
    lora = {
        "method.options.lora_targets": ALL_PROJECTIONS,
        "method.options.lora_rank": 16,
        "method.options.lora_dropout": 0.0,
    }
    cfg.method.per_method = {
        "olora": {**lora, "train.learning_rate": 3e-3},
        "gorp": {**lora, "method.options.full_learning_rate": 1e-3},
    }
    cfg.eval.mode = "rank"
    cfg.eval.batch_size = 64
    cfg.run.name = "demo"
    cfg.run.out_dir = "runs"
    cfg.run.checkpoint_every_steps = 0
    return cfg
