"""The embedded demo: the built-in synthetic benchmark (3 procedurally generated tasks,
no files needed) with a tiny LLaMA trained from scratch.

    cljax run experiments/configs/demo.py --methods seqft,osf,gorp,olora,mtl

(``make demo``). Sizes are chosen so that all five methods finish in a few minutes on
a 2-core CPU; learning rates are those of a from-scratch tiny model, not the published
fine-tuning ones.
"""

from cljax.config import Config


def get_config() -> Config:
    cfg = Config()
    cfg.model.family = "llama"
    cfg.model.preset = "tiny"
    cfg.data.source = "synthetic"
    cfg.data.order = "topic,sentiment,entailment"
    cfg.data.train_per_class = 96
    cfg.data.test_per_class = 16
    cfg.data.tokenizer = "bpe"
    cfg.train.batch_size = 16
    cfg.train.epochs = 2
    cfg.train.learning_rate = 3e-3
    cfg.eval.mode = "rank"
    cfg.eval.batch_size = 64
    cfg.eval.max_new_tokens = 8
    cfg.run.name = "demo"
    cfg.run.out_dir = "runs"
    cfg.run.checkpoint_every_steps = 0
    return cfg
