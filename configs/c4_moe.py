"""Paper-scale C4 single run: expert-choice MoE (128 experts of d_ff each) in the middle block.

A single run on the budget's dense compute-optimal backbone, one point of the isoFLOP sweep
configs/isoflop_paper.py, not the paper's Table 1 procedure: configs/_c4.py explains the
difference, the batch, data, eval sets and meshes.

Expert choice is the paper's baseline and is NOT causal: a token's routing depends on later
tokens of its sequence, so its perplexity is not comparable with a causal model's. The capacity
factor is base's 2.0 (our choice, Zhou et al.'s standard; the paper states none);
--config.model.moe.routing=token_choice gives a causal top-k MoE instead.

  python scripts/train.py --config=configs/c4_moe.py:6e18 --workdir=runs/c4_moe_6e18
  python scripts/train.py --config=configs/c4_moe.py:2e19 --workdir=runs/c4_moe_2e19
"""

from configs import _c4


def get_config(budget=None):
  return _c4.get_config("moe", budget)
