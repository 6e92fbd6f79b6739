from __future__ import annotations

from datetime import datetime
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tactician.errors import InvalidInput, InvalidSchedule
from tactician.plan.schedules import (
    DueTicks,
    ScheduleSpec,
    backfill_ticks,
    due_ticks,
    fire_at,
    next_tick,
    overlap_action,
    parse_every,
    tick_key,
    ticks_between,
)

MINUTE = 60.0
HOUR = 3600.0


def ts(iso: str) -> float:
    """Epoch seconds of an ISO time with an explicit offset, e.g. "2026-11-01T01:30-05:00"."""
    when = datetime.fromisoformat(iso)
    assert when.tzinfo is not None, "give an offset: local times can be ambiguous"
    return when.timestamp()


def iso(tick: float, zone: str = "UTC") -> str:
    return datetime.fromtimestamp(tick, ZoneInfo(zone)).isoformat(timespec="minutes")


def spec(**overrides: Any) -> ScheduleSpec:
    fields: dict[str, Any] = {"name": "nightly", "kind": "report", "payload": {"to": "ops"}}
    if "cron" not in overrides and "every" not in overrides:
        fields["every"] = 300.0
    return ScheduleSpec(**(fields | overrides))


# parse_every


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s", 93784.0),
        ("90", 90.0),
        ("1.5m", 90.0),
        (" 10s ", 10.0),
    ],
)
def test_parse_every_reads_units(text: str, seconds: float) -> None:
    assert parse_every(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "0", "0s", "0h0m", "-5s", "5x", "m", "30m1h", "1h 30m", "5mm", "1e3", "five"]
)
def test_parse_every_rejects_bad_text(text: str) -> None:
    with pytest.raises(InvalidSchedule, match="is not like '30s'") as error:
        parse_every(text)
    assert repr(text) in error.value.message


# intervals


def test_interval_ticks_are_anchor_plus_multiples_after_exclusive_until_inclusive() -> None:
    every_5m = spec(every=300.0)
    ticks = ticks_between(every_5m, ts("2026-01-05T10:00Z"), ts("2026-01-05T10:20Z"))
    assert [iso(t) for t in ticks] == [
        "2026-01-05T10:05+00:00",
        "2026-01-05T10:10+00:00",
        "2026-01-05T10:15+00:00",
        "2026-01-05T10:20+00:00",
    ]


def test_interval_anchor_shifts_the_ticks() -> None:
    assert ticks_between(spec(every=10.0, anchor=7.0), 0.0, 40.0) == [7.0, 17.0, 27.0, 37.0]
    assert ticks_between(spec(every=10.0, anchor=7.0), 7.0, 27.0) == [17.0, 27.0]


def test_interval_ticks_do_not_accumulate_rounding_errors() -> None:
    tenths = ticks_between(spec(every=0.1), 0.0, 100.0, limit=2000)
    assert len(tenths) == 1000
    assert tenths[-1] == pytest.approx(100.0, abs=1e-9)
    assert tick_key("x", tenths[-1]) == "schedule:x:100.000"


def test_limit_caps_the_ticks() -> None:
    assert ticks_between(spec(every=1.0), 0.0, 1000.0, limit=3) == [1.0, 2.0, 3.0]


def test_next_tick() -> None:
    assert next_tick(spec(every=60.0), 125.0) == 180.0
    assert next_tick(spec(every=60.0), 180.0) == 240.0
    assert next_tick(spec(cron="0 9 * * *"), ts("2026-01-05T09:00Z")) == ts("2026-01-06T09:00Z")


# cron in UTC


def test_cron_in_utc() -> None:
    quarter_hours = spec(cron="*/15 * * * *")
    ticks = ticks_between(quarter_hours, ts("2026-01-05T10:00Z"), ts("2026-01-05T11:00Z"))
    assert [iso(t) for t in ticks] == [
        "2026-01-05T10:15+00:00",
        "2026-01-05T10:30+00:00",
        "2026-01-05T10:45+00:00",
        "2026-01-05T11:00+00:00",
    ]


def test_cron_weekdays_only() -> None:
    weekdays = spec(cron="0 9 * * 1-5")
    # 2026-01-02 is a Friday; the weekend is skipped.
    ticks = ticks_between(weekdays, ts("2026-01-02T00:00Z"), ts("2026-01-06T00:00Z"))
    assert [iso(t) for t in ticks] == ["2026-01-02T09:00+00:00", "2026-01-05T09:00+00:00"]


def test_cron_from_a_fractional_time_misses_nothing() -> None:
    every_minute = spec(cron="* * * * *")
    just_before = ts("2026-01-05T10:00Z") - 1e-6
    assert ticks_between(every_minute, just_before, ts("2026-01-05T10:01Z")) == [
        ts("2026-01-05T10:00Z"),
        ts("2026-01-05T10:01Z"),
    ]


# cron in a time zone, across DST


def test_cron_keeps_local_time_across_dst_in_paris() -> None:
    nine_in_paris = spec(cron="0 9 * * *", timezone="Europe/Paris")
    # Paris moves from +01:00 to +02:00 on 2026-03-29.
    ticks = ticks_between(nine_in_paris, ts("2026-03-27T00:00Z"), ts("2026-03-31T00:00Z"))
    assert [iso(t, "Europe/Paris") for t in ticks] == [
        "2026-03-27T09:00+01:00",
        "2026-03-28T09:00+01:00",
        "2026-03-29T09:00+02:00",
        "2026-03-30T09:00+02:00",
    ]
    assert [iso(t) for t in ticks[1:3]] == ["2026-03-28T08:00+00:00", "2026-03-29T07:00+00:00"]


def test_spring_forward_skipped_time_fires_once_right_after_the_gap() -> None:
    half_past_two = spec(cron="30 2 * * *", timezone="America/New_York")
    # 2026-03-08 02:00 EST jumps to 03:00 EDT: 02:30 does not exist that night.
    ticks = ticks_between(half_past_two, ts("2026-03-07T00:00-05:00"), ts("2026-03-10T00:00-04:00"))
    assert [iso(t, "America/New_York") for t in ticks] == [
        "2026-03-07T02:30-05:00",
        "2026-03-08T03:00-04:00",
        "2026-03-09T02:30-04:00",
    ]


def test_spring_forward_frequent_cron_keeps_real_time_rhythm() -> None:
    half_hourly = spec(cron="*/30 * * * *", timezone="America/New_York")
    ticks = ticks_between(half_hourly, ts("2026-03-08T01:00-05:00"), ts("2026-03-08T04:00-04:00"))
    assert [iso(t, "America/New_York") for t in ticks] == [
        "2026-03-08T01:30-05:00",
        "2026-03-08T03:00-04:00",
        "2026-03-08T03:30-04:00",
        "2026-03-08T04:00-04:00",
    ]
    assert {later - earlier for earlier, later in pairwise(ticks)} == {30 * MINUTE}


def test_fall_back_repeated_time_fires_once_when_the_hour_is_fixed() -> None:
    half_past_one = spec(cron="30 1 * * *", timezone="America/New_York")
    # 2026-11-01 02:00 EDT falls back to 01:00 EST: 01:30 happens twice that night.
    ticks = ticks_between(half_past_one, ts("2026-10-31T00:00-04:00"), ts("2026-11-03T00:00-05:00"))
    assert [iso(t, "America/New_York") for t in ticks] == [
        "2026-10-31T01:30-04:00",
        "2026-11-01T01:30-04:00",
        "2026-11-02T01:30-05:00",
    ]


def test_fall_back_second_occurrence_is_not_a_tick_even_when_starting_inside_it() -> None:
    half_past_one = spec(cron="30 1 * * *", timezone="America/New_York")
    first_pass = ts("2026-11-01T01:45-04:00")
    assert next_tick(half_past_one, first_pass) == ts("2026-11-02T01:30-05:00")


def test_fall_back_wildcard_hour_follows_real_time_through_both_passes() -> None:
    half_hourly = spec(cron="*/30 * * * *", timezone="America/New_York")
    ticks = ticks_between(half_hourly, ts("2026-11-01T00:45-04:00"), ts("2026-11-01T02:00-05:00"))
    assert [iso(t, "America/New_York") for t in ticks] == [
        "2026-11-01T01:00-04:00",
        "2026-11-01T01:30-04:00",
        "2026-11-01T01:00-05:00",
        "2026-11-01T01:30-05:00",
        "2026-11-01T02:00-05:00",
    ]
    assert next_tick(half_hourly, ts("2026-11-01T01:45-04:00")) == ts("2026-11-01T01:00-05:00")


@pytest.mark.parametrize("cron", ["30 1 * * *", "*/20 * * * *", "*/10 1-3 * * *", "0 2 * * *"])
@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("2026-03-07T22:00-05:00", "2026-03-08T05:00-04:00"),
        ("2026-10-31T22:00-04:00", "2026-11-01T05:00-05:00"),
    ],
)
def test_ticks_do_not_depend_on_where_the_range_is_cut(cron: str, start: str, end: str) -> None:
    in_new_york = spec(cron=cron, timezone="America/New_York")
    whole = ticks_between(in_new_york, ts(start), ts(end))
    assert whole == sorted(set(whole))
    for cut in range(int(ts(start)), int(ts(end)), 7 * 60 + 13):
        cut_at = float(cut)
        pieces = ticks_between(in_new_york, ts(start), cut_at) + ticks_between(
            in_new_york, cut_at, ts(end)
        )
        assert pieces == whole, f"cut at {iso(cut_at, 'America/New_York')}"


# start_at and end_at


def test_start_and_end_bounds_are_inclusive() -> None:
    bounded = spec(every=60.0, start_at=120.0, end_at=300.0)
    assert ticks_between(bounded, 0.0, 1000.0) == [120.0, 180.0, 240.0, 300.0]
    assert next_tick(bounded, 0.0) == 120.0
    assert next_tick(bounded, 300.0) is None


def test_start_between_ticks_waits_for_the_next_tick() -> None:
    bounded = spec(cron="0 * * * *", start_at=ts("2026-01-05T10:30Z"))
    assert next_tick(bounded, 0.0) == ts("2026-01-05T11:00Z")


# validation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cron": "61 * * * *"}, "schedule nightly: cron '61 * * * *' is not a 5-field cron"),
        ({"cron": "* * * *"}, "schedule nightly: cron '* * * *' is not a 5-field cron"),
        ({"cron": "*/5 * * * * *"}, "is not a 5-field cron expression"),
        ({"cron": "0 0 30 2 *"}, "schedule nightly: cron '0 0 30 2 *' never fires"),
        ({"cron": "0 9 * * *", "every": 60.0}, "schedule nightly: give exactly one of cron"),
        ({"every": None}, "schedule nightly: give exactly one of cron and every"),
        ({"every": 0.0}, "schedule nightly: every must be a number of seconds > 0, got 0.0"),
        ({"every": -5.0}, "every must be a number of seconds > 0, got -5.0"),
        ({"every": float("inf")}, "every must be a number of seconds > 0"),
        ({"jitter": -1.0}, "schedule nightly: jitter must be a number of seconds >= 0, got -1.0"),
        ({"timezone": "Mars/Olympus"}, "schedule nightly: unknown time zone 'Mars/Olympus'"),
        ({"timezone": "../etc/passwd"}, "unknown time zone '../etc/passwd'"),
        ({"name": ""}, "schedule '': the name must be 1 to 200 characters"),
        ({"name": "has space"}, "schedule 'has space': the name must be"),
        ({"name": "x" * 201}, "the name must be 1 to 200 characters of A-Z a-z 0-9 _ . : -"),
        ({"kind": ""}, "schedule nightly: kind must name a task kind"),
        ({"payload": ["not", "an", "object"]}, "schedule nightly: payload must be a JSON object"),
        ({"payload": {"when": {1, 2}}}, "schedule nightly: payload is not JSON"),
        ({"overlap": "sometimes"}, "overlap must be one of skip, buffer_one, allow_all"),
        ({"catchup_window": 0.0}, "schedule nightly: catchup_window must be a number of seconds"),
        (
            {"start_at": 200.0, "end_at": 100.0},
            "schedule nightly: start_at 1970-01-01T00:03:20+00:00 is after end_at",
        ),
        ({"anchor": float("nan")}, "schedule nightly: anchor must be a time in epoch seconds"),
    ],
)
def test_invalid_schedules_are_refused_with_one_line(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidSchedule) as error:
        spec(**overrides)
    assert message in error.value.message
    assert error.value.message.startswith("schedule ")
    assert "\n" not in error.value.message


def test_a_bad_name_stays_on_one_line() -> None:
    with pytest.raises(InvalidSchedule) as error:
        spec(name="two\nlines")
    assert error.value.message == (
        "schedule 'two\\nlines': the name must be 1 to 200 characters of A-Z a-z 0-9 _ . : -"
    )


def test_invalid_schedule_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        spec(every=-1.0)


def test_valid_schedules_are_accepted() -> None:
    assert spec(name="a" * 200).name == "a" * 200
    assert spec(name="billing.eu:daily-run_2").every == 300.0
    assert spec(cron="0 0 29 2 *").cron == "0 0 29 2 *"  # fires only in leap years
    assert spec(cron="0 9 * * 1-5", timezone="Asia/Kolkata").timezone == "Asia/Kolkata"


# jitter


def test_jitter_is_deterministic_and_in_range() -> None:
    jittered = spec(jitter=30.0)
    ticks = [float(t) for t in range(0, 300_000, 300)]
    delays = [fire_at(jittered, t) - t for t in ticks]
    assert all(0.0 <= d < 30.0 for d in delays)
    assert [fire_at(spec(jitter=30.0), t) - t for t in ticks] == delays
    assert min(delays) < 3.0 and max(delays) > 27.0, "spread over the whole range"


def test_jitter_differs_between_schedules_and_is_zero_when_off() -> None:
    tick = ts("2026-01-05T10:00Z")
    assert fire_at(spec(name="a", jitter=60.0), tick) != fire_at(spec(name="b", jitter=60.0), tick)
    assert fire_at(spec(jitter=0.0), tick) == tick


# due ticks and the catch-up window


def test_downtime_fires_only_ticks_inside_the_catchup_window() -> None:
    every_5m = spec(cron="*/5 * * * *", catchup_window=600.0)
    last_fired = ts("2026-01-05T10:00Z")
    after_an_hour_down = ts("2026-01-05T11:00Z")
    due = due_ticks(every_5m, last_fired, after_an_hour_down)
    assert [iso(t) for t in due.fire] == [
        "2026-01-05T10:50+00:00",
        "2026-01-05T10:55+00:00",
        "2026-01-05T11:00+00:00",
    ]
    assert due.skipped == 9  # 10:05 to 10:45
    assert due.last_tick == after_an_hour_down


def test_due_ticks_between_polls() -> None:
    every_5m = spec(cron="*/5 * * * *", catchup_window=600.0)
    mark = ts("2026-01-05T11:00Z")
    assert due_ticks(every_5m, mark, ts("2026-01-05T11:04Z")) == DueTicks([], 0, mark)
    on_time = due_ticks(every_5m, mark, ts("2026-01-05T11:05:30Z"))
    assert on_time == DueTicks([ts("2026-01-05T11:05Z")], 0, ts("2026-01-05T11:05Z"))


def test_a_new_schedule_does_not_fire_for_ticks_before_its_creation() -> None:
    every_5m = spec(cron="*/5 * * * *", catchup_window=600.0)
    created = ts("2026-01-05T10:02Z")
    assert due_ticks(every_5m, created, ts("2026-01-05T10:04Z")) == DueTicks([], 0, created)
    assert due_ticks(every_5m, created, ts("2026-01-05T10:05Z")).fire == [ts("2026-01-05T10:05Z")]


def test_no_mark_fires_the_window_and_skips_nothing() -> None:
    every_5m = spec(cron="*/5 * * * *", catchup_window=600.0)
    now = ts("2026-01-05T11:01Z")
    due = due_ticks(every_5m, None, now)
    assert [iso(t) for t in due.fire] == ["2026-01-05T10:55+00:00", "2026-01-05T11:00+00:00"]
    assert (due.skipped, due.last_tick) == (0, ts("2026-01-05T11:00Z"))
    assert due_ticks(spec(cron="0 0 1 1 *"), None, now) == DueTicks([], 0, now)


def test_only_skipped_ticks_still_move_the_mark() -> None:
    hourly = spec(cron="0 * * * *", catchup_window=60.0)
    due = due_ticks(hourly, ts("2026-01-05T08:00Z"), ts("2026-01-05T10:30Z"))
    assert due == DueTicks([], 2, ts("2026-01-05T10:00Z"))


def test_due_ticks_beyond_the_limit_wait_for_the_next_call() -> None:
    every_second = spec(every=1.0, catchup_window=60.0)
    first = due_ticks(every_second, 1000.0, 1030.0, limit=10)
    assert first.fire == [float(t) for t in range(1001, 1011)]
    assert first.last_tick == 1010.0
    rest = due_ticks(every_second, first.last_tick, 1030.0, limit=100)
    assert rest.fire == [float(t) for t in range(1011, 1031)]


def test_a_mark_ahead_of_now_fires_nothing_and_stays() -> None:
    assert due_ticks(spec(every=60.0), 600.0, 500.0) == DueTicks([], 0, 600.0)


def test_due_ticks_respect_end_at() -> None:
    ended = spec(every=60.0, end_at=120.0, catchup_window=600.0)
    assert due_ticks(ended, 0.0, 300.0) == DueTicks([60.0, 120.0], 0, 120.0)


def test_paused_fires_nothing_and_drops_the_paused_ticks() -> None:
    paused = spec(every=60.0, paused=True, catchup_window=600.0)
    assert due_ticks(paused, 0.0, 300.0) == DueTicks([], 0, 300.0)
    assert due_ticks(paused, None, 300.0) == DueTicks([], 0, 300.0)
    assert due_ticks(paused, 900.0, 300.0).last_tick == 900.0


# overlap


@pytest.mark.parametrize(
    ("policy", "running", "buffered", "action"),
    [
        ("skip", 0, 0, "start"),
        ("skip", 1, 0, "skip"),
        ("buffer_one", 0, 0, "start"),
        ("buffer_one", 1, 0, "buffer"),
        ("buffer_one", 1, 1, "skip"),
        ("allow_all", 0, 0, "start"),
        ("allow_all", 3, 0, "start"),
        ("cancel_running", 0, 0, "start"),
        ("cancel_running", 2, 0, "cancel_running_then_start"),
    ],
)
def test_overlap_action(policy: Any, running: int, buffered: int, action: str) -> None:
    assert overlap_action(policy, running, buffered) == action


# backfill


def test_backfill_takes_every_tick_in_the_closed_range_even_when_paused() -> None:
    paused_hourly = spec(cron="0 * * * *", paused=True, catchup_window=1.0)
    ticks = backfill_ticks(paused_hourly, ts("2026-01-05T10:00Z"), ts("2026-01-05T13:00Z"))
    assert [iso(t) for t in ticks] == [
        "2026-01-05T10:00+00:00",
        "2026-01-05T11:00+00:00",
        "2026-01-05T12:00+00:00",
        "2026-01-05T13:00+00:00",
    ]


def test_backfill_stays_inside_start_at() -> None:
    bounded = spec(every=60.0, start_at=180.0)
    assert backfill_ticks(bounded, 0.0, 300.0) == [180.0, 240.0, 300.0]


def test_backfill_limit() -> None:
    every_minute = spec(every=60.0)
    assert len(backfill_ticks(every_minute, 60.0, 600.0, limit=10)) == 10
    with pytest.raises(InvalidSchedule) as error:
        backfill_ticks(every_minute, 0.0, 600.0, limit=10)
    assert error.value.message == (
        "schedule nightly: the backfill from 1970-01-01T00:00:00+00:00 "
        "to 1970-01-01T00:10:00+00:00 has more than 10 ticks"
    )


def test_backfill_refuses_a_reversed_range() -> None:
    with pytest.raises(InvalidSchedule) as error:
        backfill_ticks(spec(), 600.0, 0.0)
    assert error.value.message == (
        "schedule nightly: a backfill cannot start at 1970-01-01T00:10:00+00:00, "
        "after its end at 1970-01-01T00:00:00+00:00"
    )


# tick keys


def test_tick_key() -> None:
    assert tick_key("nightly", 1_767_607_200.0) == "schedule:nightly:1767607200.000"
    assert tick_key("nightly", 1.0) != tick_key("nightly", 1.001)
