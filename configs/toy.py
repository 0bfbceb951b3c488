"""The shapes world on a CPU: ``--config configs/toy.py:STAGE`` with STAGE in
siglip, visualizer, (language,) connector, vpit (in that order; each later stage reads
runs/demo/STAGE). Data: ``python -m metamorph.shapes --out runs/demo/world``.
``python -m train.demo`` (``make demo``) runs them from these settings.
The evidence for the numbers below is in docs/findings.md (sections named per line)."""
from train.defaults import base_config


def _siglip(c) -> None:
  c.data.train_split = "captions"  # the world's image-caption pairs
  c.optim.lr = 1e-3  # 3e-4 leaves shape far less linearly readable from the tokens (findings 4)
  c.train.batch_size = 64
  c.train.steps = 2400


def _visualizer(c) -> None:
  c.model.siglip_init = "runs/demo/siglip"
  c.model.visualizer = dict(preset="toy")  # a pixel-space UNet (metamorph.models.visualizer)
  c.optim.lr = 3e-3  # the draft decoder learns shape faster than at 1e-3; the UNet keeps up (findings 3)
  c.optim.clip_norm = 1.0
  c.train.batch_size = 16  # not 32: much faster on a 2-core CPU for about the same scores (findings 10)
  c.train.steps = 2000
  c.train.sample_every = 500
  c.train.eval_every = 0


def _language(c) -> None:
  # Optional: the toy LLM starts from scratch; this stage stands in for the language pretraining
  # a real LLM brings (then run the connector with --config.init_from=runs/demo/language). How many
  # steps teach it to compare two words depends on the init's scale (findings 8, 9 and 11).
  c.model.siglip_init = "runs/demo/siglip"
  c.data.train_split = "language"
  c.data.images_per_row = 1  # text-only rows: one (empty) image slot


def _connector(c) -> None:
  c.model.siglip_init = "runs/demo/siglip"
  c.model.visualizer_from = "runs/demo/visualizer"  # for sampling from the exported model


def _vpit(c) -> None:
  c.model.siglip_init = "runs/demo/siglip"
  c.model.visualizer_from = "runs/demo/visualizer"  # for sampling from the exported model
  c.init_from = "runs/demo/connector"
  c.model.vision_coef = 6.0  # the vision loss x6: text-to-image far better, understanding unchanged (findings 5)


PER_STAGE = {"siglip": _siglip, "visualizer": _visualizer, "language": _language, "connector": _connector,
             "vpit": _vpit}


def get_config(stage: str = "vpit"):
  if stage not in PER_STAGE:
    raise ValueError(f"configs/toy.py: stage {stage!r}; use one of {', '.join(PER_STAGE)}")
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
  # each visual token's slot (its grid cell) as a learned vector: the LLM need not infer left /
  # right from RoPE offsets (findings 9)
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
  # init std 0.04, not 0.02: VPiT then learns to compare two words from the mix's comparisons
  # (findings 11)
  c.model.llm.initializer_range = 0.04
  # 8 px patches: a 4 x 4 grid, one patch per visual token (m = 16, no pooling); shape is far more
  # linearly readable from the tokens than with 4 px patches, and faster (findings 4 and 5).
  # Attention within 2 x 2-patch windows (the image's quadrants; two objects never share one): each
  # token describes its own quadrant, so the LLM can bind an answer to one of two objects (findings 7)
  c.model.siglip.vision = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                               num_attention_heads=4, image_size=32, patch_size=8, vision_use_head=True,
                               attention_window=2)
  c.model.siglip.text = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, vocab_size=512, max_position_embeddings=16)

  # data parallel over two XLA devices on a 2-core CPU: the visualizer trains faster than on one
  # device; SigLIP and VPiT run about as fast (findings 5)
  c.mesh.data, c.mesh.fsdp, c.mesh.cpu_devices = -1, 1, 2

  c.optim.lr = 1e-3
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.eval_every = 100
  PER_STAGE[stage](c)
  return c
