"""The commands in README.md and docs/*.md stay true.

Commands are the lines of fenced shell blocks (and `python` lines of unlabelled ones), of
indented code blocks that start with a program, and inline code `python scripts/...` or
`python -m MODULE ...`.

Fast (default): every command is found and classified (run here, or skipped for a reason:
SKIP below, placeholders such as DIR, `...` or an unset $VAR, libtpu, a torch venv); every
script it names exists and answers --help with exit 0, explaining each of its flags; every
--config=FILE exists; every --config.KEY (in commands and in prose) is a key of that config
file (configs/base.py when none is named).

Slow (`pytest -m slow tests/test_docs_commands.py`): every runnable command is executed, in
document order, on the bundled data, shortened by the REWRITES below (few steps, small
batches), as a user types it: from a scratch copy of the checkout (symlinks to its files,
`../shared` beside it), so relative paths such as `--workdir=runs/default` stay relative and
land in the scratch directory; only absolute outputs (/tmp/, $HOME) are redirected into it;
benchmarks (`python -m benchmarks.X`) run at tiny sizes with one repeat. A command
shown in the docs with an `error: ...` line after it must fail with that line, and an
`echo $?` after it must show its exit code.
"""

import concurrent.futures
import dataclasses
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO)
                              for p in glob.glob(os.path.join(REPO, "docs", "*.md")))

# Commands that are not run here, by first word, and why.
SKIP = {
    "make": "installs the venv and trains for minutes or runs the whole suite (`make test` is "
            "what runs this file)",
    "pip": "installs packages (no network here; the venv is already installed)",
    ".": "activates the venv (the tests already run in it)",
    "source": "activates the venv (the tests already run in it)",
    "gcloud": "needs Google Cloud credentials and a TPU VM",
    "gsutil": "needs Google Cloud credentials",
    "tensorboard": "starts a server that runs until stopped",
    "sbatch": "needs a SLURM cluster", "srun": "needs a SLURM cluster",
    "squeue": "needs a SLURM cluster", "scancel": "needs a SLURM cluster",
    "sinfo": "needs a SLURM cluster", "salloc": "needs a SLURM cluster",
    "nvidia-smi": "needs an NVIDIA GPU",
    "export": "sets a variable for the user's later commands",
    "cd": "changes the user's directory",
    "git": "changes the checkout",
    "tail": "follows a log until stopped",
    "ssh": "needs a remote machine",
    "docker": "needs a container runtime",
    "sudo": "changes the system",
    "apt-get": "changes the system",
    "kill": "stops a process of the user's",
    "pkill": "stops a process of the user's",
}
RUNNABLE = {"python", "python3", "jq", "echo", "ls", "cat", "mkdir", "du", "head", "wc", "bash"}
# Capitalised words that are placeholders for the reader's own values (DIR, BUCKET, ...).
PLACEHOLDER = re.compile(r"(?<![\w$])(?!HOME\b)[A-Z][A-Z0-9_]*[A-Z](?!\w)")
OUTPUT_PREFIXES = ("/tmp/", "~/")  # absolute outputs; relative ones (runs/, tokenizers/) stay
# relative, in the scratch checkout the commands run from (_scratch_checkout)


@dataclasses.dataclass
class Command:
  file: str
  line: int
  text: str  # as written (continuations joined)
  expect_error: str = ""  # the `error: ...` line the docs show after it
  output: str = ""  # the line after it when that is output (for `echo $?`: the exit code)

  @property
  def where(self):
    return f"{self.file}:{self.line}"

  def words(self):
    try:
      return shlex.split(self.text, comments=True)
    except ValueError:  # the first line of a quoted multi-line command (python -c "...)
      return []

  @property
  def unparsed(self) -> bool:
    try:
      shlex.split(self.text, comments=True)
      return False
    except ValueError:
      return True


# Inline code that is a command: `python scripts/...`, `python -m benchmarks.X ...`.
INLINE_COMMAND = re.compile(r"`((?:python3?) (?:scripts/|-m )[^`]*)`")


def _is_program(word: str) -> bool:
  return (word in RUNNABLE or word in SKIP or re.match(r"^python3(\.\d+)?$", word) is not None
          or os.path.basename(word) in ("pip", "python", "python3"))


def _indented_block(lines: list[str], i: int) -> int:
  """End of the indented (4-space) code block starting at line i, or i if there is none
  there: it follows a blank line, is not the continuation of a list item, and its first line
  starts with a program (indented prose, e.g. a list item's second paragraph, does not)."""
  if not lines[i].startswith("    ") or (i > 0 and lines[i - 1].strip()):
    return i
  prev = next((l for l in reversed(lines[:i]) if l.strip()), "")
  if re.match(r"^\s*([-*+]|\d+\.)\s", prev) or prev.startswith("    "):
    return i
  words = lines[i].split()
  if not words or not _is_program(words[0]):
    return i
  j = i
  while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
    j += 1
  return j


def _commands_of(path: str) -> list[Command]:
  lines = open(os.path.join(REPO, path)).read().split("\n")
  out, i = [], 0
  while i < len(lines):
    m = re.match(r"^\s*```\s*([\w-]*)", lines[i])
    if not m:
      end = _indented_block(lines, i)
      if end > i:  # an indented code block: a shell block
        for k in range(i, end):
          text = lines[k].strip()
          if text and not text.startswith("#"):
            out.append(Command(path, k + 1, text))
        i = end
        continue
      for text in INLINE_COMMAND.findall(lines[i]):
        out.append(Command(path, i + 1, text))
      i += 1
      continue
    lang, j = m.group(1).lower(), i + 1
    while j < len(lines) and not re.match(r"^\s*```", lines[j]):
      j += 1
    block, k = lines[i + 1:j], 0
    shell = lang in ("bash", "sh", "shell", "console")
    if lang in ("bash", "sh", "shell", "console", ""):
      while k < len(block):
        text, start = block[k].strip(), k
        is_prompt = text.startswith("$ ")
        if is_prompt:
          text = text[2:]
        first = text.split(" ", 1)[0]
        is_command = (is_prompt or (shell and text and not text.startswith("#"))
                      or first in ("python", "python3"))
        while text.endswith("\\") and k + 1 < len(block):
          k += 1
          text = text[:-1].rstrip() + " " + block[k].strip()
        k += 1
        if not is_command or text.startswith("--") or not text.strip():
          continue  # output, prose, or a flag fragment (checked by the key tests)
        expect = block[k].strip() if k < len(block) and block[k].startswith("error:") else ""
        output = (block[k].strip() if is_prompt and k < len(block)
                  and not block[k].strip().startswith("$ ") else "")
        out.append(Command(path, i + 2 + start, text, expect, output))
    i = j + 1
  return out


def all_commands() -> list[Command]:
  return [c for path in DOCS for c in _commands_of(path)]


def classify(cmd: Command) -> tuple[str, str]:
  """("run", "") or ("skip", reason) or ("unknown", program)."""
  if cmd.unparsed:
    return "skip", "a quoted command over several lines (shown for the reader to paste)"
  words, set_here = cmd.words(), set()
  while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
    name, value = words.pop(0).split("=", 1)
    set_here.add(name)
    if value.startswith("/") and not os.path.exists(value):
      return "skip", f"example path {value}"
  if not words:
    return "skip", "only sets variables"
  prog = words[0]
  if prog in SKIP:
    return "skip", SKIP[prog]
  if os.path.basename(prog) == "pip":
    return "skip", "installs packages into another venv (no network here)"
  if re.match(r"^python3\.\d+$", prog):
    return "skip", "creates a venv with a specific Python"
  if prog not in RUNNABLE:
    return "unknown", prog
  if prog.startswith("python") and words[1:3] == ["-m", "pytest"]:
    return "skip", "runs the test suite"
  if prog.startswith("python") and words[1:3] == ["-m", "venv"]:
    return "skip", "creates a venv"
  if script_of(cmd) and words[2:] == ["--help"]:
    return "run", ""
  if "scripts/compile_tpu.py" in words[1:2] or (
      words[1:3] == ["-m", "benchmarks.bench_pallas"]
      and any(w.split("=")[0] == "--topology" for w in words)):
    return "skip", "needs libtpu (kept out of the main venv; see docs/scaling.md)"
  if any(w.startswith("--torch-python") for w in words):
    return "skip", "needs a venv with torch and peer-pytorch (see docs/performance.md)"
  if "scripts/launch_tpu_pod.py" in words[1:2]:
    if "--dry_run" in words:
      return "run", ""  # prints the commands only; gs:// paths are just text then
    return "skip", "launches on a TPU VM (the dry run is tested in test_launch.py)"
  if any("gs://" in w for w in words):
    return "skip", "needs Google Cloud Storage"
  if "..." in words or any(w.endswith("=...") for w in words):
    return "skip", "placeholder ... for the reader's own values"
  unset = [v for w in words for v in re.findall(r"\$\{?([A-Za-z_]\w*)", w)
           if v not in ("HOME", "PATH", "PWD", "USER") and v not in set_here]
  if unset:
    return "skip", f"placeholder ${unset[0]} for the reader's value"
  marks = [w for w in words[1:] if not w.startswith("-c") and PLACEHOLDER.search(w)]
  if prog.startswith("python") and words[1:2] == ["-c"]:
    marks = []
  if marks:
    return "skip", f"placeholder {PLACEHOLDER.search(marks[0]).group(0)} for the reader's value"
  return "run", ""


def script_of(cmd: Command) -> str:
  words = [w for w in cmd.words() if not re.match(r"^[A-Za-z_]\w*=", w)]
  for w in words[:2]:
    if w.startswith("scripts/"):
      return w
  return ""


# ----------------------------------------------------------------------------- fast checks


def test_docs_have_commands():
  cmds = all_commands()
  assert len(cmds) >= 20, [c.where for c in cmds]
  assert any(script_of(c) == "scripts/train.py" for c in cmds)


def test_every_command_is_run_or_skipped_for_a_reason():
  unknown = [f"{c.where}: {c.text}" for c in all_commands() if classify(c)[0] == "unknown"]
  assert not unknown, ("commands with a program this test neither runs nor skips; add it to "
                       "RUNNABLE or SKIP (with the reason) in tests/test_docs_commands.py:\n"
                       + "\n".join(unknown))


def test_documented_scripts_exist():
  missing = []
  for c in all_commands():
    for w in c.words():
      for ref in re.findall(r"(?:^|=|/)(scripts/[\w./-]+\.(?:py|sh|sbatch))", w):
        if not os.path.isfile(os.path.join(REPO, ref)):
          missing.append(f"{c.where}: {ref}")
  assert not missing, missing


def _config_file(value: str) -> str:
  return value.split(":", 1)[0]


def test_documented_config_files_exist():
  missing = []
  for path in DOCS:
    text = open(os.path.join(REPO, path)).read()
    for ref in set(re.findall(r"--config=([\w./-]+)", text)):
      if ref.endswith(".py") and not os.path.isfile(os.path.join(REPO, _config_file(ref))):
        missing.append(f"{path}: --config={ref}")
  assert not missing, missing


_CONFIG_CACHE = {}


def load_config(rel: str):
  if rel not in _CONFIG_CACHE:
    spec = importlib.util.spec_from_file_location(
        "_doc_cfg_" + re.sub(r"\W", "_", rel), os.path.join(REPO, rel))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _CONFIG_CACHE[rel] = module.get_config()
  return _CONFIG_CACHE[rel]


def has_key(cfg, key: str) -> bool:
  node = cfg
  for part in key.split("."):
    try:
      if part not in node:
        return False
      node = node[part]
    except TypeError:
      return False
  return True


# Keys the docs misspell to show the error it gives.
MISSPELT_ON_PURPOSE = {"train.stepz"}


def test_documented_config_keys_exist():
  """--config.KEY in commands: a key of that command's config; in prose: of configs/base.py
  (or, for keys of other config families such as sweeps, of some file in configs/)."""
  base = load_config("configs/base.py")
  others = [load_config(os.path.relpath(p, REPO))
            for p in sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
            if not os.path.basename(p).startswith("_")]  # _x.py: helpers, not configs
  bad = []
  for c in all_commands():
    words = c.words()
    files = [_config_file(w.split("=", 1)[1]) for w in words if w.startswith("--config=")]
    cfg = load_config(files[0]) if files and os.path.isfile(os.path.join(REPO, files[0])) else base
    for w in words:
      m = re.match(r"^--config\.([\w.]+)=", w)
      if m and not PLACEHOLDER.fullmatch(m.group(1)) and not has_key(cfg, m.group(1)):
        bad.append(f"{c.where}: --config.{m.group(1)} (not in {files[0] if files else 'base'})")
  for path in DOCS:
    for n, line in enumerate(open(os.path.join(REPO, path)), 1):
      for key in re.findall(r"--config\.([a-z_][\w.]*[a-z0-9_])", line):
        if key in MISSPELT_ON_PURPOSE:
          continue
        if not has_key(base, key) and not any(has_key(o, key) for o in others):
          bad.append(f"{path}:{n}: --config.{key}")
  assert not bad, "documented config keys that do not exist:\n" + "\n".join(sorted(set(bad)))


def script_flags(path: str) -> list[str]:
  """Flags a script defines (absl DEFINE_* or argparse add_argument)."""
  text = open(path).read()
  names = re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", text)
  names += re.findall(r"add_argument\(\s*\"--(\w+)\"", text)
  return names


def _help(script: str):
  return subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True,
                        text=True, timeout=120)


def _scripts():
  return sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "scripts", "*.py"))
                if not p.endswith("__init__.py"))


_HELP = {}


def help_results():
  """{script: CompletedProcess of `script --help`}, run once, four at a time."""
  if not _HELP:
    scripts = _scripts()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      _HELP.update(zip(scripts, pool.map(_help, scripts)))
  return _HELP


def test_every_script_answers_help_and_explains_its_flags():
  problems = []
  for script, r in help_results().items():
    text = r.stdout + r.stderr
    if r.returncode != 0:
      problems.append(f"{script} --help: exit {r.returncode}: {text[-300:]}")
      continue
    if len(r.stdout.strip().splitlines()) < 3:
      problems.append(f"{script} --help prints (almost) nothing on stdout")
    for flag in script_flags(os.path.join(REPO, script)):
      if f"--{flag}" not in text and f"--[no]{flag}" not in text:
        problems.append(f"{script} --help does not mention --{flag}")
  assert not problems, "\n".join(problems)


def test_every_script_help_exits_zero():
  bad = [f"{s}: exit {r.returncode}" for s, r in help_results().items() if r.returncode != 0]
  assert not bad, bad


# ----------------------------------------------------------------------------- slow: run them

# Rewrites that keep each documented command short: (script, flag) -> new value from the old
# one (None: the flag was absent); a function returning None leaves the flag out.
def _fewer_steps(old):
  return "3" if old is None else str(max(2, min(int(old) // 20, 6)))


REWRITES = {
    "scripts/train.py": {
        "--config.train.steps": _fewer_steps,
        "--config.train.batch_size": lambda old: "4",
        "--config.train.log_every": lambda old: "1",
        "--config.train.eval_every": lambda old: "2",
        "--config.data.eval_batches": lambda old: "1",
        "--config.checkpoint.every": lambda old: "1",
    },
    "scripts/sample.py": {"--max_new_tokens": lambda old: str(min(int(old or 64), 8))},
    "scripts/evaluate.py": {"--max_batches": lambda old: "2"},
    "scripts/train_tokenizer.py": {
        "--vocab_size": lambda old: str(min(int(old or 8000), 1000)),
        "--input_sentence_size": lambda old: "20000",
    },
    "scripts/sweep_isoflop.py": {
        # a sweep trains many models: only the plan (or what was asked: print/collect)
        "--dry_run": lambda old: old,
    },
    "scripts/launch_tpu_pod.py": {"--dry_run": lambda old: old},
    # the ablations train ~20 models: only the plan (or the regeneration of the tables)
    "scripts/ablate.py": {"--dry_run": lambda old: old},
    # benchmarks (run as `python -m benchmarks.X`): tiny sizes, one timed repeat
    "benchmarks.bench_layer": {"--T": lambda old: "64", "--N": lambda old: "1024",
                               "--repeats": lambda old: "1"},
    "benchmarks.bench_optim": {"--N": lambda old: "1024", "--rows": lambda old: "256",
                               "--repeats": lambda old: "1"},
    "benchmarks.bench_train": {"--repeats": lambda old: "1"},
    "benchmarks.bench_pallas": {"--T": lambda old: "64", "--N": lambda old: "1024",
                                "--repeats": lambda old: "1"},
}


def _redirect(word: str, tmp: str) -> str:
  """Outputs under /tmp/ and ~/ go into tmp (inputs and relative paths are left alone)."""
  def sub(value):
    for prefix in OUTPUT_PREFIXES:
      if value.startswith(prefix):
        return os.path.join(tmp, prefix.strip("/~") or "home", value[len(prefix):])
    return value
  if word.startswith("--") and "=" in word:
    flag, value = word.split("=", 1)
    value = ",".join(("=".join(p.split("=")[:-1] + [sub(p.split("=")[-1])]) if "=" in p
                      else sub(p)) for p in value.split(","))
    return f"{flag}={value}"
  return sub(word)


def rewrite(cmd: Command, tmp: str):
  """(argv, env) of the shortened command, outputs redirected into tmp."""
  env = dict(os.environ, HOME=os.path.join(tmp, "home"), PYTHONUNBUFFERED="1")
  words = cmd.words()
  while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
    k, v = words.pop(0).split("=", 1)
    env[k] = v
  words = [os.path.expandvars(w.replace("$HOME", env["HOME"])) for w in words]
  words = [_redirect(w, tmp) for w in words]
  if words[0].startswith("python"):
    words[0] = sys.executable
  script = next((w for w in words[1:2] if w.startswith("scripts/")), "")
  if words[1:2] == ["-m"] and len(words) > 2:
    script = words[2]  # a module, e.g. benchmarks.bench_layer
  table = REWRITES.get(script, {})
  # `--flag value` (argparse's other spelling) -> `--flag=value`, for the rewrites below
  i = 1
  while i < len(words) - 1:
    if words[i] in table and words[i] != "--dry_run" and not words[i + 1].startswith("-"):
      words[i:i + 2] = [f"{words[i]}={words[i + 1]}"]
    i += 1
  flags_seen = {}
  for i, w in enumerate(words):
    flag = w.split("=", 1)[0]
    if flag in table:
      flags_seen[flag] = i
  for flag, fn in table.items():
    if flag == "--dry_run":
      if "--dry_run" not in words and "--collect_only" not in words and not any(
          w.startswith("--launcher=print") for w in words):
        words.append("--dry_run")
      continue
    if flag in flags_seen:
      i = flags_seen[flag]
      new = fn(words[i].split("=", 1)[1] if "=" in words[i] else None)
      words[i] = f"{flag}={new}"
    else:
      new = fn(None)
      if new is not None:
        words.append(f"{flag}={new}")
  return words, env


def _scratch_checkout(tmp: str) -> str:
  """tmp/repo: a symlink to every top-level entry of the checkout except its outputs (runs/,
  tokenizers/), beside tmp/shared -> the real ../shared, so commands run exactly as typed
  (relative workdirs included) and write only into tmp."""
  root = os.path.join(tmp, "repo")
  os.makedirs(root, exist_ok=True)
  for name in os.listdir(REPO):
    if name in ("runs", "tokenizers", ".git") or os.path.lexists(os.path.join(root, name)):
      continue
    os.symlink(os.path.join(REPO, name), os.path.join(root, name))
  shared = os.path.join(os.path.dirname(REPO), "shared")
  if os.path.isdir(shared) and not os.path.lexists(os.path.join(tmp, "shared")):
    os.symlink(shared, os.path.join(tmp, "shared"))
  return root


def _runnable_by_file():
  cmds = [c for c in all_commands() if classify(c)[0] == "run"]
  return {f: [c for c in cmds if c.file == f] for f in DOCS if any(c.file == f for c in cmds)}


@pytest.fixture(scope="module")
def docs_tmp(tmp_path_factory):
  return str(tmp_path_factory.mktemp("docs_commands"))


_PASSED = set()  # command texts already run successfully (README and docs repeat some)


@pytest.mark.slow
@pytest.mark.parametrize("doc", sorted(_runnable_by_file()))
def test_documented_commands_run(doc, docs_tmp):
  """Each page in its own directory: its commands may build on each other, not on others'."""
  tmp = os.path.join(docs_tmp, re.sub(r"\W", "_", doc))
  for sub in ("tmp", "home"):
    os.makedirs(os.path.join(tmp, sub), exist_ok=True)
  cwd = _scratch_checkout(tmp)
  failures, last_rc = [], None
  cmds = _runnable_by_file()[doc]
  for n, cmd in enumerate(cmds):
    key = " ".join(cmd.words())
    workdir = next((w.split("=", 1)[1] for w in cmd.words() if w.startswith("--workdir=")), "")
    used_later = workdir and any(workdir in c.text for c in cmds[n + 1:])
    if cmd.text == "echo $?":  # the exit code the docs show for the command before it
      if cmd.output and str(last_rc) != cmd.output:
        failures.append(f"{cmd.where}: the previous command exited {last_rc}, the docs say "
                        f"{cmd.output}")
      continue
    if (key in _PASSED and "--workdir=runs/" in key and "init_from" not in key
        and not used_later):
      continue  # trained already (in another page's directory) and nothing here reads it
    argv, env = rewrite(cmd, tmp)
    try:
      r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
      failures.append(f"{cmd.where}: timed out: {shlex.join(argv)}")
      last_rc = None
      continue
    last_rc = r.returncode
    if cmd.expect_error:
      want = cmd.expect_error.split(":", 3)[:3]
      if r.returncode == 0 or ":".join(want) not in r.stderr:
        failures.append(f"{cmd.where}: expected `{cmd.expect_error}`, got exit {r.returncode}: "
                        f"{r.stderr[-500:]}")
    elif r.returncode != 0:
      failures.append(f"{cmd.where}: exit {r.returncode}: {shlex.join(argv)}\n"
                      f"{(r.stdout + r.stderr)[-1500:]}")
    else:
      _PASSED.add(key)
  assert not failures, "\n\n".join(failures)
