"""A store's finished attempts as recorded history (`tactician.decide.training`)."""

from __future__ import annotations

from collections.abc import Iterable

from tactician.decide.features import ScoredTask, payload_features
from tactician.decide.training import Recorded
from tactician.store.protocol import OutcomeRow


def from_store(rows: Iterable[OutcomeRow]) -> list[Recorded]:
    """A store's finished attempts as recorded history, in submission order (then attempt)."""
    ordered = sorted(rows, key=lambda r: (r.created_at, r.task_id, r.attempt))
    return [
        Recorded(
            ScoredTask(
                id=row.task_id,
                kind=row.kind,
                seq=seq,
                submit_at=row.created_at,
                release_at=row.release_at,
                due_at=row.due_at,
                weight=row.weight,
                estimate=row.estimate,
                units=row.units,
                pool=row.pool,
                tenant=row.tenant,
                attempt=row.attempt - 1,
                features=payload_features(row.payload),
            ),
            started_at=row.started_at,
            duration=max(0.0, row.finished_at - row.started_at),
            failed=row.failed,
        )
        for seq, row in enumerate(ordered)
    ]
