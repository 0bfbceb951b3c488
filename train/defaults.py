"""Every field of a training config, with its default. Config files start from
``base_config()`` and override what they need; the command line overrides any
field (``--config.optim.lr=3e-5``)."""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "vpit"          # a stage of train.stages.STAGES: what trains, on what, with which loss
  c.seed = 0

  # --- tuning mode ----------------------------------------------------------------
  c.tuning = ml_collections.ConfigDict()
  c.tuning.mode = "full"    # a mode of train.tuning.MODES: how the stage's parameters train
                            # (full | frozen_llm | lora); each mode reads only its own sub-dict
  c.tuning.lora = ml_collections.ConfigDict()  # mode "lora": adapters on the LLM's projections
  c.tuning.lora.rank = 16       # r of each adapter (1 .. the projection's smaller side)
  c.tuning.lora.alpha = 16.0    # the update is scaled by alpha / rank
  c.tuning.lora.dropout = 0.05  # on the adapter's input while training, in [0, 1)
  c.tuning.lora.targets = "q_proj,k_proj,v_proj,o_proj"  # MLP too: ",gate_proj,up_proj,down_proj"
  c.tuning.lora.from_peft = ""  # a PEFT LoRA folder (e.g. an earlier run's WORKDIR/model/lora) to start
                                # the adapters from; its r, alpha and targets must equal the above

  # --- model -------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.llm_init = ""         # .gguf file, transformers folder, our LLM folder, or "" (random, from llm)
  c.model.llm = ml_collections.ConfigDict()  # LlamaConfig fields when llm_init == ""
  c.model.siglip_init = ""      # a siglip-stage workdir, our SigLIP folder or a transformers folder
  c.model.siglip = ml_collections.ConfigDict()  # SiglipVisionConfig/SiglipTextConfig fields (siglip stage, random)
  c.model.visualizer = ml_collections.ConfigDict()  # visualizer stage: {"preset": "toy" | "sd15", **VisualizerConfig fields}
  c.model.visualizer_init = ""  # a diffusers Stable Diffusion folder or our converted one (UNet + VAE)
  c.model.visualizer_from = ""  # vpit: a visualizer-stage workdir, named in the export for sampling only
  c.model.num_visual_tokens = 16  # m tokens per image
  c.model.vision_coef = 1.0       # weight of the vision loss, in stages that have it (vpit; see train.stages)
  c.model.slot_embeddings = False  # a learned vector per visual-token slot after the projector
  c.model.dtype = "float32"       # compute dtype ("bfloat16" on accelerators)
  c.model.param_dtype = "float32"
  c.model.remat = "none"          # "none" | "full" | "dots" (save matmul outputs)

  # --- initialisation from another run -------------------------------------------------
  c.init_from = ""  # workdir of an earlier stage (e.g. the connector run for vpit); its latest params

  # --- data ----------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ""          # TFDS data_dir
  c.data.name = ""              # dataset name(s); "a,b" with data.weights "0.7,0.3" mixes them
  c.data.weights = ""
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.tokenizer = ""         # tokenizer folder; "" = the LLM's own
  c.data.image_size = 32
  c.data.seq_len = 256
  c.data.images_per_row = 4
  c.data.open_rows = 4          # rows packed at once: first fit (1: greedy, in order)
  c.data.text_len = 16          # siglip stage: caption tokens
  c.data.num_threads = 2        # grain read threads
  c.data.virtual_shards = 0     # record shards, each packed on its own (0: one per process);
                                # fixing it makes batches independent of the process count
  c.data.strict = False         # stop at the first bad record instead of counting it

  # --- optimisation --------------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.warmup_frac = 0.03
  c.optim.final_lr_frac = 0.0   # cosine decays to lr * final_lr_frac
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0       # global-norm clipping; 0 disables it

  # --- the run -------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.batch_size = 8        # global, in packed rows
  c.train.micro_batches = 1     # gradient accumulation: batch_size / micro_batches rows at a time
  c.train.log_every = 10
  c.train.eval_every = 0        # 0: no periodic evaluation
  c.train.eval_batches = 4
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 2
  c.train.async_checkpoints = True
  c.train.strict_checkpoints = False  # a damaged latest checkpoint stops the run (default: resume from
                                      # the newest intact one, with a warning; metamorph/checkpoint.py)
  c.train.peak_flops_per_device = 0.0  # for MFU; 0 = look up the device kind
  c.train.sample_every = 0      # visualizer stage: write originals next to reconstructions (PNG)

  # --- devices -------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1              # -1: all remaining devices
  c.mesh.tensor = 1
  c.mesh.cpu_devices = 0        # CPU-only hosts: XLA devices to split the cores into (0: one)
  return c
