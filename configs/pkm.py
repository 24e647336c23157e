"""The quickstart model with a product-key memory (128² memories, 4 heads, top-8) in the middle block."""

from configs import default


def get_config():
  c = default.get_config()
  c.model.ffw = "pkm"
  return c
