"""The CPU test-bed on real benchmark data: every method, a small LLaMA and a small T5
trained from scratch, on the tasks of order 1 that exist offline.

    cljax run experiments/configs/cpu_testbed.py:llama \\
        --methods seqft,osf,gorp,seqlora,inclora,olora,ewc,l2,replay,mtl,pertaskft
    cljax run experiments/configs/cpu_testbed.py:t5 --methods (the same)

Choices (all for a 2-core CPU and about an hour for all methods and both models):
- Tasks: order 1 is dbpedia, amazon, yahoo, agnews; yahoo has no public files, so yelp
  (another 5-way review task, like amazon) takes its place: dbpedia, amazon, yelp,
  agnews. dbpedia has no train split and yelp no test split offline: a stratified,
  seeded half of the existing split is carved out as the missing one
  (``data.holdout_fraction``; recorded in each run's data.json).
- Per-class subsampling (seeded): 48 training and 12 test examples per class, so
  dbpedia has 672 / 168, amazon and yelp 240 / 60, agnews 192 / 48.
- Tokenizer: a byte-level BPE of 2048 tokens trained on the tasks' training prompts
  (cached); prompts cut to 160 tokens keeping the trailing "Answer:".
- Models from scratch (no checkpoints offline): LLaMA width 128, 2 layers; T5 width 128,
  2 + 2 layers. Because the base knows nothing, LoRA methods adapt every projection
  (rank 16) instead of only q and v; learning rates are a from-scratch model's.
- Training: 3 epochs per task, batch 16, AdamW, constant learning rate, clip 1.0.
- Evaluation: the protocol's greedy generation with normalised exact match (labels are
  at most a few tokens: 8 new tokens), on every task after every task.
"""

from cljax.config import Config

LLAMA_PROJECTIONS = [r"attn/[qkvo]_proj$", r"mlp/(gate|up|down)_proj$"]
T5_PROJECTIONS = [r"attn/[qkvo]_proj$", r"mlp/(wi|wi_0|wi_1|wo)$"]
METHODS = "seqft,osf,gorp,seqlora,inclora,olora,ewc,l2,replay,mtl,pertaskft"


def get_config(family: str = "llama") -> Config:
    cfg = Config()
    cfg.model.family = family
    cfg.model.preset = "tiny"
    if family == "llama":
        cfg.model.overrides = {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "head_dim": 32,
        }
        projections = LLAMA_PROJECTIONS
    elif family == "t5":
        cfg.model.overrides = {"d_model": 128, "d_kv": 32, "d_ff": 256, "num_heads": 4}
        projections = T5_PROJECTIONS
    else:
        raise ValueError(f"cpu_testbed: family {family!r}; valid: llama, t5")
    cfg.data.source = "json"
    cfg.data.order = "dbpedia,amazon,yelp,agnews"
    cfg.data.holdout_fraction = 0.5
    cfg.data.train_per_class = 48
    cfg.data.test_per_class = 12
    cfg.data.tokenizer = "bpe"
    cfg.data.tokenizer_vocab_size = 2048
    cfg.data.max_source_length = 160
    cfg.data.max_target_length = 16
    cfg.train.batch_size = 16
    cfg.train.epochs = 3
    cfg.train.learning_rate = 1e-3
    cfg.eval.mode = "generate"
    cfg.eval.batch_size = 64
    cfg.eval.max_new_tokens = 8
    lora = {
        "method.options.lora_targets": projections,
        "method.options.lora_rank": 16,
        "method.options.lora_dropout": 0.0,
        "train.learning_rate": 2e-3,
    }
    cfg.method.per_method = {name: dict(lora) for name in ("seqlora", "inclora", "olora", "gorp")}
    cfg.method.per_method["gorp"]["method.options.full_learning_rate"] = 1e-3
    cfg.method.per_method["ewc"] = {"method.options.strength": 1000.0}
    cfg.run.name = f"cpu_testbed-{family}"
    cfg.run.out_dir = "runs"
    cfg.run.checkpoint_every_steps = 0
    return cfg
