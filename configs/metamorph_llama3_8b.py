"""MetaMorph at the reference scale: LLaMA-3.1-8B-Instruct + SigLIP SO400M/14@384, 64 visual
tokens, on 8 to 256 accelerators.

  python -m train --config configs/metamorph_llama3_8b.py:vpit --workdir runs/llama3_8b/vpit \\
      --config.data.data_dir=DATA --config.data.name=NAME

The config argument is ``STAGE[,key=value...]``: STAGE in connector, vpit; keys
``devices`` (accelerators, default 8), ``tensor`` (tensor-parallel size, default 1) and
``rows`` (rows per batch shard, i.e. per data x fsdp slice, in one micro-batch, default 1). They fix the mesh
(data 1 x fsdp -1 x tensor) and ``train.micro_batches = 1536 * tensor / (devices * rows)``,
so the global batch stays 1536 rows of 4096 tokens whatever the device count, e.g.
``:vpit,devices=64`` -> 24 micro-batches of 64 rows. Any field can still be overridden with
``--config.FIELD=VALUE``.

What must exist first:
  * ``checkpoints/llama3.1-8b``: LLaMA-3.1-8B-Instruct (a downloaded transformers folder of
    ``meta-llama/Llama-3.1-8B-Instruct``, or that folder converted by
    ``python -m metamorph.convert llm HF_FOLDER checkpoints/llama3.1-8b``; ``model.llm_init``).
  * ``checkpoints/siglip-so400m-patch14-384``: ``google/siglip-so400m-patch14-384`` as a
    transformers folder, or converted by ``python -m metamorph.convert siglip HF_FOLDER DST``
    (``model.siglip_init``).
  * the data: a TFDS dataset of conversation records (``data.data_dir``, ``data.name``),
    tokenised with LLaMA-3's own tokenizer (``data.tokenizer = ""``).
  * for ``vpit``: the connector run, ``runs/llama3_8b/connector`` (``init_from``).

The architecture fields below are exactly the released models', so
``make_setup(config, load_weights=False)`` builds the abstract train state and its
shardings without any of those files (memory planning, tests).

Hyper-parameters (DESIGN.md): AdamW, lr 5e-5 (reference 4e-5..7e-5) with 3% linear warmup
and cosine decay to 0, weight decay 0, global-norm clipping 1.0, bfloat16 compute with
float32 master weights, full rematerialisation of the decoder layers, max length 4096,
global batch 1536. Stage 1 (connector) trains the projector and the new token rows at lr 1e-3.
"""
from train.defaults import base_config

GLOBAL_BATCH = 1536
_ARGS = {"devices": 8, "tensor": 1, "rows": 1}
# stage -> its fields: stage 1 trains the projector and the new token rows at a high lr (DESIGN.md)
PER_STAGE = {"connector": {"optim.lr": 1e-3, "init_from": ""},
             "vpit": {"init_from": "runs/llama3_8b/connector"}}


def _parse(arg: str) -> tuple[str, dict[str, int]]:
  stage, *pairs = [p.strip() for p in arg.split(",")]
  values = dict(_ARGS)
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or key not in values:
      raise ValueError(f"configs/metamorph_llama3_8b.py: bad argument {pair!r}; use "
                       f"STAGE[,key=value...] with keys {sorted(values)}")
    values[key] = int(value)
  if stage not in PER_STAGE:
    raise ValueError(f"configs/metamorph_llama3_8b.py: stage {stage!r}; use connector or vpit")
  return stage, values


def get_config(arg: str = "vpit"):
  stage, a = _parse(arg)
  shards = a["devices"] // a["tensor"]     # the batch is split over data x fsdp = devices / tensor
  if a["devices"] % a["tensor"] or GLOBAL_BATCH % (shards * a["rows"]):
    raise ValueError(f"configs/metamorph_llama3_8b.py: {GLOBAL_BATCH} rows do not split into "
                     f"micro-batches of {a['rows']} row(s) on each of {shards} batch shards")

  c = base_config()
  c.stage = stage

  # --- LLaMA-3.1-8B-Instruct -----------------------------------------------------------
  c.model.llm_init = "checkpoints/llama3.1-8b"
  c.model.llm.vocab_size = 128256
  c.model.llm.hidden_size = 4096
  c.model.llm.intermediate_size = 14336
  c.model.llm.num_layers = 32
  c.model.llm.num_heads = 32
  c.model.llm.num_kv_heads = 8
  c.model.llm.head_dim = 128
  c.model.llm.rms_norm_eps = 1e-5
  c.model.llm.rope_theta = 500000.0
  c.model.llm.rope_scaling = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192)
  c.model.llm.max_position_embeddings = 131072
  c.model.llm.tie_word_embeddings = False

  # --- SigLIP SO400M/14@384 (27x27 patches) --------------------------------------------
  c.model.siglip_init = "checkpoints/siglip-so400m-patch14-384"
  c.model.siglip.vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                               num_attention_heads=16, image_size=384, patch_size=14,
                               layer_norm_eps=1e-6, vision_use_head=True)
  c.model.num_visual_tokens = 64
  c.model.vision_coef = 1.0
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"

  # --- data ------------------------------------------------------------------------------
  c.data.tokenizer = ""       # LLaMA-3's own
  c.data.image_size = 384
  c.data.seq_len = 4096
  c.data.images_per_row = 16
  c.data.num_threads = 8

  # --- optimisation ------------------------------------------------------------------------
  c.optim.lr = 5e-5
  c.optim.warmup_frac = 0.03
  c.optim.final_lr_frac = 0.0
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0

  c.train.steps = 5000          # set from the data: records / 1536 per epoch
  c.train.batch_size = GLOBAL_BATCH
  c.train.micro_batches = GLOBAL_BATCH // (shards * a["rows"])
  c.train.log_every = 10
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = a["tensor"]
  c.update_from_flattened_dict(PER_STAGE[stage])
  return c
