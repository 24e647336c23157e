"""scripts/launch_tpu_pod.py (dry run: the exact commands) and scripts/slurm_train.sbatch."""

import os
import shlex
import subprocess
import sys

import pytest

from scripts import launch_tpu_pod as launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--tpu=my-v4-32", "--zone=us-central2-b", "--config=configs/default.py",
        "--workdir=gs://my-bucket/runs/peer"]


def dry_run(capsys, *extra):
  rc = launch.main([*BASE, "--dry_run", *extra])
  out, err = capsys.readouterr()
  assert rc == 0, err
  commands = [shlex.split(line) for line in out.splitlines()
              if line and not line.startswith("#") and line != "set -e"]
  return out, commands


def remote(cmd):
  """The --command=... of a gcloud ssh argv."""
  (arg,) = [a for a in cmd if a.startswith("--command=")]
  return arg[len("--command="):]


def test_dry_run_copies_installs_and_trains_on_all_workers(capsys):
  out, cmds = dry_run(capsys, "--config.train.steps=1000", f"--data_dir={REPO}/configs")
  assert out.startswith("#!/bin/bash\n")
  kinds = [c[0] if c[0] == "tar" else c[4] for c in cmds]
  assert kinds == ["tar", "tar", "scp", "scp", "ssh", "ssh"]
  for c in cmds[2:]:
    assert c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
    assert "--worker=all" in c and "--zone=us-central2-b" in c
    assert not any(a.startswith("--project") for a in c)
  assert cmds[2][5:7] == ["/tmp/peer_jax_code.tar.gz".replace("/tmp", launch.tempfile.gettempdir()),
                          "my-v4-32:peer_jax_code.tar.gz"]
  install = remote(cmds[4])
  assert "tar -xzf peer_jax_code.tar.gz -C peer_jax" in install
  assert "pip install --quiet -r requirements.txt 'jax[tpu]==0.10.2'" in install
  assert "pip install --quiet --no-deps -e ." in install
  train = remote(cmds[5])
  assert train.startswith("cd ~/peer_jax && PEER_JAX_DATA=$HOME/peer_jax_data ")
  argv = shlex.split(train.split(" && ", 1)[1])
  assert argv[2:] == ["scripts/train.py", "--config=configs/default.py",
                      "--workdir=gs://my-bucket/runs/peer", "--config.train.steps=1000"]
  # the code archive leaves out the venv, run outputs and git history
  assert {"--exclude=./.venv", "--exclude=./runs", "--exclude=./.git"} <= set(cmds[0])
  assert cmds[0][-3:] == ["-C", REPO, "."]


def test_quoting_survives_two_shells(capsys):
  rules = '(("batch", ("data", "fsdp")), ("embed", "fsdp"))'
  _, cmds = dry_run(capsys, f"--data_dir={REPO}/configs", f"--config.sharding.rules={rules}", "--config.data.eval_paths=a=b c",
                    "--env=XLA_FLAGS=--xla_dump_to=/tmp/x y", "--", "--config.seed=3")
  train = remote(cmds[-1])  # what the worker's shell receives
  words = shlex.split(train.split(" && ", 1)[1])
  assert words[0] == "PEER_JAX_DATA=$HOME/peer_jax_data"
  assert words[1] == "XLA_FLAGS=--xla_dump_to=/tmp/x y"
  assert words[-3:] == [f"--config.sharding.rules={rules}", "--config.data.eval_paths=a=b c",
                        "--config.seed=3"]


def test_options(capsys):
  _, cmds = dry_run(capsys, "--project=my-proj", "--data_dir=", "--detach", "--skip_install",
                    "--gcloud_args=--internal-ip --ssh-flag='-o ServerAliveInterval=30'")
  assert [c[0] for c in cmds] == ["tar", "gcloud", "gcloud", "gcloud"]  # no data archive
  for c in cmds[1:]:
    assert "--project=my-proj" in c and "--internal-ip" in c
    assert "--ssh-flag=-o ServerAliveInterval=30" in c
  assert "pip" not in remote(cmds[2])
  train = remote(cmds[3])
  assert "PEER_JAX_DATA" not in train
  assert train.startswith("cd ~/peer_jax && nohup ") and train.endswith(
      "> ~/peer_jax_train.log 2>&1 < /dev/null &")

  _, cmds = dry_run(capsys, "--skip_copy", "--skip_install")
  assert len(cmds) == 1 and cmds[0][4] == "ssh"

  _, cmds = dry_run(capsys, "--source=git", "--repo_url=https://example.com/p.git", "--ref=v1",
                    "--data_dir=", "--pre_install=sudo apt-get install -y python3.11-venv")
  assert [c[0] for c in cmds] == ["gcloud", "gcloud"]
  setup = remote(cmds[0])
  assert "git clone --quiet https://example.com/p.git peer_jax" in setup
  assert "fetch --quiet origin v1 && git -C peer_jax checkout --quiet --detach FETCH_HEAD" in setup
  assert "(sudo apt-get install -y python3.11-venv) && cd peer_jax && python3.11 -m venv" in setup


@pytest.mark.parametrize("args,message", [
    (["--workdir=runs/peer"], "--workdir=runs/peer: must be a gs://BUCKET/PATH"),
    (["--workdir=gs://"], "gs://BUCKET/PATH"),
    (["--config=configs/nope.py"], "--config=configs/nope.py: no such file"),
    (["--config=/abs/x.py"], "give a path inside the repository"),
    (["--tpu=My TPU"], "--tpu='My TPU'"),
    (["--train_steps=3"], "unknown argument(s): --train_steps=3"),
    (["--config.train.steps"], "write train overrides as --config.KEY=VALUE"),
    (["--source=git"], "--source=git needs --repo_url"),
    (["--ref=main"], "--repo_url/--ref only apply with --source=git"),
    (["--remote_dir=../x"], "--remote_dir='../x'"),
    (["--env=1X=2"], "--env='1X=2': expected KEY=VALUE"),
    (["--data_dir=/no/such/dir"], "--data_dir=/no/such/dir: not a directory"),
    (["--source=svn"], "invalid choice: 'svn'"),
])
def test_bad_arguments_give_one_clear_line(capsys, args, message):
  names = {a.split("=")[0] for a in args}
  argv = [a for a in BASE if a.split("=")[0] not in names] + args + ["--dry_run"]
  assert launch.main(argv) == 2
  out, err = capsys.readouterr()
  assert out == ""
  assert err.startswith("error: command line: ") and err.count("\n") == 1, err
  assert message in err


def test_missing_required_flags(capsys):
  assert launch.main(["--dry_run"]) == 2
  err = capsys.readouterr().err
  assert "required: --tpu, --zone, --config, --workdir" in err


def test_local_workdir_allowed_when_asked(capsys):
  _, cmds = dry_run(capsys, "--workdir=/mnt/nfs/run", "--allow_local_workdir")
  assert "--workdir=/mnt/nfs/run" in remote(cmds[-1])


def test_without_gcloud_it_says_what_to_do(monkeypatch, capsys):
  monkeypatch.setattr(launch.shutil, "which", lambda name: None)
  assert launch.main(BASE) == 2
  assert "gcloud not found" in capsys.readouterr().err


def test_command_line_dry_run_and_help():
  env = dict(os.environ, PATH="/usr/bin:/bin")  # gcloud may be absent; a dry run needs none
  r = subprocess.run([sys.executable, "scripts/launch_tpu_pod.py", *BASE, "--dry_run",
                      "--config.train.steps=5"], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  assert r.stdout.count("--worker=all") == 4
  r = subprocess.run([sys.executable, "scripts/launch_tpu_pod.py", "--help"], cwd=REPO,
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0 and "--dry_run" in r.stdout and "gs://" in r.stdout


def test_slurm_script():
  path = os.path.join(REPO, "scripts", "slurm_train.sbatch")
  subprocess.run(["bash", "-n", path], check=True)
  text = open(path).read()
  assert "srun" in text and "scripts/train.py" in text and "#SBATCH --ntasks-per-node" in text
  r = subprocess.run(["bash", path], cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 2 and "usage: sbatch scripts/slurm_train.sbatch" in r.stderr
  r = subprocess.run(["bash", path, "configs/nope.py", "/tmp/w"], cwd=REPO, capture_output=True,
                     text=True)
  assert r.returncode == 2 and "configs/nope.py: no such config file" in r.stderr
