"""Orbax's console noise after a failed write, kept off the console.

A full disk makes Orbax log every failed background write with its traceback, and
TensorStore call back into an event loop Orbax has closed; peer_jax reports the failure
itself, as one line. PEER_JAX_ORBAX_LOGS=1 shows them again.
"""

import logging as pylogging
import os
import sys


class _DropOrbaxRecords(pylogging.Filter):
  """Orbax logs every failed background write with its traceback (thousands of lines on a
  full disk); peer_jax reports the failure itself, as one line."""

  def filter(self, record):
    return "orbax" not in (record.pathname or "") or os.environ.get("PEER_JAX_ORBAX_LOGS")


def _is_closed_loop_noise(exc_type, exc) -> bool:
  """A TensorStore callback into an event loop Orbax has closed after a failed read/write:
  harmless, but printed as a traceback from a background thread."""
  return exc_type is RuntimeError and "Event loop is closed" in str(exc)


def _install_noise_hooks() -> None:
  import threading
  if getattr(sys.excepthook, "peer_jax", False):
    return
  previous_sys, previous_thread = sys.excepthook, threading.excepthook

  def sys_hook(exc_type, exc, tb):
    if not _is_closed_loop_noise(exc_type, exc):
      previous_sys(exc_type, exc, tb)

  def thread_hook(args):
    if not _is_closed_loop_noise(args.exc_type, args.exc_value):
      previous_thread(args)

  sys_hook.peer_jax = True
  sys.excepthook, threading.excepthook = sys_hook, thread_hook


def quiet_orbax_logs() -> None:
  if not os.environ.get("PEER_JAX_ORBAX_LOGS"):
    _install_noise_hooks()
  for name in ("absl", ""):
    logger = pylogging.getLogger(name)
    if not any(isinstance(f, _DropOrbaxRecords) for f in logger.filters):
      logger.addFilter(_DropOrbaxRecords())
    for handler in logger.handlers:
      if not any(isinstance(f, _DropOrbaxRecords) for f in handler.filters):
        handler.addFilter(_DropOrbaxRecords())
