"""Times the public PyTorch PEER layer (`peer-pytorch`) fwd+bwd on request, for bench_layer.py.

Runs in a *separate* virtualenv that only the benchmark uses (never a dependency of
peer_jax), e.g.:

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0          # first, pinned: the CPU wheel
    /tmp/torchvenv/bin/pip install --no-deps peer-pytorch
    /tmp/torchvenv/bin/pip install einops einx numpy

Protocol (stdin/stdout, one line each): prints `ready <json info>` after building and
warming up; then answers every `run` line with the seconds of one fwd+bwd, and exits on
`quit`. bench_layer.py interleaves these calls with its JAX cases.
"""

import argparse
import json
import sys
import time

import torch
from PEER_pytorch import PEER


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--T", type=int, default=2048)
  ap.add_argument("--D", type=int, default=256)
  ap.add_argument("--H", type=int, default=8)
  ap.add_argument("--K", type=int, default=16)
  ap.add_argument("--Q", type=int, default=128, help="query dim per head (both halves)")
  ap.add_argument("--N", type=int, default=1024**2)
  ap.add_argument("--threads", type=int, default=0)
  a = ap.parse_args()
  if a.threads:
    torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  # Softmax over the top-K product-key scores per head (non_competing_scores=False), K experts
  # per head, to match peer_jax; dim_key is the size of one key half.
  layer = PEER(dim=a.D, heads=a.H, num_experts=a.N, num_experts_per_head=a.K,
               dim_key=a.Q // 2, product_key_topk=a.K, non_competing_scores=False)
  x = torch.randn(1, a.T, a.D, requires_grad=True)
  dy = torch.randn(1, a.T, a.D)

  def step():
    for p in layer.parameters():
      p.grad = None
    x.grad = None
    t0 = time.perf_counter()
    y = layer(x)
    y.backward(dy)
    return time.perf_counter() - t0

  step()
  info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
          "params": sum(p.numel() for p in layer.parameters())}
  print("ready " + json.dumps(info), flush=True)
  for line in sys.stdin:
    cmd = line.strip()
    if cmd == "run":
      print(f"{step():.6f}", flush=True)
    elif cmd == "quit":
      break


if __name__ == "__main__":
  main()
