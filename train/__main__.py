"""Training job: ``python -m train --config configs/NAME.py[:ARG] --workdir DIR [--config.FIELD=VALUE ...]``.

The config's ``stage`` (a name in ``train.stages.STAGES``) picks what trains. Rerunning the
same command resumes from the latest checkpoint in DIR. A field the config does not have, or a
value of the wrong type, stops it at once with exit status 2 (``train.config_errors``). Several processes
(multi-host): pass --coordinator, --num_processes and --process_id, or rely on
``jax.distributed.initialize()``'s auto-detection (TPU pods, SLURM) with
--distributed.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from metamorph.convert import ConversionError
from metamorph.data.records import RecordError
from train.config_errors import define_config_file, parse_flags
from train.defaults import base_config

define_config_file("config", None, "training config file (configs/*.py[:arg])", schema=base_config)
flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics.jsonl, tensorboard, model/")
flags.DEFINE_string("coordinator", None, "host:port of process 0, for multi-process runs")
flags.DEFINE_integer("num_processes", None, "number of processes of a multi-process run")
flags.DEFINE_integer("process_id", None, "this process's index")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with auto-detection")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _init_distributed() -> None:
  import jax  # slow import: jax (``--help`` needs none)
  if FLAGS.coordinator or (FLAGS.num_processes or 1) > 1:
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
  _init_distributed()
  from metamorph.checkpoint import CheckpointError  # slow import: orbax, jax (``--help`` needs none)
  from train.trainer import TrainingError, run  # slow import: jax, flax
  try:
    run(FLAGS.config, FLAGS.workdir)
  except (TrainingError, CheckpointError, ConversionError, RecordError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
