"""Paper-scale C4 single run: the dense transformer (the baseline every expert layer replaces one FFW of).

A SINGLE RUN, not the paper's Table 1 procedure: every kind runs on the dense compute-optimal
backbone of the budget (configs/_c4.py), for the steps that spend the budget at its own FLOPs
per token. It is one point of the isoFLOP sweep configs/isoflop_paper.py, which reports each
method at its own optimum, as the paper's Table 1 does.

Batch 128 x 2048 tokens on C4 (tfds:c4/en:3.1.0), bf16, remat; evaluated on C4 validation
and, with $PEER_EVAL_DATA, the paper's other sets (docs/evaluation.md):

  python scripts/train.py --config=configs/c4_dense.py:6e18 --workdir=runs/c4_dense_6e18
  python scripts/train.py --config=configs/c4_dense.py:2e19 --workdir=runs/c4_dense_2e19

Meshes and per-chip memory on TPU pods: docs/scaling.md (e.g. --config.mesh.tensor=4).
"""

from configs import _c4


def get_config(budget=None):
  return _c4.get_config("dense", budget)
