"""The quickstart model with its expert block kept as a plain dense FFW: the baseline."""

from configs import default


def get_config():
  c = default.get_config()
  c.model.ffw = "dense"
  return c
