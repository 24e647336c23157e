#!/usr/bin/env python
"""Copy peer_jax to every worker of a Cloud TPU VM (pod slice), install it, and start the same
training command on all workers at once. See docs/launching.md.

  python scripts/launch_tpu_pod.py --tpu=NAME --zone=ZONE --config=configs/default.py \\
      --workdir=gs://BUCKET/runs/NAME [--config.train.steps=1000 ...] [--dry_run]

Steps (each one command, printed as it runs; --dry_run prints them all as a shell script and
runs nothing, gcloud is not needed for it):
  1. tar the repository (without .venv, runs/, .git) and, with --data_dir, the data folder;
  2. gcloud compute tpus tpu-vm scp ... --worker=all: the archives to every worker;
  3. gcloud compute tpus tpu-vm ssh ... --worker=all: unpack, create a venv, pip install
     requirements.txt + jax[tpu], pip install -e .;
  4. gcloud compute tpus tpu-vm ssh ... --worker=all: python scripts/train.py --config=...
     --workdir=gs://... on every worker (JAX finds the other workers by itself).

Every --config.KEY=VALUE flag (and everything after a lone `--`) is passed to scripts/train.py.
--source=git clones --repo_url on the workers instead of copying the local tree.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_TPU = "jax[tpu]==0.10.2"  # the jax pin of requirements.txt, with the libtpu extra
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./-]+$")


class LaunchError(ValueError):
  """A bad command line: printed as one `error: ...` line, exit code 2."""


def _default_data_dir() -> str:
  """The bundled corpora and tokenizer (../shared/data), which configs/base.py points at."""
  path = os.environ.get("PEER_JAX_DATA") or os.path.join(os.path.dirname(REPO), "shared", "data")
  return os.path.normpath(path) if os.path.isdir(path) else ""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="launch_tpu_pod.py", description=__doc__.split("\n\n")[0].replace("\n", " "),
      epilog="Example: python scripts/launch_tpu_pod.py --tpu=my-v4-32 --zone=us-central2-b "
             "--config=configs/default.py --workdir=gs://my-bucket/runs/peer "
             "--config.train.steps=1000 --dry_run",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
  g = p.add_argument_group("where")
  g.add_argument("--tpu", required=True, help="Name of the TPU VM (pod slice), as in "
                 "`gcloud compute tpus tpu-vm list`.")
  g.add_argument("--zone", required=True, help="Zone of the TPU VM, e.g. us-central2-b.")
  g.add_argument("--project", default="", help="Google Cloud project (default: gcloud's "
                 "configured project).")
  g.add_argument("--gcloud_args", default="", help="Extra flags for every gcloud scp/ssh "
                 "command, one shell-quoted string, e.g. '--internal-ip'.")
  g = p.add_argument_group("what to train")
  g.add_argument("--config", required=True, help="Config file inside the repository, e.g. "
                 "configs/default.py (passed to scripts/train.py).")
  g.add_argument("--workdir", required=True, help="Run directory shared by all workers: "
                 "gs://BUCKET/PATH (metrics, TensorBoard logs, checkpoints; relaunching with "
                 "the same workdir resumes).")
  g.add_argument("--allow_local_workdir", action="store_true", help="Accept a --workdir that "
                 "is not gs:// (only right for a single-host TPU VM or a shared file system).")
  g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="Environment "
                 "variable for the training processes; repeat for several.")
  g = p.add_argument_group("code, data and install")
  g.add_argument("--source", choices=["copy", "git"], default="copy", help="copy: tar the "
                 "local tree and scp it to every worker; git: clone --repo_url on every worker.")
  g.add_argument("--repo_url", default="", help="Repository to clone with --source=git.")
  g.add_argument("--ref", default="", help="Branch, tag or commit to check out with "
                 "--source=git (default: the remote's default branch).")
  g.add_argument("--remote_dir", default="peer_jax", help="Where the code goes on each "
                 "worker, relative to the home directory.")
  g.add_argument("--data_dir", default=_default_data_dir(), help="Local folder copied to every "
                 "worker and exported as PEER_JAX_DATA (the default configs read their "
                 "tokenizer and text from it); '' copies nothing (data on gs://, or already "
                 "there).")
  g.add_argument("--remote_data_dir", default="peer_jax_data", help="Where --data_dir goes on "
                 "each worker, relative to the home directory.")
  g.add_argument("--python", default="python3.11", help="Python on the workers that creates "
                 "the venv (the pinned requirements need 3.11+).")
  g.add_argument("--pre_install", default="", help="Shell command run on every worker before "
                 "the install, e.g. 'sudo apt-get install -y python3.11-venv'.")
  g.add_argument("--skip_copy", action="store_true", help="Do not copy code or data (already "
                 "on the workers).")
  g.add_argument("--skip_install", action="store_true", help="Do not (re)install; reuse the "
                 "workers' venv.")
  g = p.add_argument_group("how to run")
  g.add_argument("--detach", action="store_true", help="Start training in the background "
                 "(nohup) and return at once; each worker logs to ~/LOG (see --log).")
  g.add_argument("--log", default="peer_jax_train.log", help="Log file on each worker, "
                 "relative to the home directory, with --detach.")
  g.add_argument("--dry_run", action="store_true", help="Print the exact commands (a shell "
                 "script) and run nothing; gcloud is not needed.")
  return p


def parse_args(argv):
  """(args, train_overrides); LaunchError for anything wrong, before any command runs."""
  argv = list(argv)
  passthrough = []
  if "--" in argv:
    i = argv.index("--")
    argv, passthrough = argv[:i], argv[i + 1:]
  parser = build_parser()
  # argparse would take --config.X for --config (prefix matching); split those off first.
  overrides = [a for a in argv if a.startswith("--config.")]
  argv = [a for a in argv if not a.startswith("--config.")]

  def fail(message):
    raise LaunchError(message)
  parser.error = fail  # one clear line instead of argparse's usage + exit
  args, unknown = parser.parse_known_args(argv)
  if unknown:
    raise LaunchError(f"unknown argument(s): {' '.join(unknown)} (train overrides are "
                      f"--config.KEY=VALUE; anything else for scripts/train.py goes after `--`)")
  for o in overrides:
    if "=" not in o:
      raise LaunchError(f"{o}: write train overrides as --config.KEY=VALUE")
  _validate(args)
  return args, overrides + passthrough


def _validate(args) -> None:
  for name in ("tpu", "zone"):
    value = getattr(args, name)
    if not re.match(r"^[a-z0-9][a-z0-9-]*$", value):
      raise LaunchError(f"--{name}={value!r}: expected lower-case letters, digits and '-'")
  config_file = args.config.split(":", 1)[0]
  if os.path.isabs(config_file) or config_file.startswith(".."):
    raise LaunchError(f"--config={args.config}: give a path inside the repository (e.g. "
                      f"configs/default.py); it is copied to the workers with the code")
  if not os.path.isfile(os.path.join(REPO, config_file)):
    raise LaunchError(f"--config={args.config}: no such file in {REPO}")
  if not args.workdir.startswith("gs://") and not args.allow_local_workdir:
    raise LaunchError(f"--workdir={args.workdir}: must be a gs://BUCKET/PATH that every worker "
                      f"can write (pass --allow_local_workdir for a single-host TPU VM)")
  if args.workdir.rstrip("/") == "gs:" or args.workdir.rstrip("/") == "gs:/":
    raise LaunchError(f"--workdir={args.workdir}: name a bucket and a path, gs://BUCKET/PATH")
  for name in ("remote_dir", "remote_data_dir", "log"):
    value = getattr(args, name)
    if not _SAFE_PATH.match(value) or value.startswith("/") or ".." in value.split("/"):
      raise LaunchError(f"--{name}={value!r}: use a plain path relative to the home directory "
                        f"(letters, digits, _ . / -)")
  if not _SAFE_PATH.match(args.python):
    raise LaunchError(f"--python={args.python!r}: expected a program name or path")
  for kv in args.env:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", kv):
      raise LaunchError(f"--env={kv!r}: expected KEY=VALUE")
  if args.source == "git":
    if not args.repo_url:
      raise LaunchError("--source=git needs --repo_url=URL (the workers clone it)")
  elif args.repo_url or args.ref:
    raise LaunchError("--repo_url/--ref only apply with --source=git")
  if args.data_dir and not os.path.isdir(args.data_dir):
    raise LaunchError(f"--data_dir={args.data_dir}: not a directory (pass --data_dir= to copy "
                      f"no data)")
  try:
    shlex.split(args.gcloud_args)
  except ValueError as e:
    raise LaunchError(f"--gcloud_args: {e}") from None


def _gcloud(args, verb: str, *rest: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, "--worker=all",
         f"--zone={args.zone}"]
  if args.project:
    cmd.append(f"--project={args.project}")
  return cmd + shlex.split(args.gcloud_args)


def _ssh(args, remote: str) -> list[str]:
  return _gcloud(args, "ssh", args.tpu, f"--command={remote}")


def train_command(args, overrides) -> list[str]:
  """scripts/train.py's argv on a worker (relative to the remote repository)."""
  return [".venv/bin/python", "scripts/train.py", f"--config={args.config}",
          f"--workdir={args.workdir}", *overrides]


def build_steps(args, overrides) -> list[tuple[str, list[str]]]:
  """[(what, argv)] in order; argv[0] is `tar` (local) or `gcloud`."""
  steps = []
  code_tar = os.path.join(tempfile.gettempdir(), "peer_jax_code.tar.gz")
  data_tar = os.path.join(tempfile.gettempdir(), "peer_jax_data.tar.gz")
  rdir, rdata = args.remote_dir, args.remote_data_dir
  unpack = []
  if not args.skip_copy:
    if args.source == "copy":
      steps.append(("pack the code (without .venv, runs/, .git, caches)",
                    ["tar", "-czf", code_tar, "--exclude=./.venv", "--exclude=./runs",
                     "--exclude=./.git", "--exclude=__pycache__", "--exclude=*.egg-info",
                     "--exclude=.pytest_cache", "-C", REPO, "."]))
    if args.data_dir:
      steps.append((f"pack the data folder {args.data_dir}",
                    ["tar", "-czf", data_tar, "-C", args.data_dir, "."]))
    if args.source == "copy":
      steps.append(("copy the code to every worker",
                    _gcloud(args, "scp", code_tar, f"{args.tpu}:peer_jax_code.tar.gz")))
      unpack.append(f"mkdir -p {rdir} && tar -xzf peer_jax_code.tar.gz -C {rdir}")
    else:
      ref = shlex.quote(args.ref) if args.ref else "HEAD"
      url = shlex.quote(args.repo_url)
      unpack.append(f"(test -d {rdir}/.git || git clone --quiet {url} {rdir}) && "
                    f"git -C {rdir} fetch --quiet origin {ref} && "
                    f"git -C {rdir} checkout --quiet --detach FETCH_HEAD")
    if args.data_dir:
      steps.append(("copy the data folder to every worker",
                    _gcloud(args, "scp", data_tar, f"{args.tpu}:peer_jax_data.tar.gz")))
      unpack.append(f"mkdir -p {rdata} && tar -xzf peer_jax_data.tar.gz -C {rdata}")
  install = []
  if args.pre_install:
    install.append(f"({args.pre_install})")
  if not args.skip_install:
    install.append(
        f"cd {rdir} && {args.python} -m venv .venv && .venv/bin/pip install --quiet --upgrade pip"
        f" && .venv/bin/pip install --quiet -r requirements.txt {shlex.quote(JAX_TPU)}"
        f" && .venv/bin/pip install --quiet --no-deps -e .")
  if unpack or install:
    what = " and ".join(w for w, on in (("unpack", unpack), ("install", install)) if on)
    steps.append((f"{what} on every worker", _ssh(args, "cd ~ && " + " && ".join(unpack + install))))
  env = [f"PEER_JAX_DATA=$HOME/{rdata}"] if args.data_dir else []
  env += [shlex.quote(kv) for kv in args.env]
  train = " ".join(env + [shlex.join(train_command(args, overrides))])
  if args.detach:
    remote = f"cd ~/{rdir} && nohup {train} > ~/{args.log} 2>&1 < /dev/null &"
    what = f"start training on every worker in the background (logs: ~/{args.log} on each)"
  else:
    remote = f"cd ~/{rdir} && {train}"
    what = "train on every worker (the output of all workers streams here)"
  steps.append((what, _ssh(args, remote)))
  return steps


def format_script(steps) -> str:
  lines = ["#!/bin/bash", "set -e"]
  for i, (what, cmd) in enumerate(steps, 1):
    lines += [f"# {i}/{len(steps)}: {what}", shlex.join(cmd)]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    args, overrides = parse_args(argv)
  except LaunchError as e:
    print(f"error: command line: {e}", file=sys.stderr)
    return 2
  steps = build_steps(args, overrides)
  if args.dry_run:
    sys.stdout.write(format_script(steps))
    return 0
  if shutil.which("gcloud") is None:
    print("error: gcloud not found on PATH: install the Google Cloud CLI "
          "(https://cloud.google.com/sdk/docs/install), or use --dry_run to see the commands",
          file=sys.stderr)
    return 2
  for i, (what, cmd) in enumerate(steps, 1):
    print(f"[{i}/{len(steps)}] {what}\n  $ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
      rc = subprocess.call(cmd)
    except KeyboardInterrupt:
      print("interrupted; training may still run on the workers: stop it with\n  "
            + shlex.join(_ssh(args, "pkill -TERM -f scripts/train.py")), file=sys.stderr)
      return 130
    if rc != 0:
      hint = (" (rerun with --skip_copy --skip_install to only restart training)"
              if i == len(steps) else "")
      print(f"error: step {i}/{len(steps)} ({what}) failed with exit code {rc}{hint}",
            file=sys.stderr)
      return rc
  if args.detach:
    tail = [a if a != "--worker=all" else "--worker=0"
            for a in _ssh(args, f"tail -f ~/{args.log}")]
    print(f"started; training writes to {args.workdir}; follow worker 0 with\n  "
          f"{shlex.join(tail)}", file=sys.stderr)
  else:
    print(f"done; metrics, TensorBoard logs and checkpoints in {args.workdir}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
