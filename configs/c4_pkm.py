"""Paper-scale C4 single run: product-key memory (1024² memories, 8 heads, top-32, query BN) in the middle block.

A single run on the budget's dense compute-optimal backbone, one point of the isoFLOP sweep
configs/isoflop_paper.py, not the paper's Table 1 procedure: configs/_c4.py explains the
difference, the batch, data, eval sets and meshes.

Key dim 256 is our choice (the paper does not state it).

  python scripts/train.py --config=configs/c4_pkm.py:6e18 --workdir=runs/c4_pkm_6e18
  python scripts/train.py --config=configs/c4_pkm.py:2e19 --workdir=runs/c4_pkm_2e19
"""

from configs import _c4


def get_config(budget=None):
  return _c4.get_config("pkm", budget)
