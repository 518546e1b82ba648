"""The embedded demo: the built-in synthetic benchmark (3 procedurally generated tasks,
no files needed) with a tiny LLaMA trained from scratch, through SeqFT, OSF, GORP,
O-LoRA and MTL:

    cljax run experiments/configs/demo.py --methods seqft,osf,gorp,olora,mtl

(``make demo``). Sizes are chosen so that all five methods finish in a few minutes on
a 2-core CPU. The model starts from random weights, not from a pretrained LM, so the
LoRA-based methods adapt every projection (rank 16) rather than only q and v, and the
learning rates are a from-scratch tiny model's, not the published fine-tuning ones.
"""

from cljax.config import Config

ALL_PROJECTIONS = [r"attn/[qkvo]_proj$", r"mlp/(gate|up|down)_proj$"]


def get_config() -> Config:
    cfg = Config()
    cfg.model.family = "llama"
    cfg.model.preset = "tiny"
    cfg.data.source = "synthetic"
    cfg.data.order = "topic,sentiment,entailment"
    cfg.data.train_per_class = 96
    cfg.data.test_per_class = 16
    cfg.data.tokenizer = "bpe"
    cfg.data.length_buckets = [96]
    cfg.train.batch_size = 16
    cfg.train.epochs = 12
    cfg.train.learning_rate = 2e-3
    lora = {
        "method.options.lora_targets": ALL_PROJECTIONS,
        "method.options.lora_rank": 16,
        "method.options.lora_dropout": 0.0,
    }
    cfg.method.per_method = {
        "olora": lora,
        "gorp": {**lora, "method.options.full_learning_rate": 1e-3},
    }
    cfg.eval.mode = "rank"
    cfg.eval.batch_size = 64
    cfg.run.name = "demo"
    cfg.run.out_dir = "runs"
    cfg.run.checkpoint_every_steps = 0
    return cfg
