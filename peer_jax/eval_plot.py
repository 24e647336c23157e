"""The expert-load histogram of `scripts/evaluate.py --expert_histogram` (matplotlib)."""

import jax.numpy as jnp
import numpy as np

from peer_jax import expert_stats
from peer_jax.data.eval_sets import EvalError


def _layer_stats(z_N):
  """(usage, unevenness) of one layer's accumulated router weights, as `expert_metrics`."""
  z_N = jnp.asarray(z_N)
  return float(expert_stats.expert_usage(z_N)), float(expert_stats.expert_unevenness(z_N))


def write_expert_histogram(path: str, routing: dict[str, dict[str, np.ndarray]]) -> None:
  """PNG of the expert load distribution: one panel per (eval set, layer).

  x: an expert's share of the accumulated router weight relative to uniform (N·z_i/Σz,
  log scale; 1 = perfectly even), y: number of experts. Unused experts are counted in the
  panel title with usage and unevenness.
  """
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise EvalError("--expert_histogram needs matplotlib (pip install matplotlib)") from None
  panels = [(s, b, np.asarray(z, np.float64)) for s, layers in routing.items()
            for b, z in layers.items()]
  if not panels:
    raise EvalError("no PEER/PKM layer in this model: nothing to draw for --expert_histogram")
  cols = min(len(panels), 3)
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
  for ax, (set_name, block, z) in zip(axes.flat, panels):
    n = z.size
    load = z * n / max(z.sum(), np.finfo(np.float64).tiny)
    used = load[load > 0]
    usage, unevenness = _layer_stats(z)
    if used.size:
      lo, hi = used.min(), used.max()
      bins = np.geomspace(lo, hi * (1 + 1e-9), 50) if hi > lo else np.array([lo * 0.9, lo * 1.1])
      ax.hist(used, bins=bins)
      ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("expert load / uniform load")
    ax.set_ylabel("experts")
    ax.set_title(f"{set_name} {block}: N={n}, unused {n - used.size}\n"
                 f"usage {usage:.1%}, KL {unevenness:.3f}", fontsize=9)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  try:
    fig.savefig(path, dpi=100)
  except OSError as e:
    raise EvalError(f"--expert_histogram: cannot write {path} ({e.strerror or e})") from None
  finally:
    plt.close(fig)
