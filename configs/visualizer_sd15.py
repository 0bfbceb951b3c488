"""The reference visualizer: Stable Diffusion 1.5 at 512^2 conditioned on 64 SigLIP
SO400M/14@384 tokens (the MLP adapter, zero-padding to 77, condition dropout 0.8).

  python -m train --config configs/visualizer_sd15.py --workdir runs/sd15/visualizer \\
      --config.data.data_dir=DATA --config.data.name=NAME

What must exist first:
  * ``checkpoints/stable-diffusion-v1-5``: a local diffusers Stable Diffusion 1.5 folder
    (unet/, vae/, scheduler/), or that folder converted by
    ``python -m metamorph.convert visualizer SD_FOLDER checkpoints/stable-diffusion-v1-5``
    (``model.visualizer_init``: the UNet and VAE weights and the scheduler).
  * ``checkpoints/siglip-so400m-patch14-384``: the frozen encoder (``model.siglip_init``).
  * images: any TFDS dataset built by ``python -m metamorph.data.build`` (every image of
    its records is used; 512^2 after resizing; the encoder sees them at 384^2).

Sampling the trained visualizer: guidance 6 to 12.5 and 50 steps (the reference).
"""
from train.defaults import base_config

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14, vision_use_head=True)


def get_config(arg: str = ""):
  del arg
  c = base_config()
  c.stage = "visualizer"
  c.model.siglip_init = "checkpoints/siglip-so400m-patch14-384"
  c.model.siglip.vision = SO400M
  c.model.visualizer_init = "checkpoints/stable-diffusion-v1-5"
  c.model.visualizer = dict(preset="sd15")
  c.model.num_visual_tokens = 64
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.data.image_size = 512
  c.data.tokenizer = ""
  c.optim.update(lr=1e-5, warmup_frac=0.01, weight_decay=0.0, clip_norm=1.0, b2=0.999)
  c.train.update(steps=20000, batch_size=256, micro_batches=4, log_every=50, checkpoint_every=1000,
                 keep_checkpoints=3, sample_every=1000)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
