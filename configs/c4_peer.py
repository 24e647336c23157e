"""Paper-scale C4 run: PEER layer (1024² experts, 8 heads, top-16, query dim 256, query BN) in the middle block.

Batch 128 x 2048 tokens on C4 (tfds:c4/en:3.1.0), bf16, remat; backbone and steps derived
for a compute budget (configs/_c4.py):

  python scripts/train.py --config=configs/c4_peer.py:6e18 --workdir=runs/c4_peer_6e18
  python scripts/train.py --config=configs/c4_peer.py:2e19 --workdir=runs/c4_peer_2e19

Meshes and per-chip memory on TPU pods: docs/scaling.md (e.g. --config.mesh.tensor=4).
"""

from configs import _c4


def get_config(budget=None):
  return _c4.get_config("peer", budget)
