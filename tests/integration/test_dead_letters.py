"""Dead letters on both databases: a refused event is kept with its reason, body and headers,
listed newest first a page at a time, and audited in the same transaction; bad input to the store
is refused and writes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from tactician.errors import InvalidInput
from tactician.govern.audit import verify
from tactician.govern.roles import Actor, Role
from tactician.store.base import SqlStore
from tactician.store.deadletters import MAX_BODY_CHARS
from tests.integration.driving import Opener


@pytest.fixture
def store(opener: Opener) -> SqlStore:
    return opener()


def test_a_dead_letter_keeps_reason_body_and_headers(store: SqlStore) -> None:
    before = store.db_now()
    letter_id = store.dead_letter(
        "alertmanager",
        "alertmanager: alerts[0].fingerprint: is missing",
        b'{"version": "4", "alerts": [{}]}',
        {"Content-Type": "application/json", "User-Agent": "Alertmanager/0.27.0"},
    )
    (letter,) = store.dead_letters()
    assert letter.id == letter_id
    assert letter.source == "alertmanager"
    assert letter.reason == "alertmanager: alerts[0].fingerprint: is missing"
    assert letter.body == '{"version": "4", "alerts": [{}]}'
    assert letter.headers == {
        "Content-Type": "application/json",
        "User-Agent": "Alertmanager/0.27.0",
    }
    assert before <= letter.received_at <= store.db_now()
    assert letter.to_json()["headers"] == dict(letter.headers)


def test_bytes_that_are_not_text_are_kept_as_escapes(store: SqlStore) -> None:
    store.dead_letter("hooks", "not UTF-8", b"ok \xff\xfe and NUL \x00 end", {})
    store.dead_letter("hooks", "lone surrogate", "x \udcff y", {"X-Odd": "a\x00b"})
    newest, oldest = store.dead_letters()
    assert oldest.body == "ok \\xff\\xfe and NUL \\x00 end"
    assert newest.body == "x \\udcff y"
    assert newest.headers == {"X-Odd": "a\x00b"}


def test_credentials_in_headers_are_not_kept(store: SqlStore) -> None:
    headers = {
        "Authorization": "Bearer tk_secret",
        "cookie": "session=abc",
        "X-Hub-Signature-256": "sha256=" + "0" * 64,
    }
    store.dead_letter("github", "signature does not match", b"{}", headers)
    (letter,) = store.dead_letters()
    assert letter.headers == {
        "Authorization": "[redacted]",
        "cookie": "[redacted]",
        "X-Hub-Signature-256": "sha256=" + "0" * 64,
    }


def test_a_huge_body_is_cut_and_says_so(store: SqlStore) -> None:
    store.dead_letter("hooks", "too big", "a" * (MAX_BODY_CHARS + 10), {})
    (letter,) = store.dead_letters()
    assert letter.body == "a" * MAX_BODY_CHARS + "\n[truncated: 10 more characters]"


def test_a_reason_is_kept_on_one_line(store: SqlStore) -> None:
    store.dead_letter(" hooks ", "first line\n  second\tline", b"", {})
    (letter,) = store.dead_letters()
    assert (letter.source, letter.reason) == ("hooks", "first line second line")


def test_dead_letters_are_listed_newest_first_a_page_at_a_time(store: SqlStore) -> None:
    ids = [store.dead_letter("hooks", f"bad {n}", f"body {n}", {}) for n in range(7)]
    assert ids == sorted(ids)
    pages: list[list[str]] = []
    after: str | None = None
    while page := store.dead_letters(limit=3, after_id=after):
        pages.append([letter.id for letter in page])
        after = page[-1].id
    assert pages == [ids[6:3:-1], ids[3:0:-1], ids[0:1]]
    assert [letter.reason for letter in store.dead_letters(limit=2)] == ["bad 6", "bad 5"]


def test_a_dead_letter_is_audited_in_its_transaction(store: SqlStore) -> None:
    first = store.dead_letter(
        "cloudevents", "cloudevents: required attribute 'id' is missing", b"{}", {}
    )
    operator = Actor("ingest-bot", Role.OPERATOR)
    second = store.dead_letter(
        "alertmanager", "alertmanager: version: is missing", b"{}", {}, actor=operator
    )
    records = list(store.audit_records())
    assert [(r.actor, r.action, r.subject) for r in records] == [
        ("tactician", "event.dead_lettered", first),
        ("ingest-bot", "event.dead_lettered", second),
    ]
    assert records[0].details == {
        "source": "cloudevents",
        "reason": "cloudevents: required attribute 'id' is missing",
        "chars": 2,
    }
    assert verify(records).ok


def test_another_process_sees_a_dead_letter(opener: Opener) -> None:
    writer, reader = opener(), opener()
    letter_id = writer.dead_letter("hooks", "bad", b"{}", {})
    assert [letter.id for letter in reader.dead_letters()] == [letter_id]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", "bad", b"{}", {}), "a dead letter needs a source: non-empty text"),
        (("  ", "bad", b"{}", {}), "a dead letter needs a source: non-empty text"),
        ((None, "bad", b"{}", {}), "a dead letter needs a source: non-empty text"),
        (("hooks", "", b"{}", {}), "a dead letter needs a reason: non-empty text"),
        (("hooks", "\n\t", b"{}", {}), "a dead letter needs a reason: non-empty text"),
        (("hooks", "bad", 42, {}), "a dead letter's body must be bytes or text, not int"),
        (("hooks", "bad", None, {}), "a dead letter's body must be bytes or text, not NoneType"),
        (
            ("hooks", "bad", b"{}", [("a", "b")]),
            "a dead letter's headers must be a mapping of names to values",
        ),
        (
            ("hooks", "bad", b"{}", {"X-Count": 3}),
            "a dead letter's header names and values must be text",
        ),
        (("hooks", "bad", b"{}", {3: "x"}), "a dead letter's header names and values must be text"),
    ],
)
def test_bad_input_to_dead_letter_is_refused_and_writes_nothing(
    store: SqlStore, args: tuple[Any, ...], message: str
) -> None:
    with pytest.raises(InvalidInput) as raised:
        store.dead_letter(*args)
    assert raised.value.message == message
    assert store.dead_letters() == []
    assert list(store.audit_records()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 0}, "limit must be a whole number from 1 to 1000"),
        ({"limit": 1001}, "limit must be a whole number from 1 to 1000"),
        ({"limit": True}, "limit must be a whole number from 1 to 1000"),
        ({"limit": 2.5}, "limit must be a whole number from 1 to 1000"),
        ({"limit": "10; DROP TABLE dead_letters"}, "limit must be a whole number from 1 to 1000"),
        ({"after_id": 5}, "after_id must be a dead letter's id"),
    ],
)
def test_bad_paging_is_refused(store: SqlStore, kwargs: dict[str, Any], message: str) -> None:
    store.dead_letter("hooks", "bad", b"{}", {})
    with pytest.raises(InvalidInput) as raised:
        store.dead_letters(**kwargs)
    assert raised.value.message == message
    assert len(store.dead_letters()) == 1
