"""One trainer per workdir: WORKDIR/trainer.lock, named with the host and pid that hold it.

The lock is a file created atomically (O_EXCL) and held with an advisory `flock` for the
life of the process, so the kernel releases it when the process dies, however it dies.

* A second trainer on the same workdir finds the file and the flock held: it refuses with
  one line naming the holder (host, pid, since when).
* A lock left by a process that is dead (flock free, or the pid gone on this host) is
  taken over, with a warning.
* A lock held by a process on another host cannot be checked from here (flock is not
  reliable across hosts on every file system): it is refused, saying which file to remove
  if that process is known to be gone.

On a multi-host job only process 0 takes the lock (every process trains in the same
workdir by design); `gs://` workdirs are not locked.
"""

import datetime
import errno
import json
import os
import socket
import sys

LOCK_NAME = "trainer.lock"


class WorkdirError(RuntimeError):
  """The workdir is in use by another trainer, or cannot be written (exit 2)."""
  exit_code = 2
  area = "workdir"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  except OSError:
    return False
  return True


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for this process; released on exit."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.enabled = enabled and "://" not in workdir
    self._fd = None
    self.me = {"host": socket.gethostname(), "pid": os.getpid(),
               "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def acquire(self) -> None:
    if not self.enabled:
      return
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        self._take_over_if_stale()  # raises when the lock is held
        continue
      except OSError as e:
        err = WorkdirError(f"cannot create the lock {self.path}: {e.strerror or e}")
        err.exit_code = 4 if e.errno == errno.ENOSPC else 2
        raise err from None
      self._hold(fd)
      return
    raise WorkdirError(f"could not take the lock {self.path} (another trainer keeps "
                       "creating it)")

  def _hold(self, fd: int) -> None:
    try:
      import fcntl
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError):
      pass  # no flock here (e.g. some network file systems): the pid check still works
    try:
      os.write(fd, (json.dumps(self.me) + "\n").encode())
      os.fsync(fd)
    except OSError as e:
      os.close(fd)
      try:
        os.remove(self.path)
      except OSError:
        pass
      err = WorkdirError(f"cannot write the lock {self.path}: {e.strerror or e}")
      err.exit_code = 4 if e.errno == errno.ENOSPC else 2
      raise err from None
    self._fd = fd

  def _take_over_if_stale(self) -> bool:
    """True when the existing lock is stale and was removed; raises when it is held."""
    holder = _read(self.path)
    held = _flock_held(self.path)
    host, pid = holder.get("host"), holder.get("pid")
    who = (f"host {host}, pid {pid}" + (f", since {holder['since']}" if holder.get("since")
                                        else "")) if holder else "unknown process"
    same_host = host == self.me["host"]
    if held is None and same_host and isinstance(pid, int) and pid != os.getpid():
      held = _alive(pid)  # no flock on this file system: ask the process table
    if held:
      raise WorkdirError(
          f"{self.workdir} is in use by another trainer ({who}; lock {self.path}); wait for "
          "it to finish, stop it, or use another --workdir")
    if holder and not same_host:
      raise WorkdirError(
          f"{self.workdir} is locked by a trainer on another host ({who}; lock {self.path}), "
          f"which cannot be checked from here; if that process is gone, delete {self.path} "
          "and rerun")
    print(f"warning: workdir: taking over the lock {self.path} of a trainer that is no "
          f"longer running ({who})", file=sys.stderr, flush=True)
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass
    except OSError as e:
      raise WorkdirError(f"cannot remove the stale lock {self.path}: {e.strerror or e}") from None
    return True

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      if _read(self.path).get("pid") == self.me["pid"] and \
          _read(self.path).get("host") == self.me["host"]:
        os.remove(self.path)
    except OSError:
      pass
    try:
      os.close(self._fd)
    except OSError:
      pass
    self._fd = None


def _flock_held(path: str):
  """True if a live process holds the flock of `path`, False if free, None if unknown."""
  try:
    import fcntl
    fd = os.open(path, os.O_RDONLY)
  except (ImportError, OSError):
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    return True if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
  else:
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False
  finally:
    os.close(fd)
