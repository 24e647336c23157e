"""The quickstart model with an expert-choice MoE (8 experts of d_ff each) in the middle block."""

from configs import default


def get_config():
  c = default.get_config()
  c.model.ffw = "moe"
  return c
