"""Multi-host: 2 local processes x 4 simulated CPU devices (gloo collectives) train the same
losses as 1 process x 8 devices, and assemble the same global batches of data.

This file is also the worker: `python tests/test_multihost.py PORT PROCESS_ID ARGS_JSON`.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.test_sharding import LOSS_RTOL, run_worker  # noqa: E402


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(args: dict, num_processes: int = 2, devices_per_process: int = 4,
                  timeout: int = 900) -> list[dict]:
  port = free_port()
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), str(i),
                             str(num_processes), json.dumps(args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO) for i in range(num_processes)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      assert p.returncode == 0, err[-4000:]
      results.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return results


def worker(port: int, process_id: int, num_processes: int, args: dict) -> dict:
  from peer_jax import distributed
  assert distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  import jax
  from tests.test_sharding import equivalence_config, train_losses
  assert jax.process_count() == num_processes and jax.device_count() == 8, jax.devices()
  out = {"process_index": jax.process_index(), "primary": distributed.is_primary()}
  for ffw in args["ffws"]:
    for shape in args["meshes"]:
      out[f"{ffw} {','.join(map(str, shape))}"] = train_losses(
          equivalence_config(ffw), tuple(shape), args["steps"])[0]
  return out


def data_worker(port: int, process_id: int, num_processes: int, args: dict) -> dict:
  """Global batches as the processes assemble them (gathered back to every process), and
  each process's data state after them."""
  from peer_jax import distributed
  assert distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  import jax
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from peer_jax.data import Tokenizer, global_batch, make_train_iterator
  mesh = Mesh(np.array(jax.devices()), ("data",))
  data = make_train_iterator(args["data"], Tokenizer(args["tokenizer"]),
                             batch_size=args["batch_size"], seq_len=args["seq_len"], seed=0)
  batches = []
  for _ in range(args["batches"]):
    arrays = global_batch(next(data), lambda ndim: NamedSharding(
        mesh, PartitionSpec("data", *([None] * (ndim - 1)))))
    full = multihost_utils.process_allgather(arrays["inputs"], tiled=True)
    batches.append(np.asarray(full).tolist())
  return {"batches": batches, "state": data.get_state()}


def compare(args):
  multi = run_processes(args)
  single = run_worker("equivalence", {**args, "meshes": args["meshes"]})
  assert [r["primary"] for r in multi] == [True, False]
  for ffw in args["ffws"]:
    for shape in args["meshes"]:
      key = ",".join(map(str, shape))
      want = single[ffw][key]
      for r in multi:  # every process sees the same (replicated) loss
        np.testing.assert_allclose(r[f"{ffw} {key}"], want, rtol=LOSS_RTOL,
                                   err_msg=f"{ffw} mesh {key} process {r['process_index']}")


@pytest.mark.slow
def test_two_processes_train_the_same_losses_as_one():
  compare({"ffws": ["peer", "dense"], "meshes": [(2, 2, 2), (1, 1, 8)], "steps": 3})


@pytest.mark.slow
def test_global_batches_do_not_depend_on_the_process_count(tmp_path):
  """Issue 16 item 9: 2 processes x 4 devices assemble the same global batches as 1 process
  from a streaming source and from a file read into memory, and their saved states resume
  in one process exactly where the two left off."""
  from tests.test_streaming import make_corpus
  from peer_jax.data import Tokenizer, make_train_iterator, merge_process_states
  from configs.base import SHARED_DATA
  make_corpus(str(tmp_path / "c"), 40)
  tokenizer = f"{SHARED_DATA}/tokenizers/c4_en_32k_spm.model"
  for source in (str(tmp_path / "c"), f"{SHARED_DATA}/wikitext-2/valid.txt"):
    args = {"mode": "data", "data": {"train_path": source, "shuffle_buffer": 8},
            "tokenizer": tokenizer, "batch_size": 8, "seq_len": 32, "batches": 3}
    multi = run_processes(args, timeout=600)
    one = make_train_iterator(args["data"], Tokenizer(tokenizer), batch_size=8, seq_len=32,
                              seed=0, shard_count=1)
    want = [next(one)["inputs"] for _ in range(5)]
    for r in multi:
      for b in range(3):
        np.testing.assert_array_equal(np.asarray(r["batches"][b]), want[b], err_msg=source)
    saved = {f"data_{i}": r["state"] for i, r in enumerate(multi)}
    resumed = make_train_iterator(args["data"], Tokenizer(tokenizer), batch_size=8,
                                  seq_len=32, seed=0, shard_count=1)
    resumed.set_state(merge_process_states(saved, 0, 1))
    for b in range(3, 5):
      np.testing.assert_array_equal(next(resumed)["inputs"], want[b], err_msg=source)


def test_explicit_initialize_arguments_are_checked():
  from peer_jax import distributed
  with pytest.raises(ValueError, match="give all of"):
    distributed.initialize("127.0.0.1:1234", 2)
  with pytest.raises(ValueError, match="process_id=2"):
    distributed.initialize("127.0.0.1:1234", 2, 2)
  assert distributed.initialize("127.0.0.1:1234", 1, 0) is False  # one process: nothing to do


if __name__ == "__main__":
  import peer_jax  # noqa: F401
  port, pid, nproc = (int(a) for a in sys.argv[1:4])
  worker_args = json.loads(sys.argv[4])
  run = data_worker if worker_args.get("mode") == "data" else worker
  print(json.dumps(run(port, pid, nproc, worker_args)))
