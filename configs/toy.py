"""The shapes world on a CPU: ``--config configs/toy.py:STAGE`` with STAGE in
siglip, visualizer, (language,) connector, vpit (in that order; each later stage reads
runs/demo/STAGE). Data: ``python -m metamorph.data.shapes --out runs/demo/world``.
``python -m train.demo`` (``make demo``) runs them from these settings."""
from train.defaults import base_config


def get_config(stage: str = "vpit"):
  c = base_config()
  c.stage = stage
  c.data.data_dir = "runs/demo/world/tfds"
  c.data.name = "shapes_world"
  c.data.tokenizer = "runs/demo/world/tokenizer"
  c.data.image_size = 32
  c.data.seq_len = 192
  c.data.images_per_row = 6
  c.data.text_len = 16

  c.model.num_visual_tokens = 16
  # Each visual token's slot (its grid cell) as a learned vector: the LLM need not infer left /
  # right from RoPE offsets (demo: understanding 79.4 -> 83.8%, two-object questions 79 -> 89%,
  # text-to-image 86.7 -> 89.3%; findings section 9)
  c.model.slot_embeddings = True
  c.model.llm.vocab_size = 512   # >= the world tokenizer; image tokens are already in it
  c.model.llm.hidden_size = 128
  c.model.llm.intermediate_size = 384
  c.model.llm.num_layers = 4
  c.model.llm.num_heads = 4
  c.model.llm.num_kv_heads = 2
  c.model.llm.head_dim = 32
  c.model.llm.tie_word_embeddings = True
  c.model.llm.max_position_embeddings = 512
  # std of the random init, 0.04 instead of 0.02: VPiT then learns to compare two words from the
  # mix's comparisons (the demo, on the same 247 questions: two images 65 -> 85%, two objects
  # 89 -> 77%, understanding 85.0 -> 89.1%); 0.06 learns it too, but two objects 57% (findings 11)
  c.model.llm.initializer_range = 0.04
  # 8 px patches: a 4 x 4 grid, one patch per visual token (m = 16, no pooling). Shape is then
  # linearly readable from the tokens at 94% after 1200 steps (4 px patches: 74%; 2.7x slower).
  # Attention within 2 x 2-patch windows (the image's quadrants; two objects never share one):
  # each token describes its own quadrant, so the LLM can bind an answer to one of two objects
  # (two-object questions 43 -> 83%; the visualizer redraws shape at 89% instead of 79.5%)
  c.model.siglip.vision = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                               num_attention_heads=4, image_size=32, patch_size=8, vision_use_head=True,
                               attention_window=2)
  c.model.siglip.text = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, vocab_size=512, max_position_embeddings=16)

  # data parallel over two XLA devices on a 2-core CPU: the visualizer trains 1.2x faster than
  # on one device (the demo's 400 steps: 351 -> 291 s); SigLIP and VPiT run about as fast
  c.mesh.data, c.mesh.fsdp, c.mesh.cpu_devices = -1, 1, 2

  c.optim.lr = 1e-3
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.eval_every = 100
  if stage == "siglip":
    c.data.train_split = "captions"  # the world's image-caption pairs
    c.optim.lr = 1e-3  # 3e-4 left shape far less linearly readable from the tokens
    c.train.batch_size = 64
    c.train.steps = 2400
  elif stage in ("language", "connector", "vpit", "visualizer"):
    c.model.siglip_init = "runs/demo/siglip"
  if stage == "language":
    # The toy LLM starts from scratch; this optional stage stands in for the language
    # pretraining a real LLM brings (then run the connector with
    # --config.init_from=runs/demo/language). 1000 steps teach it to compare two words, which
    # two-image answers need; 300 do not, 600-850 partly (findings, sections 8 and 9; at the
    # init std 0.02; at 0.06, 600 steps do: section 11)
    c.data.train_split = "language"
    c.data.images_per_row = 1  # text-only rows: one (empty) image slot
  if stage == "visualizer":
    c.model.visualizer = dict(preset="toy")  # a pixel-space UNet (metamorph.models.visualizer)
    c.optim.lr = 3e-3  # the draft decoder learns shape 3x faster than at 1e-3; the UNet keeps up
    c.optim.clip_norm = 1.0
    # batch 16, not 32: the demo's 600 steps 699 -> 425 s on an AVX2-only 2-core CPU;
    # text-to-image 90.7 -> 89.6% seen, 80.0% held-out both; batch 8: 87.0% (findings, section 10)
    c.train.batch_size = 16
    c.train.steps = 2000
    c.train.sample_every = 500
    c.train.eval_every = 0
  if stage in ("connector", "vpit"):
    c.model.visualizer_from = "runs/demo/visualizer"  # for sampling from the exported model
  if stage == "vpit":
    c.init_from = "runs/demo/connector"
    # the vision loss x6: text-to-image 33 -> 62% (seen pairs), understanding unchanged (findings, section 5)
    c.model.vision_coef = 6.0
  return c
