"""Is a run's training process alive? Its lock file, heartbeat and the ``crashed`` status.

A training holds ``<run>/.train.lock`` while it runs: an exclusive ``flock`` on it (released by
the kernel when the process dies, however it dies), the owner's identity written in it (host,
process id, process start time, boot id), and its modification time refreshed every
``HEARTBEAT_SECONDS`` by a thread, so that a long epoch does not look like a dead process.

A reader decides from that file whether a run recorded as ``running`` still is:

- same host: alive while the process id exists and is the same process (its start time and
  the boot id match; a reused pid is not the owner);
- another host (a shared store): alive while the heartbeat is younger than
  ``STALE_AFTER_SECONDS``.

Otherwise the run ``crashed`` (``kill -9``, the OOM killer, a power cut, a preempted VM), and its
last sign of life is the lock file's modification time. Standard library only: listing runs and
resolving ``latest`` never import TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf_cli.errors import ImgclfError, StoreError

LOCK_FILE = ".train.lock"
HEARTBEAT_SECONDS = 10.0
# A heartbeat this old from another host means its process is gone (a few missed beats: a
# loaded machine or a slow shared filesystem may delay one or two).
STALE_AFTER_SECONDS = 120.0


class RunBusyError(ImgclfError):
    """The run is being trained by a live process."""


def this_host() -> str:
    return socket.gethostname()


def boot_id() -> str | None:
    """This boot of the machine (Linux): a pid from before a reboot is not the same process."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux); ``None`` elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of stat(5)
    except (IndexError, ValueError):
        return None


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or a pid this system cannot have)
    return True


def current_owner() -> dict[str, Any]:
    """The identity of this process, as a lock file and meta.json record it."""
    pid = os.getpid()
    return {
        "host": this_host(),
        "pid": pid,
        "process_start": process_start(pid),
        "boot_id": boot_id(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def owner_alive(owner: dict[str, Any], heartbeat_age: float | None) -> bool:
    """Whether the process ``owner`` describes is running (see the module's rules)."""
    if owner.get("host") == this_host():
        recorded_boot, our_boot = owner.get("boot_id"), boot_id()
        if recorded_boot and our_boot and recorded_boot != our_boot:
            return False
        pid = owner.get("pid")
        if not isinstance(pid, int) or not pid_exists(pid):
            return False
        recorded_start = owner.get("process_start")
        return recorded_start is None or process_start(pid) in (None, recorded_start)
    return heartbeat_age is not None and heartbeat_age < STALE_AFTER_SECONDS


def read_owner(lock_path: Path) -> dict[str, Any]:
    """The owner recorded in a lock file; ``{}`` when it is being written or unreadable."""
    try:
        document = json.loads(lock_path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


@dataclass(frozen=True)
class Liveness:
    """What a reader can tell about a ``running`` run's process."""

    alive: bool
    last_seen: float | None
    """The last sign of life (seconds since the epoch): the heartbeat, else meta.json's mtime."""
    owner: dict[str, Any]

    def last_seen_text(self, now: float | None = None) -> str:
        """``2026-11-28 18:40:12, 3 min ago``, or ``unknown``."""
        if self.last_seen is None:
            return "unknown"
        age = max(0.0, (now or time.time()) - self.last_seen)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.last_seen))
        return f"{when}, {describe_age(age)} ago"


def describe_age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def liveness(run_dir: Path, recorded_owner: dict[str, Any] | None = None) -> Liveness:
    """Whether the training of ``run_dir`` (recorded as running) is alive.

    A run without a lock file (killed before it took one, or written by an older imgclf) is
    judged by meta.json's age and the owner meta.json records, if any.
    """
    lock_path = run_dir / LOCK_FILE
    try:
        heartbeat = lock_path.stat().st_mtime
        owner = read_owner(lock_path) or dict(recorded_owner or {})
    except OSError:
        owner = dict(recorded_owner or {})
        try:
            heartbeat = (run_dir / "meta.json").stat().st_mtime
        except OSError:
            return Liveness(False, None, owner)
    age = time.time() - heartbeat
    if not owner:
        # Being written this instant, or no identity at all: only the heartbeat can tell.
        return Liveness(age < STALE_AFTER_SECONDS, heartbeat, owner)
    return Liveness(owner_alive(owner, age), heartbeat, owner)


class TrainingLock:
    """The exclusive right to train a run, with a heartbeat; a context manager.

    ``acquire`` fails with ``RunBusyError`` when a live process holds it. Two processes racing
    for the same run cannot both get it: the ``flock`` is exclusive, and a lock file replaced
    between our ``open`` and our ``flock`` is detected (we then try again on the new one).
    """

    def __init__(self, run_dir: Path, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.heartbeat_seconds = heartbeat_seconds
        self.descriptor: int | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def acquire(self) -> TrainingLock:
        try:
            return self.try_acquire()
        except OSError as error:  # a full or read-only disk
            raise StoreError(
                f"Cannot write {self.path}: {error.strerror or error}",
                "free some space or fix the folder's permissions, then try again",
            ) from None

    def try_acquire(self) -> TrainingLock:
        import fcntl

        for _ in range(10):
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                raise self.busy(read_owner(self.path)) from None
            try:
                same_file = os.fstat(descriptor).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # removed by its previous holder meanwhile: lock the new one
                os.close(descriptor)
                continue
            previous = read_owner(self.path)
            if previous and previous.get("host") != this_host():
                # flock may not reach across hosts on a shared filesystem: trust the heartbeat.
                age = time.time() - os.fstat(descriptor).st_mtime
                if owner_alive(previous, age):
                    os.close(descriptor)
                    raise self.busy(previous)
            owner = json.dumps(current_owner()).encode()
            try:
                os.ftruncate(descriptor, 0)
                os.pwrite(descriptor, owner, 0)
                os.fsync(descriptor)
            except OSError:
                os.close(descriptor)
                raise
            self.descriptor = descriptor
            self.thread = threading.Thread(target=self.beat, name="imgclf-heartbeat", daemon=True)
            self.thread.start()
            return self
        raise RunBusyError(f"Could not lock {self.run_dir.name} (its lock file keeps changing)")

    def busy(self, owner: dict[str, Any]) -> RunBusyError:
        who = f"process {owner.get('pid', '?')} on {owner.get('host', 'an unknown host')}"
        return RunBusyError(
            f"Run {self.run_dir.name} is being trained right now by {who}",
            "wait for it to finish, or stop that process first (Ctrl-C keeps the run resumable)",
        )

    def beat(self) -> None:
        while not self.stopping.wait(self.heartbeat_seconds):
            # A failed beat (a full disk, a hiccup of a network filesystem) is retried next time.
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self, remove: bool = True) -> None:
        """Stop the heartbeat and give the lock up (removing the lock file unless ``remove`` is
        false: a test simulating a crash keeps it)."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.descriptor is not None:
            if remove:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            os.close(self.descriptor)
            self.descriptor = None

    def __enter__(self) -> TrainingLock:
        return self.acquire() if self.descriptor is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
