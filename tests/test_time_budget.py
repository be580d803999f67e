"""``imgclf train --time``: durations, the clock that plans training, the schedule that follows it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgclf_cli import store
from imgclf_cli.cli.app import app
from imgclf_cli.time_budget import FINISH_SECONDS, BudgetClock, format_duration, parse_duration

from conftest import make_class_folders


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("5m", 300),
        ("1.5h", 5400),
        ("1h30m", 5400),
        ("45", 45),
        ("5min", 300),
        (" 2 minutes", 120),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "0", "0s", "5x", "-3s", "5m-"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_durations_read_back() -> None:
    assert [format_duration(seconds) for seconds in (20, 95, 300, 5400)] == ["20s", "1m35s", "5m", "1h30m"]


def test_a_bad_budget_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["train", "sample_data", "--time", "soon"])
    assert result.exit_code == 2  # a bad value is a usage error, as a bad key is
    assert "train.time_budget" in result.stderr and "90s, 5m, 1.5h" in result.stderr


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_clock_saves_time_for_the_last_validation_and_the_summary() -> None:
    fake = FakeTime()
    clock = BudgetClock(deadline=fake.now + 60.0, now=fake)
    clock.start()
    clock.validation_seconds, clock.checkpoint_seconds = 3.0, 1.0
    assert clock.reserve_seconds() == 3.0 + 1.0 + FINISH_SECONDS
    training_time = 60.0 - clock.reserve_seconds()
    fake.now += training_time / 2
    assert clock.progress() == pytest.approx(0.5)
    assert not clock.expired()
    fake.now += training_time / 2
    assert clock.expired() and clock.progress() == 1.0


def test_the_clock_plans_from_steady_epochs_not_the_first() -> None:
    fake = FakeTime()
    clock = BudgetClock(deadline=fake.now + 100.0, now=fake)
    clock.start()
    assert clock.epochs_that_fit(0) is None
    fake.now += 20.0  # the first epoch decodes every image and traces the model
    clock.epoch_seconds.append(20.0)
    assert clock.epochs_that_fit(1) == 1 + int((80.0 - FINISH_SECONDS) // 20.0)
    fake.now += 5.0
    clock.epoch_seconds.append(5.0)
    assert clock.epochs_that_fit(2) == 2 + int((75.0 - FINISH_SECONDS) // 5.0)


def test_the_schedule_follows_steps_or_time_whichever_is_further() -> None:
    from imgclf_cli.training_recipe import LEARNING_RATE_FLOOR, ProgressCosine

    schedule = ProgressCosine(learning_rate=1.0, total_steps=100, warmup_steps=10)
    assert float(schedule(0)) == pytest.approx(0.1)  # warmup starts at a tenth of the peak
    assert float(schedule(50)) == pytest.approx(0.5 * (1 + LEARNING_RATE_FLOOR), abs=1e-6)
    assert float(schedule(100)) == pytest.approx(LEARNING_RATE_FLOOR)
    schedule.time_progress.assign(1.0)  # the time is up before the steps are
    assert float(schedule(20)) == pytest.approx(LEARNING_RATE_FLOOR)
    restored = ProgressCosine.from_config(schedule.get_config())
    assert float(restored(20)) == pytest.approx(LEARNING_RATE_FLOOR)


def test_a_budget_with_an_epoch_cap_ends_at_the_cap_with_the_schedule_complete(
    tmp_path: Path, runs_dir: Path
) -> None:
    from imgclf_cli.training import train

    data = make_class_folders(tmp_path / "data", per_class=5)
    result = train(
        data,
        overrides=["data.image_size=32", "data.batch_size=4", "model.width=8"],
        flags={"train.epochs": 3, "train.time_budget": "10m"},
    )
    assert result.stopped_by == "epochs" and result.epochs_run == 3
    assert result.time_budget == 600.0
    history = store.read_history(Path(result.run_dir))
    assert history[-1]["learning_rate"] == pytest.approx(0.002 * 0.01, rel=0.05)
    meta = store.read_meta(Path(result.run_dir))
    assert meta["stopped_by"] == "epochs" and meta["time_budget"] == 600.0


def test_a_budget_stops_training_in_time_with_the_schedule_complete(tmp_path: Path, runs_dir: Path) -> None:
    import time

    from imgclf_cli.training import train
    from imgclf_cli.training_events import EpochEnded, TimePlan, TrainingListener

    class Plans(TrainingListener):
        def __init__(self) -> None:
            self.plans: list[TimePlan] = []
            self.rows: list[EpochEnded] = []

        def on_time_plan(self, plan: TimePlan) -> None:
            self.plans.append(plan)

        def on_epoch_end(self, event: EpochEnded) -> None:
            self.rows.append(event)

    data = make_class_folders(tmp_path / "data", per_class=5)
    listener = Plans()
    started = time.monotonic()
    result = train(
        data,
        overrides=[
            "data.image_size=32",
            "data.batch_size=4",
            "model.width=8",
            "train.time_budget=15s",
            # Many quick epochs on tiny data plateau early (with patience 8 they used to stop this
            # run): under a budget, early stopping is off unless asked for, so the time decides.
        ],
        listener=listener,
    )
    elapsed = time.monotonic() - started
    assert result.stopped_by == "time_budget" and result.epochs_run >= 3
    # Generous: this checks that the clock stops training, bench/bench_time_budget.py measures how well.
    assert elapsed < 15 * 1.3
    history = store.read_history(Path(result.run_dir))
    assert history[-1]["learning_rate"] <= 0.002 * 0.05  # the schedule ran to its end
    assert listener.plans and listener.plans[0].budget_seconds == 15.0
    assert listener.rows[-1].total_epochs == result.epochs_run


def test_the_json_summary_has_the_budget_keys(trained_run: dict) -> None:
    summary = trained_run["summary"]
    assert summary["time_budget"] is None and summary["stopped_by"] in ("epochs", "early_stopping")
    assert (
        json.loads((trained_run["run_dir"] / store.META_FILE).read_text())["stopped_by"]
        == summary["stopped_by"]
    )


def test_a_completed_run_resumes_only_when_asked_for_more(trained_run: dict) -> None:
    from imgclf_cli.resuming import nothing_to_resume

    run_dir = trained_run["run_dir"]
    finished = nothing_to_resume(run_dir)
    assert finished is not None and finished.message.startswith(f"Nothing to resume: run {run_dir.name} ")
    assert finished.result.trained is False
    assert finished.result.epochs_run == trained_run["summary"]["epochs_run"]
    # A resumed run gets a new time budget for its new session.
    assert nothing_to_resume(run_dir, flags={"train.time_budget": "1m"}) is None
    assert nothing_to_resume(run_dir, overrides=["train.epochs=99"]) is None
    fewer = nothing_to_resume(run_dir, flags={"train.epochs": 1})
    assert fewer is not None and "the settings given ask for 1" in fewer.message


def test_a_resumed_run_asked_for_more_epochs_gets_a_schedule_planned_for_them() -> None:
    from imgclf_cli.config import resolve_config
    from imgclf_cli.training_recipe import LEARNING_RATE_FLOOR, make_optimizer, replan_schedule

    def config(epochs: int):  # type: ignore[no-untyped-def]
        return resolve_config(
            overrides=[f"train.epochs={epochs}", "train.warmup_epochs=0", "train.learning_rate=0.01"]
        )

    optimizer = make_optimizer(config(2), steps_per_epoch=5)
    optimizer.iterations.assign(10)  # both planned epochs done: the schedule is at its floor
    assert float(optimizer.learning_rate) == pytest.approx(0.01 * LEARNING_RATE_FLOOR)
    assert replan_schedule(optimizer, config(2), 5, False, 2) is None  # the same plan stays
    replanned = replan_schedule(optimizer, config(4), 5, False, 4)
    assert replanned is not None and replanned.previous_epochs == 2
    # Halfway along a 4-epoch cosine, down to the same floor by its end.
    halfway = 0.01 * (LEARNING_RATE_FLOOR + (1 - LEARNING_RATE_FLOOR) * 0.5)
    assert replanned.first_rate == pytest.approx(halfway)
    assert float(optimizer.learning_rate) == pytest.approx(halfway)
    assert replanned.last_rate == pytest.approx(0.01 * LEARNING_RATE_FLOOR)
