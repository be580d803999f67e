"""Deleting runs (``imgclf runs rm`` and ``runs prune``): planned first, then carried out.

A plan names exactly the runs it will delete, with their sizes, and the runs it will not touch
(a run being trained: its lock is held, or its heartbeat is fresh), so that the CLI shows it
and asks before anything happens; ``delete_runs`` then deletes the plan's runs and nothing else.

A run disappears at once for every reader: under its training lock (so that no ``--resume`` can
start meanwhile) its folder is renamed to a hidden ``.trash-<run id>-<pid>`` in the same parent,
which no listing shows, and only then removed. A trash folder left by an ``rm`` that was
interrupted (Ctrl-C, a crash) is shown and removed by the next ``rm`` or ``prune``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imgclf_cli import liveness, store
from imgclf_cli.errors import UsageError
from imgclf_cli.liveness import RunBusyError
from imgclf_cli.run_catalog import (
    STATUSES,
    RunSummary,
    find_run,
    list_catalog,
    parse_statuses,
    read_meta_leniently,
    scan_folder,
    summarize_run,
)

TRASH_PREFIX = ".trash-"
# What prune considers when --status is not given: every run but one being trained.
PRUNE_STATUSES = tuple(status for status in STATUSES if status != store.STATUS_RUNNING)


@dataclass(frozen=True)
class SkippedRun:
    """A run that is not deleted, and why."""

    summary: RunSummary
    reason: str


@dataclass
class DeletionPlan:
    """What ``delete_runs`` will delete: ``runs``, and the ``leftovers`` of an interrupted rm."""

    root: Path
    runs: list[RunSummary]
    skipped: list[SkippedRun]
    leftovers: list[Path] = field(default_factory=list)
    leftover_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(summary.size_bytes for summary in self.runs) + self.leftover_bytes

    @property
    def empty(self) -> bool:
        return not self.runs and not self.leftovers


@dataclass
class DeletionResult:
    deleted: list[RunSummary] = field(default_factory=list)
    skipped: list[SkippedRun] = field(default_factory=list)
    """Runs of the plan found busy (or not renamable) when their turn came."""
    freed_bytes: int = 0
    left_behind: list[Path] = field(default_factory=list)
    """Trash folders that could not be removed entirely (the next rm or prune tries again)."""


def owner_text(run_dir: Path) -> str:
    """`` by process 123 on host``, when the run's lock file names its trainer."""
    owner = liveness.read_owner(run_dir / liveness.LOCK_FILE)
    return f" by process {owner['pid']} on {owner.get('host', '?')}" if owner.get("pid") else ""


def lock_is_held(lock_path: Path) -> bool:
    """Whether a process holds ``lock_path``'s ``flock`` (a live training on this host)."""
    try:
        descriptor = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without flock: the heartbeat decides
        return False
    finally:
        os.close(descriptor)
    return False


def busy_reason(run_dir: Path) -> str | None:
    """Why ``run_dir`` must not be deleted now (its training is alive), else ``None``."""
    lock_path = run_dir / liveness.LOCK_FILE
    being_trained = f"run {run_dir.name} is being trained right now"
    if lock_path.is_file() and lock_is_held(lock_path):
        return being_trained + owner_text(run_dir)
    meta, _ = read_meta_leniently(run_dir)
    if not lock_path.is_file() and meta.get("status") != store.STATUS_RUNNING:
        return None
    process = meta.get("process")
    if liveness.liveness(run_dir, process if isinstance(process, dict) else None).alive:
        # Another host's training (a shared store), judged by its heartbeat.
        return being_trained + owner_text(run_dir)
    return None


def trash_folders(root: Path) -> list[Path]:
    """Trash left in ``root`` by an rm that did not finish (not one another rm is removing now)."""
    try:
        names = [entry.name for entry in os.scandir(root) if entry.name.startswith(TRASH_PREFIX)]
    except OSError:
        return []
    leftovers = []
    for name in sorted(names):
        writer = name.rsplit("-", 1)[-1]
        if writer.isdigit() and int(writer) != os.getpid() and liveness.pid_exists(int(writer)):
            continue
        leftovers.append(root / name)
    return leftovers


def with_leftovers(plan: DeletionPlan) -> DeletionPlan:
    plan.leftovers = trash_folders(plan.root)
    plan.leftover_bytes = sum(scan_folder(path).size_bytes for path in plan.leftovers)
    return plan


def split_busy(summaries: Iterable[RunSummary]) -> tuple[list[RunSummary], list[SkippedRun]]:
    runs, skipped = [], []
    for summary in summaries:
        reason = busy_reason(summary.path)
        if reason is None:
            runs.append(summary)
        else:
            skipped.append(SkippedRun(summary, reason))
    return runs, skipped


def plan_removal(references: Sequence[str], runs_dir: str | Path | None = None) -> DeletionPlan:
    """The plan of ``imgclf runs rm RUN...``: every reference must name a run (else
    ``RunNotFoundError``, before anything is deleted); runs being trained are skipped."""
    if not references:
        raise UsageError(
            "Name the runs to delete", "imgclf runs rm RUN... (run ids, as imgclf runs lists them)"
        )
    folders = list(dict.fromkeys(find_run(reference, runs_dir) for reference in references))
    runs, skipped = split_busy(summarize_run(folder) for folder in folders)
    return with_leftovers(DeletionPlan(store.runs_root(runs_dir), runs, skipped))


def plan_prune(
    keep: int, statuses: str | Iterable[str] | None = None, runs_dir: str | Path | None = None
) -> DeletionPlan:
    """The plan of ``imgclf runs prune --keep N``: of the runs of ``statuses`` (default: all but
    running), every one but the ``keep`` newest; runs being trained are never deleted."""
    if keep < 0:
        raise UsageError(f"--keep expects 0 or more, got {keep}", "imgclf runs prune --keep 5")
    chosen = parse_statuses(statuses) or set(PRUNE_STATUSES)
    newest_first = [summary for summary in list_catalog(runs_dir) if summary.status in chosen]
    runs, skipped = split_busy(newest_first[keep:])
    return with_leftovers(DeletionPlan(store.runs_root(runs_dir), runs, skipped))


@contextlib.contextmanager
def deletion_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s training lock while it is moved away: a training starting meanwhile
    (``--resume``) is refused instead of writing into a folder being deleted."""
    reason = busy_reason(run_dir)  # before our own lock file could look like a live one
    if reason is not None:
        raise RunBusyError(reason[0].upper() + reason[1:])
    lock_path = run_dir / liveness.LOCK_FILE
    created = not lock_path.exists()
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusyError(
                f"Run {run_dir.name} is being trained right now{owner_text(run_dir)}"
            ) from None
        yield
    finally:
        os.close(descriptor)
        if created and run_dir.is_dir():  # not moved: leave the run as it was
            with contextlib.suppress(OSError):
                lock_path.unlink()


def move_to_trash(run_dir: Path) -> Path:
    """Rename ``run_dir`` to a hidden trash folder beside it; ``RunBusyError`` when it is trained."""
    trash = run_dir.with_name(f"{TRASH_PREFIX}{run_dir.name}-{os.getpid()}")
    if run_dir.is_symlink():  # a link to a run kept elsewhere: only the link goes
        run_dir.rename(trash)
        return trash
    with deletion_lock(run_dir):
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        run_dir.rename(trash)
    with contextlib.suppress(OSError):
        store.fsync_path(trash.parent)
    return trash


def remove_trash(trash: Path) -> bool:
    """Remove a trash folder (or link); whether it is entirely gone."""
    if trash.is_symlink():
        trash.unlink(missing_ok=True)
    else:
        shutil.rmtree(trash, ignore_errors=True)
    return not os.path.lexists(trash)


def delete_runs(plan: DeletionPlan, on_deleted: Callable[[RunSummary], None] | None = None) -> DeletionResult:
    """Delete what ``plan`` lists, and only that; a run that became busy since is skipped."""
    result = DeletionResult()
    for leftover in plan.leftovers:
        if remove_trash(leftover):
            continue
        result.left_behind.append(leftover)
    result.freed_bytes += plan.leftover_bytes
    for summary in plan.runs:
        try:
            trash = move_to_trash(summary.path)
        except RunBusyError as error:
            result.skipped.append(SkippedRun(summary, error.message))
            continue
        except OSError as error:
            reason = f"could not move {summary.path} away: {error.strerror or error}"
            result.skipped.append(SkippedRun(summary, reason))
            continue
        if not remove_trash(trash):
            result.left_behind.append(trash)
        result.deleted.append(summary)
        result.freed_bytes += summary.size_bytes
        if on_deleted is not None:
            on_deleted(summary)
    return result
