"""The tiny pretrained LLaMA base of the demo (230 k parameters, 0.9 MB in float32),
written to ``runs/bases/tiny-llama/model`` and committed as
``experiments/bases/tiny-llama`` (see its README for the numbers and checksums):

    cljax pretrain experiments/configs/pretrain_tiny.py

About 4.5 minutes on a 2-core CPU (1500 language-model steps over 3 M tokens, then 200
instruction steps).

Corpus: the training sentences of every benchmark dataset here except the order-1-like
tasks it is evaluated on (dbpedia, amazon, yelp, agnews; yahoo has no files), i.e. IMDB,
SST-2, MNLI, CB, RTE, QQP, BoolQA, MultiRC, WiC, COPA. Then an instruction stage on those
ten tasks in the benchmark's prompt format, so that the base knows the prompt/answer
layout before it meets the demo's tasks.
"""

from cljax.config import Config

EVALUATED = "dbpedia,amazon,yelp,agnews,yahoo"


def get_config() -> Config:
    cfg = Config()
    cfg.model.family = "llama"
    cfg.model.preset = "tiny"
    cfg.model.overrides = {
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    cfg.data.tokenizer = "bpe"
    cfg.data.max_source_length = 192
    cfg.data.length_buckets = [96, 192, 256]
    cfg.pretrain.evaluated_order = EVALUATED
    cfg.pretrain.tokenizer_vocab_size = 1024
    cfg.pretrain.sequence_length = 128
    cfg.pretrain.steps = 1500
    cfg.pretrain.instruction_steps = 200
    cfg.pretrain.instruction_train_per_class = 150
    cfg.pretrain.instruction_test_per_class = 25
    cfg.train.batch_size = 32
    cfg.train.learning_rate = 3e-3
    cfg.train.schedule = "cosine"
    cfg.train.warmup_steps = 50
    cfg.train.weight_decay = 0.01
    cfg.eval.mode = "rank"
    cfg.eval.batch_size = 64
    cfg.run.out_dir = "runs/bases"
    cfg.run.name = "tiny-llama"
    cfg.run.checkpoint_every_steps = 250
    return cfg
