"""Merge-into carried out on a real store (SQLite and PostgreSQL): duplicates inside the window
fold into the first task, which runs once with every payload; bad merges change nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tactician.domain import NewTask, TaskState
from tactician.errors import Conflict, InvalidInput
from tactician.run.merging import Merger
from tactician.store.base import SqlStore
from tests.integration.driving import final, make_app, run_until


def submit(store: SqlStore, payload: dict[str, object], **fields: object) -> str:
    task = NewTask(kind="job", payload=payload, **fields)  # type: ignore[arg-type]
    return store.submit([task], store.kinds())[0]


def test_merge_folds_payloads_and_ends_the_others(job_store: SqlStore) -> None:
    first = submit(job_store, {"fingerprint": "a", "n": 1})
    second = submit(job_store, {"fingerprint": "a", "n": 2})
    third = submit(job_store, {"fingerprint": "a", "n": 3})
    merged = job_store.merge(first, [second, third])
    assert merged.payload["merged"] == [{"fingerprint": "a", "n": 2}, {"fingerprint": "a", "n": 3}]
    for task_id in (second, third):
        task = job_store.get(task_id)
        assert task.state is TaskState.MERGED and task.last_error == f"merged into {first}"
    assert job_store.get(first).state is TaskState.READY


def test_bad_merges_change_nothing(job_store: SqlStore) -> None:
    first = submit(job_store, {"n": 1})
    other = submit(job_store, {"n": 2})
    waited_on = submit(job_store, {"n": 3})
    submit(job_store, {"n": 4}, depends_on=(waited_on,))
    with pytest.raises(InvalidInput):
        job_store.merge(first, [first])
    with pytest.raises(Conflict):
        job_store.merge(first, [other, waited_on])  # others wait for it: refused, all of it
    job_store.cancel(other)
    with pytest.raises(Conflict):
        job_store.merge(first, [other])
    assert job_store.get(first).payload == {"n": 1}
    assert job_store.get(waited_on).state is TaskState.READY


def test_the_planner_merges_duplicates_and_the_first_runs_once_with_all(
    sqlite_url: str, tmp_path: Path
) -> None:
    app = make_app(sqlite_url)
    out = tmp_path / "runs.jsonl"

    @app.task(name="remediate")
    def remediate(fingerprint: str, n: int, merged: list[dict[str, object]] | None = None) -> None:
        with out.open("a") as f:
            f.write(json.dumps({"n": n, "merged": [m["n"] for m in merged or []]}) + "\n")

    app.merge("remediate", "{kind}/{features.fingerprint}", window_s=60)
    now = time.time()
    ids = [
        app.submit("remediate", {"fingerprint": fp, "n": n}, release_at=now + 0.5)
        for n, fp in enumerate(["disk", "disk", "cpu", "disk"])
    ]
    planner = app.planner()
    merger = next(h for h in planner.hooks if isinstance(h, Merger))
    assert merger(time.time()) == 2  # the two later "disk" alerts fold into the first
    assert run_until(app, final(app, ids[0], ids[2]))
    runs = sorted((json.loads(line) for line in out.read_text().splitlines()), key=str)
    assert runs == [{"merged": [1, 3], "n": 0}, {"merged": [], "n": 2}]
    assert [app.get(i).state for i in ids] == [
        TaskState.SUCCEEDED,
        TaskState.MERGED,
        TaskState.SUCCEEDED,
        TaskState.MERGED,
    ]
    app.close()


def test_a_bad_merge_template_is_refused_at_once(sqlite_url: str) -> None:
    app = make_app(sqlite_url)
    with pytest.raises(InvalidInput, match="unknown field"):
        app.merge("remediate", "{region}", window_s=60)
    with pytest.raises(InvalidInput, match="positive"):
        app.merge("remediate", "{kind}", window_s=0)
    app.close()
