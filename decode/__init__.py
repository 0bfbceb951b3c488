"""The sampling script: ``python -m decode --checkpoint DIR --prompt TEXT`` (see ``decode.__main__``)."""
