"""Paper-scale C4 single run: the dense transformer (the baseline every expert layer replaces one FFW of).

A single run on the budget's dense compute-optimal backbone, one point of the isoFLOP sweep
configs/isoflop_paper.py, not the paper's Table 1 procedure: configs/_c4.py explains the
difference, the batch, data, eval sets and meshes.

  python scripts/train.py --config=configs/c4_dense.py:6e18 --workdir=runs/c4_dense_6e18
  python scripts/train.py --config=configs/c4_dense.py:2e19 --workdir=runs/c4_dense_2e19
"""

from configs import _c4


def get_config(budget=None):
  return _c4.get_config("dense", budget)
