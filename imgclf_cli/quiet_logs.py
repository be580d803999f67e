"""Keeping TensorFlow's and LiteRT's start-up chatter off stderr (``IMGCLF_DEBUG=1`` shows it all).

``TF_CPP_MIN_LOG_LEVEL=2`` (set unless the user set it) hides TensorFlow's C++ INFO and WARNING
logs, but not what TensorFlow 2.21 prints while it loads: absl writes every message logged
before ``absl::InitializeLog()`` straight to stderr (oneDNN and CUDA notices, once per bundled
library), whatever the environment says. Nor does anything turn off LiteRT's
``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.``. So ``native_stderr_filtered()``
captures what native code writes to file descriptor 2 while such a library starts, and passes
on every line that is not one of the known notices: real errors still reach the user.

``install()`` (called once by ``imgclf``'s ``main()``) sets the environment and makes the
first ``import tensorflow`` run inside that filter; ``imgclf_cli.inference`` wraps the creation
of LiteRT interpreters in it. Standard library only, and cheap to import.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

DEBUG_VARIABLE = "IMGCLF_DEBUG"
# TensorFlow's C++ logging: 2 keeps ERROR and FATAL (and hides INFO and WARNING).
ENVIRONMENT_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "2"}

# What native code prints while TensorFlow or LiteRT starts and nobody can act on.
NOTICES = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",  # the second line of the previous notice
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "TF-TRT Warning: Could not find TensorRT",
    "Created TensorFlow Lite XNNPACK delegate for CPU",
)
# CUDA failing to start is noise on a machine without an NVIDIA GPU, and the only clue on a
# machine with one (whose driver nodes exist: /dev/nvidiactl, or /dev/dxg under WSL 2).
CUDA_NOTICES = ("Could not find cuda drivers on your machine", "failed call to cuInit")
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/dxg")
# File descriptor 2 is one per process: two threads swapping it at once could leave it pointing
# at a temporary file, so one filter at a time (re-entrant for nested ones).
FILTER_LOCK = threading.RLock()


def debug_enabled() -> bool:
    return bool(os.environ.get(DEBUG_VARIABLE))


def is_notice(line: str) -> bool:
    if any(notice in line for notice in NOTICES):
        return True
    return any(notice in line for notice in CUDA_NOTICES) and not any(
        os.path.exists(node) for node in GPU_DEVICE_NODES
    )


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """Hold back the known start-up notices that native code writes to stderr in this block.

    Everything written to file descriptor 2 meanwhile (by C++ code, or by Python) is kept in a
    temporary file and written out when the block ends, less those notices. Does nothing when
    ``IMGCLF_DEBUG`` is set or when stderr is closed.
    """
    if debug_enabled():
        yield
        return
    import tempfile

    with FILTER_LOCK, tempfile.TemporaryFile() as captured:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (AttributeError, OSError, ValueError):  # no sys.stderr, or file descriptor 2 closed
            saved = None
        if saved is None:
            yield
            return
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().splitlines(keepends=True)
            kept = b"".join(line for line in lines if not is_notice(line.decode(errors="replace")))
            remaining = memoryview(kept)
            while remaining:
                remaining = remaining[os.write(2, remaining) :]


class _FilteredLoader:
    """Runs a module's code inside ``native_stderr_filtered()``, then gives it back its loader."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        with native_stderr_filtered():
            self.loader.exec_module(module)
            # Probing the devices is when CUDA reports that it cannot start: do it here, once.
            with contextlib.suppress(Exception):
                module.config.list_physical_devices()


class _FilteredTensorFlowImport:
    """A ``sys.meta_path`` entry that wraps the first ``import tensorflow``, then removes itself."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "tensorflow":
            return None
        uninstall_import_filter()
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _FilteredLoader(spec.loader)
        return spec


def uninstall_import_filter() -> None:
    sys.meta_path[:] = [entry for entry in sys.meta_path if not isinstance(entry, _FilteredTensorFlowImport)]


def install() -> None:
    """Quiet TensorFlow and LiteRT for this process, before either is imported (idempotent).

    Sets ``TF_CPP_MIN_LOG_LEVEL=2`` unless the user set it, and filters what TensorFlow prints
    while it is imported. With ``IMGCLF_DEBUG`` set, does nothing.
    """
    if debug_enabled():
        return
    for name, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if "tensorflow" not in sys.modules and not any(
        isinstance(entry, _FilteredTensorFlowImport) for entry in sys.meta_path
    ):
        sys.meta_path.insert(0, _FilteredTensorFlowImport())
