"""The small pretrained bases of the CPU experiment (a few million parameters each):

    cljax pretrain experiments/configs/pretrain_small.py:llama
    cljax pretrain experiments/configs/pretrain_small.py:t5

One base per family serves both continual orders of ``cpu_pretrained.py`` (``ORDERS``):
its corpus leaves out every task of either order (and yahoo, which has no files), so it
is the text of IMDB, SST-2, CB, MultiRC, WiC and COPA (1.65 M tokens with the 4096-token
BPE, whose training also counts every benchmark task's prompt template and option
names), followed by an instruction stage on those six tasks. Steps are sized for about
45 minutes per base on a 2-core CPU, from a probe of 30 steps: 1.04 s per 32 x
128-token step for LLaMA, 1.50 s for T5, and about 2.4 s for the instruction stage's
longer prompts.
"""

from cljax.config import Config

ORDERS = {
    "order1": "dbpedia,amazon,yelp,agnews",  # order 1 with yelp for yahoo
    # order 4's relative order over the offline tasks not in the long corpus
    "long": "MNLI,QQP,BoolQA,RTE,yelp,amazon,dbpedia,agnews",
}

SHAPES = {
    "llama": {
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 16,  # attention 128 wide: 4.85 M parameters
        "max_position_embeddings": 512,
    },
    "t5": {
        "d_model": 256,
        "d_kv": 32,
        "d_ff": 768,
        "num_layers": 4,
        "num_decoder_layers": 4,
        "num_heads": 8,
    },
}


def get_config(family: str = "llama") -> Config:
    if family not in SHAPES:
        raise ValueError(f"pretrain_small: family {family!r}; valid: llama, t5")
    cfg = Config()
    cfg.model.family = family
    cfg.model.preset = "tiny"
    cfg.model.overrides = dict(SHAPES[family])
    cfg.data.tokenizer = "bpe"
    cfg.data.max_source_length = 256
    cfg.data.length_buckets = [128, 256, 320]
    cfg.pretrain.evaluated_order = ",".join(
        sorted({*ORDERS["order1"].split(","), *ORDERS["long"].split(","), "yahoo"})
    )
    cfg.pretrain.tokenizer_vocab_size = 4096
    cfg.pretrain.sequence_length = 128
    cfg.pretrain.steps = {"llama": 2000, "t5": 1300}[family]
    cfg.pretrain.instruction_steps = 200
    cfg.pretrain.instruction_train_per_class = 300
    cfg.pretrain.instruction_test_per_class = 50
    cfg.train.batch_size = 32
    cfg.train.learning_rate = 2e-3
    cfg.train.schedule = "cosine"
    cfg.train.warmup_steps = 100
    cfg.train.weight_decay = 0.01
    cfg.eval.mode = "rank"
    cfg.eval.batch_size = 64
    cfg.run.out_dir = "runs/bases"
    cfg.run.name = f"small-{family}"
    cfg.run.checkpoint_every_steps = 250
    return cfg
