"""``imgclf runs``: list, show, compare and delete runs; parse, call ``imgclf_cli.run_catalog``
(``run_comparison``, ``run_cleanup``), render.

``build_runs_app`` makes the group; ``imgclf_cli.cli.app`` registers it with its error boundary
and usage-line class (passed in: this module cannot import ``app``, which imports it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from imgclf_cli.cli.options import JsonOption, RunsDirOption, flag
from imgclf_cli.cli.runs_view import human_size, render_comparison, render_details, render_list, styled_status
from imgclf_cli.console import err, make_table, out, print_json, warn
from imgclf_cli.errors import ImgclfError, UsageError
from imgclf_cli.run_catalog import DEFAULT_SORT, SORT_KEYS, STATUSES

if TYPE_CHECKING:
    from typer.core import TyperCommand

    from imgclf_cli.run_cleanup import DeletionPlan

StatusOption = Annotated[
    str | None,
    typer.Option(
        "--status",
        help=f"Only runs of these statuses, comma-separated: {', '.join(STATUSES)}.",
        metavar="S[,S...]",
        show_default=False,
    ),
]
SortOption = Annotated[
    str,
    typer.Option(
        "--sort",
        help=f"Order: {', '.join(SORT_KEYS)} (best, largest or newest first).",
        metavar="KEY",
    ),
]
LimitOption = Annotated[
    int | None, typer.Option("--limit", help="At most N runs.", min=1, metavar="N", show_default=False)
]
YesOption = Annotated[bool, flag("--yes", "-y", help="Delete without asking.")]
ListJsonOption = Annotated[bool, flag("--json", help="Print the runs as one JSON list of objects on stdout.")]


def runs_callback(
    ctx: typer.Context,
    runs_dir: RunsDirOption = None,
    status: StatusOption = None,
    sort: SortOption = DEFAULT_SORT,
    limit: LimitOption = None,
    json_output: ListJsonOption = False,
) -> None:
    """See, compare and clean the run store. Without a command: the list of runs (`runs list`).

    Example:

    \b
        imgclf runs                              # every run, newest first
        imgclf runs --status failed,crashed --json
        imgclf runs show latest
        imgclf runs compare RUN_A RUN_B --plot curves.png
        imgclf runs prune --keep 5 --status failed,interrupted
    """
    if ctx.invoked_subcommand is not None:
        given = [
            name
            for name, value, default in (
                ("--runs-dir", runs_dir, None),
                ("--status", status, None),
                ("--sort", sort, DEFAULT_SORT),
                ("--limit", limit, None),
                ("--json", json_output, False),
            )
            if value != default
        ]
        if given:
            raise UsageError(
                f"{', '.join(given)} before `{ctx.invoked_subcommand}` applies to the run list only",
                f"put it after the command: imgclf runs {ctx.invoked_subcommand} {given[0]} ...",
            )
        return
    list_command(runs_dir, status, sort, limit, json_output)


def list_command(
    runs_dir: RunsDirOption = None,
    status: StatusOption = None,
    sort: SortOption = DEFAULT_SORT,
    limit: LimitOption = None,
    json_output: ListJsonOption = False,
) -> None:
    """The runs of the store, newest first: status, model, dataset, results, exports, size.

    `crashed` is a run recorded as running whose process is gone; `damaged`, one whose meta.json
    is unreadable or whose files are partly missing (the reason is shown).

    Example:

    \b
        imgclf runs list --sort val_accuracy --limit 10
        imgclf runs list --status completed --json
    """
    from imgclf_cli import run_catalog, store

    summaries = run_catalog.list_catalog(runs_dir, status, sort, limit)
    if json_output:
        print_json([summary.to_dict() for summary in summaries])
        return
    root = store.runs_root(runs_dir)
    if not summaries:
        what = f"No runs with status {status}" if status else "No runs"
        err.print(f"{what} in {escape(str(root))}", highlight=False)
        return
    render_list(summaries, f"Runs in {root}")


def show_command(
    run: Annotated[
        str, typer.Argument(help="Run id (or a unique prefix), run folder, or 'latest'.", metavar="RUN")
    ],
    runs_dir: RunsDirOption = None,
    full: Annotated[
        bool, flag("--full", help="Every config key, not only those that differ from the defaults.")
    ] = False,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            help="Write a self-contained HTML report of the run to FILE instead.",
            dir_okay=False,
            metavar="FILE",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Everything about one run: config, dataset and split, metrics, evaluations, exports, files.

    The config shows the keys that differ from imgclf's defaults (--full: every key).

    Example:

    \b
        imgclf runs show latest
        imgclf runs show 20261128-184427 --full
        imgclf runs show latest --html report.html
    """
    from imgclf_cli.run_catalog import find_run, run_details

    run_dir = find_run(run, runs_dir)
    if html is not None:
        from imgclf_cli.run_report import write_html_report

        write_html_report(run_dir, html)
        (err if json_output else out).print(f"Report written to {escape(str(html))}", highlight=False)
        if not json_output:
            return
    details = run_details(run_dir)
    if json_output:
        print_json(details.to_dict(full=full))
        return
    render_details(details, full)


def compare_command(
    runs: Annotated[
        list[str], typer.Argument(help="Two runs or more (ids, prefixes, folders).", metavar="RUN...")
    ],
    runs_dir: RunsDirOption = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also write the validation curves of the runs, overlaid, to FILE (PNG).",
            dir_okay=False,
            metavar="FILE",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Runs side by side: config differences, dataset, best metrics, per-class F1, time.

    Per-class F1 is shown for each evaluation (eval/NAME) that two runs or more have.

    Example:

    \b
        imgclf runs compare 20261128-101500 20261128-113000
        imgclf runs compare RUN_A RUN_B RUN_C --plot curves.png --json
    """
    from imgclf_cli.run_catalog import find_run
    from imgclf_cli.run_comparison import compare_runs, plot_validation_curves

    run_dirs = [find_run(reference, runs_dir) for reference in runs]
    comparison = compare_runs(run_dirs)
    if plot is not None:
        plot_validation_curves([summary.path for summary in comparison.runs], plot)
    if json_output:
        print_json({**comparison.to_dict(), "plot": str(plot) if plot else None})
    else:
        render_comparison(comparison)
    if plot is not None:
        (err if json_output else out).print(
            f"Validation curves written to {escape(str(plot))}", highlight=False
        )


def stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def carry_out(plan: DeletionPlan, yes: bool, named_explicitly: bool) -> None:
    """Show ``plan``, ask (unless ``yes``), delete exactly what was shown, report."""
    from imgclf_cli.run_cleanup import delete_runs

    for skipped in plan.skipped:
        warn(f"Not deleting {escape(skipped.summary.run_id)}: {escape(skipped.reason)}")
    if plan.empty:
        err.print("Nothing to delete.", highlight=False)
        refuse_named(plan.skipped if named_explicitly else [])
        return
    rows = [
        [
            escape(summary.run_id),
            styled_status(summary.status),
            summary.started,
            human_size(summary.size_bytes),
        ]
        for summary in plan.runs
    ]
    rows += [[escape(path.name), "leftover of an interrupted rm", None, None] for path in plan.leftovers]
    title = f"To delete: {len(plan.runs)} run(s), {human_size(plan.total_bytes)}"
    out.print(make_table(["run", "status", "started", "disk"], rows, title=title, numeric=["disk"]))
    if not yes:
        if not stdin_is_terminal():
            size = human_size(plan.total_bytes)
            raise ImgclfError(
                f"Not deleting {len(plan.runs)} run(s) ({size}) without confirmation: "
                "stdin is not a terminal to ask on",
                "pass --yes to delete them",
            )
        if not typer.confirm(f"Delete {len(plan.runs)} run(s), {human_size(plan.total_bytes)}?", err=True):
            err.print("Nothing deleted.", highlight=False)
            raise typer.Exit(1)
    result = delete_runs(plan)
    for skipped in result.skipped:
        warn(f"Not deleted {escape(skipped.summary.run_id)}: {escape(skipped.reason)}")
    for trash in result.left_behind:
        warn(f"Could not remove all of {escape(str(trash))}; the next rm or prune tries again")
    out.print(
        f"Deleted {len(result.deleted)} run(s), {human_size(result.freed_bytes)} freed.", highlight=False
    )
    refuse_named([*(plan.skipped if named_explicitly else []), *result.skipped])


def refuse_named(skipped: Sequence[Any]) -> None:
    """Exit 1 when a run asked for was not deleted (a live training is never touched)."""
    if skipped:
        names = ", ".join(item.summary.run_id for item in skipped)
        raise ImgclfError(
            f"Not deleted: {names} ({skipped[0].reason})",
            "wait for the training to finish, or stop it first (Ctrl-C keeps the run resumable)",
        )


def rm_command(
    runs: Annotated[
        list[str], typer.Argument(help="Runs to delete (ids, prefixes, folders).", metavar="RUN...")
    ],
    runs_dir: RunsDirOption = None,
    yes: YesOption = False,
) -> None:
    """Delete runs: shows them and their size, asks (unless --yes), never touches a running run.

    Each run is renamed to a hidden trash folder first, then removed: readers see it or nothing.

    Example:

    \b
        imgclf runs rm 20261128-101500-imgclf-cnn
        imgclf runs rm RUN_A RUN_B --yes
    """
    from imgclf_cli.run_cleanup import plan_removal

    carry_out(plan_removal(runs, runs_dir), yes, named_explicitly=True)


def prune_command(
    keep: Annotated[
        int, typer.Option("--keep", help="How many of the newest runs to keep.", min=0, metavar="N")
    ],
    status: StatusOption = None,
    runs_dir: RunsDirOption = None,
    yes: YesOption = False,
) -> None:
    """Delete all but the N newest runs (of --status; default: every status but running).

    Shows what will be deleted and its size, asks (unless --yes); a running run is never deleted.

    Example:

    \b
        imgclf runs prune --keep 5
        imgclf runs prune --keep 0 --status failed,interrupted,crashed --yes
    """
    from imgclf_cli.run_cleanup import plan_prune

    carry_out(plan_prune(keep, status, runs_dir), yes, named_explicitly=False)


# Each command's line in `imgclf runs --help`.
COMMANDS = {
    "list": (list_command, "List the runs, newest first (the default command)."),
    "show": (show_command, "Everything about one run (--json, --html)."),
    "compare": (compare_command, "Runs side by side; --plot overlays their validation curves."),
    "rm": (rm_command, "Delete runs (asks first; never a running one)."),
    "prune": (prune_command, "Delete all but the N newest runs."),
}


def build_runs_app(
    boundary: Callable[[Callable[..., Any]], Callable[..., Any]], command_class: type[TyperCommand]
) -> typer.Typer:
    """The ``imgclf runs`` group, each command (and the group's own list) through ``boundary``."""
    runs_app = typer.Typer(
        add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None, no_args_is_help=False
    )
    runs_app.callback(invoke_without_command=True)(boundary(runs_callback))
    for name, (function, summary) in COMMANDS.items():
        runs_app.command(name, cls=command_class, short_help=summary)(boundary(function))
    return runs_app
