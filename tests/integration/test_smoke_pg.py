from tactician.domain import KindSpec, NewTask, Result
from tactician.plan.capacity import plan_starts
from tactician.store.open import open_store
from tactician.store.protocol import Finish


def test_lifecycle_smoke(db_url: str) -> None:
    store = open_store(db_url)
    store.register_kinds([KindSpec("noop")])
    kinds = store.kinds()
    ids = store.submit([NewTask("noop", {"i": i}) for i in range(10)], kinds)
    assert store.plan(plan_starts, kinds).started == 10
    claims = store.claim("w", ["noop"], 10)
    assert len(claims) == 10
    ok = store.finish(
        "w", [Finish(Result(c.task_id, c.token, True, 0, 0), "noop", c.attempt, None) for c in claims],
        kinds,
    )
    assert all(ok)
    assert store.counts() == {"succeeded": 10}
    assert store.get(ids[0]).state == "succeeded"
    store.close()
