"""Notifications delivered by a real worker on SQLite to real servers on loopback: an HTTP
receiver (webhook, Slack) in a thread and an aiosmtpd SMTP server.

The handler, `tactician.run.notify.notify`, runs in the worker's forked runner processes; the
servers run in this process and record what reached them.
"""

from __future__ import annotations

import email
import email.policy
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tactician.app import Tactician
from tactician.domain import NewTask, TaskState
from tactician.errors import InvalidInput
from tactician.govern.roles import Actor, Role
from tactician.run.notify import NOTIFY_KIND, Channel, notification, notify, notify_kind
from tests.integration.driving import final, make_app, run_until

pytestmark = pytest.mark.timeout(60)


# --- an HTTP receiver ------------------------------------------------------------------------


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Receiver:
    """Records each POST and answers from the path's script (status codes in order), then 200."""

    url: str = ""
    scripts: dict[str, list[int]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, request: Request) -> int:
        with self.lock:
            self.requests.append(request)
            script = self.scripts.get(request.path)
            return script.pop(0) if script else 200

    def to(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {name.lower(): value for name, value in self.headers.items()}
            status = state.answer(Request(self.path, headers, json.loads(raw)))
            body = b"ok" if status < 300 else f"refused with {status}".encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll lets shutdown() return at once rather than after the default 0.5 s.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


# --- an SMTP server --------------------------------------------------------------------------


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    message: EmailMessage


@dataclass
class Mailbox:
    """An aiosmtpd handler: keeps each message; refuses a recipient while its script lasts."""

    port: int
    mails: list[Mail] = field(default_factory=list)
    refusals: dict[str, list[str]] = field(default_factory=dict)
    controller: Controller | None = None

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        script = self.refusals.get(address)
        if script:
            return script.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"

    def start(self) -> None:
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    """A mailbox whose server is not started: the test starts it (and may start it late)."""
    box = Mailbox(free_port())
    yield box
    if box.controller is not None:
        box.controller.stop()


def mail_channel(box: Mailbox, *to: str) -> Channel:
    return Channel.from_mapping(
        "oncall-mail",
        {
            "type": "email",
            "host": "127.0.0.1",
            "port": box.port,
            "sender": "Tactician <tactician@example.test>",
            "to": list(to) or ["ops@example.test", "lead@example.test"],
        },
    )


# --- the app ---------------------------------------------------------------------------------


@pytest.fixture
def app(sqlite_url: str) -> Iterator[Tactician]:
    """An app with the notify kind as `notify_kind()` declares it, but a backoff of 50 ms."""
    the_app = make_app(sqlite_url)
    spec = notify_kind()
    the_app.task(
        notify,
        name=NOTIFY_KIND,
        pool=spec.pool,
        timeout=spec.timeout,
        retries=spec.retry.max_attempts - 1,
        backoff=0.05,
        breaker_threshold=spec.breaker_threshold,
    )
    yield the_app
    the_app.close()


def send(app: Tactician, channel: Channel, subject: str, text: str, **options: Any) -> str:
    return app.submit_many([notification(channel, subject, text, **options)])[0]


def deliver(app: Tactician, task_id: str) -> None:
    assert run_until(app, final(app, task_id)), app.get(task_id)


def outcomes(app: Tactician, task_id: str) -> list[str]:
    return [attempt.outcome for attempt in app.store.attempts(task_id)]


# --- webhook and Slack -----------------------------------------------------------------------


def test_a_webhook_gets_subject_text_and_event_as_json(app: Tactician, receiver: Receiver) -> None:
    channel = Channel.from_mapping(
        "ops-hook",
        {
            "type": "webhook",
            "url": f"{receiver.url}/hook",
            "headers": {"Authorization": "Bearer t"},
        },
    )
    event = {"task": "j42", "late_by": 12.5, "pools": ["drivers"]}
    task_id = send(app, channel, "Task late", "j42 missed its deadline", event=event)

    deliver(app, task_id)

    task = app.get(task_id)
    assert task.state is TaskState.SUCCEEDED, task.last_error
    assert (task.attempt, task.source) == (1, "notify:ops-hook")
    (request,) = receiver.to("/hook")
    assert request.body == {
        "subject": "Task late",
        "text": "j42 missed its deadline",
        "event": event,
    }
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == "Bearer t"
    assert request.headers["idempotency-key"] == task_id


def test_a_slack_webhook_gets_a_section_block(app: Tactician, receiver: Receiver) -> None:
    channel = Channel.from_mapping("ops-slack", {"type": "slack", "url": f"{receiver.url}/slack"})
    task_id = send(
        app, channel, "Pool full", "drivers <north> at 100% & rising", event={"pool": "drivers"}
    )

    deliver(app, task_id)

    assert app.get(task_id).state is TaskState.SUCCEEDED, app.get(task_id).last_error
    (request,) = receiver.to("/slack")
    assert request.body == {
        "text": "Pool full: drivers &lt;north&gt; at 100% &amp; rising",
        "blocks": [
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": "*Pool full*\ndrivers &lt;north&gt; at 100% &amp; rising",
                },
                "fields": [{"type": "mrkdwn", "text": "*pool*\ndrivers"}],
            }
        ],
    }
    assert "idempotency-key" not in request.headers  # Slack has no use for it


def test_a_5xx_is_retried_until_delivered(app: Tactician, receiver: Receiver) -> None:
    receiver.scripts["/flaky"] = [500, 500, 200]
    channel = Channel.from_mapping("ops-hook", {"type": "webhook", "url": f"{receiver.url}/flaky"})
    task_id = send(app, channel, "Retry me", "third time lucky")

    deliver(app, task_id)

    task = app.get(task_id)
    assert task.state is TaskState.SUCCEEDED, task.last_error
    assert task.attempt == 3
    assert outcomes(app, task_id) == ["failed", "failed", "succeeded"]
    first_error = app.store.attempts(task_id)[0].error or ""
    assert f"webhook channel ops-hook to {receiver.url}/flaky answered 500" in first_error
    requests = receiver.to("/flaky")
    assert len(requests) == 3
    assert {r.headers["idempotency-key"] for r in requests} == {task_id}  # one key for all


def test_a_429_backs_off_and_retries(app: Tactician, receiver: Receiver) -> None:
    receiver.scripts["/busy"] = [429]
    channel = Channel.from_mapping("ops-hook", {"type": "webhook", "url": f"{receiver.url}/busy"})
    task_id = send(app, channel, "Busy", "try again")

    deliver(app, task_id)

    assert app.get(task_id).state is TaskState.SUCCEEDED
    assert outcomes(app, task_id) == ["failed", "succeeded"]
    assert (app.store.attempts(task_id)[0].error or "").startswith("TargetOverloaded: ")


def test_a_4xx_ends_the_notification_after_one_attempt(app: Tactician, receiver: Receiver) -> None:
    receiver.scripts["/gone"] = [400, 200]
    channel = Channel.from_mapping("ops-slack", {"type": "slack", "url": f"{receiver.url}/gone"})
    task_id = send(app, channel, "Lost", "nobody hears this")

    deliver(app, task_id)

    task = app.get(task_id)
    assert task.state is TaskState.DEAD
    assert task.attempt == 1
    assert outcomes(app, task_id) == ["failed"]
    assert task.last_error == (
        f"HandlerError: slack channel ops-slack to {receiver.url}/… answered 400: refused with 400"
    )
    assert len(receiver.to("/gone")) == 1


# --- email -----------------------------------------------------------------------------------


def test_an_email_reaches_its_recipients(app: Tactician, mailbox: Mailbox) -> None:
    mailbox.start()
    task_id = send(
        app, mail_channel(mailbox), "Task late", "j42 missed its deadline.", event={"task": "j42"}
    )

    deliver(app, task_id)

    assert app.get(task_id).state is TaskState.SUCCEEDED, app.get(task_id).last_error
    (mail,) = mailbox.mails
    assert mail.sender == "tactician@example.test"
    assert mail.recipients == ["ops@example.test", "lead@example.test"]
    assert mail.message["Subject"] == "Task late"
    assert mail.message["To"] == "ops@example.test, lead@example.test"
    assert mail.message["Message-ID"] == f"<{task_id}.notify@tactician>"
    body = mail.message.get_content().replace("\r\n", "\n")  # SMTP carries CRLF line ends
    assert body == "j42 missed its deadline.\n\nEvent:\ntask: j42\n"


def test_an_email_waits_for_a_server_that_is_down(app: Tactician, mailbox: Mailbox) -> None:
    task_id = send(app, mail_channel(mailbox), "Server down", "delivered once it is up")

    # The server is not started yet: attempts fail and the task waits to retry.
    assert run_until(app, lambda: app.get(task_id).state is TaskState.RETRY_WAIT)
    failed = app.store.attempts(task_id)
    assert failed and {a.outcome for a in failed} == {"failed"}
    assert (
        f"HandlerError: email channel oncall-mail to ops@example.test, lead@example.test via "
        f"127.0.0.1:{mailbox.port} failed: ConnectionRefusedError: "
    ) in (failed[0].error or "")

    mailbox.start()
    deliver(app, task_id)

    task = app.get(task_id)
    assert task.state is TaskState.SUCCEEDED, task.last_error
    assert task.attempt == len(failed) + 1
    assert len(mailbox.mails) == 1


def test_a_temporarily_refused_recipient_is_retried(app: Tactician, mailbox: Mailbox) -> None:
    mailbox.refusals["ops@example.test"] = ["451 4.2.1 Mailbox busy, try later"]
    mailbox.start()
    task_id = send(app, mail_channel(mailbox, "ops@example.test"), "Busy", "second attempt")

    deliver(app, task_id)

    assert app.get(task_id).state is TaskState.SUCCEEDED
    assert outcomes(app, task_id) == ["failed", "succeeded"]
    assert "every recipient refused: ops@example.test (451 4.2.1 Mailbox busy" in (
        app.store.attempts(task_id)[0].error or ""
    )
    assert [mail.recipients for mail in mailbox.mails] == [["ops@example.test"]]


def test_a_permanently_refused_recipient_ends_the_email(app: Tactician, mailbox: Mailbox) -> None:
    mailbox.refusals["nobody@example.test"] = ["550 5.1.1 No such user"] * 5
    mailbox.start()
    task_id = send(app, mail_channel(mailbox, "nobody@example.test"), "Lost", "never arrives")

    deliver(app, task_id)

    task = app.get(task_id)
    assert task.state is TaskState.DEAD
    assert task.attempt == 1
    assert "nobody@example.test (550 5.1.1 No such user)" in (task.last_error or "")
    assert mailbox.mails == []


# --- bad input -------------------------------------------------------------------------------


def test_secrets_named_by_environment_variables_stay_out_of_the_payload(
    app: Tactician, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TACTICIAN_NOTIFY_TEST_HOOK_URL", f"{receiver.url}/secret-path")
    monkeypatch.setenv("TACTICIAN_NOTIFY_TEST_HOOK_TOKEN", "Bearer s3cret")
    channel = Channel.from_mapping(
        "ops-hook",
        {
            "type": "webhook",
            "url_env": "TACTICIAN_NOTIFY_TEST_HOOK_URL",
            "headers": {"X-Team": "ops"},
            "headers_env": {"Authorization": "TACTICIAN_NOTIFY_TEST_HOOK_TOKEN"},
        },
    )
    task_id = send(app, channel, "Task late", "j42 missed its deadline")
    stored = json.dumps(app.get(task_id).payload)
    assert "secret-path" not in stored and "s3cret" not in stored
    assert "TACTICIAN_NOTIFY_TEST_HOOK_URL" in stored

    deliver(app, task_id)

    assert app.get(task_id).state is TaskState.SUCCEEDED, app.get(task_id).last_error
    (request,) = receiver.to("/secret-path")
    assert request.headers["authorization"] == "Bearer s3cret"
    assert request.headers["x-team"] == "ops"


def test_a_secret_the_worker_does_not_have_ends_the_notification(app: Tactician) -> None:
    channel = Channel.from_mapping(
        "ops", {"type": "slack", "url_env": "TACTICIAN_NOTIFY_TEST_UNSET"}
    )
    task_id = send(app, channel, "Pool full", "drivers at 100%")

    deliver(app, task_id)

    task = app.get(task_id)
    assert (task.state, task.attempt) == (TaskState.DEAD, 1)
    assert task.last_error == (
        "HandlerError: notification payload: slack channel ops: the environment variable "
        "TACTICIAN_NOTIFY_TEST_UNSET is not set here"
    )


def test_an_email_password_is_read_from_the_environment() -> None:
    data = {**EMAIL, "username": "bot", "password_env": "TACTICIAN_NOTIFY_SMTP_PASSWORD"}
    channel = Channel.from_mapping("mail", data)
    assert "password" not in notification(channel, "s", "t").payload
    assert channel.resolved({"TACTICIAN_NOTIFY_SMTP_PASSWORD": "hunter2"}).password == "hunter2"
    with pytest.raises(
        InvalidInput,
        match=r"^email channel mail: the environment variable TACTICIAN_NOTIFY_SMTP_PASSWORD "
        r"is not set here$",
    ):
        channel.resolved({})


def test_an_operator_may_not_submit_a_notification_of_their_own(app: Tactician) -> None:
    """A notify task's payload says where it goes and which secrets the worker reads: only the
    engine writes one (from the bundle's channels), never a person through the API or CLI."""
    operator = Actor("ops", Role.OPERATOR)
    task = NewTask(
        NOTIFY_KIND,
        {"channel": "webhook", "subject": "s", "text": "t", "url": "https://elsewhere.test/"},
    )
    with pytest.raises(InvalidInput, match=r"^tactician\.notify tasks are the engine's own"):
        app.submit_many([task], actor=operator)
    assert app.tasks() == []


def test_a_payload_submitted_by_hand_is_checked_by_the_handler(app: Tactician) -> None:
    task_id = app.submit(NOTIFY_KIND, {"channel": "webhook", "subject": "s", "text": "t"})

    deliver(app, task_id)

    task = app.get(task_id)
    assert (task.state, task.attempt) == (TaskState.DEAD, 1)
    assert task.last_error == (
        "HandlerError: notification payload: webhook channel: url must be an http(s) URL "
        "with a host"
    )


EMAIL: dict[str, Any] = {"type": "email", "host": "smtp.example.test", "sender": "t@example.test"}
EMAIL |= {"to": ["ops@example.test"]}
HOOK: dict[str, Any] = {"type": "webhook", "url": "https://hooks.example.test/x"}


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("", HOOK, "a channel needs a name"),
        ("ops", ["webhook"], "channel ops: expected a mapping of fields, got list"),
        (
            "ops",
            {**HOOK, "type": "teams"},
            "channel ops: type must be one of webhook, slack, email, got 'teams'",
        ),
        ("ops", {"type": "slack"}, "slack channel ops: url must be an http(s) URL with a host"),
        ("ops", {**HOOK, "url": "ftp://x/y"}, "url must be an http(s) URL with a host"),
        ("ops", {**HOOK, "headers": {"X-Token": "a\nb"}}, "header 'X-Token' must be a one-line"),
        (
            "ops",
            {**HOOK, "to": ["a@b.test"]},
            "channel ops: unknown field 'to' for webhook channels",
        ),
        ("mail", {**EMAIL, "port": "587"}, "email channel mail: port must be a whole number"),
        ("mail", {**EMAIL, "to": []}, "email channel mail: to must list at least one"),
        ("mail", {**EMAIL, "to": "nobody"}, "to has 'nobody', which is not an email address"),
        ("mail", {**EMAIL, "starttls": "yes"}, "starttls must be true or false"),
        ("mail", {**EMAIL, "password": "hunter2"}, "username and password go together"),
        ("mail", {**EMAIL, "smtp_host": "x"}, "unknown field 'smtp_host' for email channels"),
        (
            "ops",
            {**HOOK, "url_env": "TACTICIAN_NOTIFY_HOOK_URL"},
            "webhook channel ops: give the url or its environment variable, not both",
        ),
        (
            "ops",
            {"type": "slack", "url_env": "TACTICIAN_DB"},
            "slack channel ops: url names an environment variable, which must start with "
            "TACTICIAN_NOTIFY_, got 'TACTICIAN_DB'",
        ),
        ("ops", {"type": "slack", "url_env": "TACTICIAN_NOTIFY_a b"}, "must start with"),
        (
            "ops",
            {**HOOK, "headers": {"A": "x"}, "headers_env": {"A": "TACTICIAN_NOTIFY_A"}},
            "give the header 'A' or its environment variable, not both",
        ),
        (
            "mail",
            {**EMAIL, "password_env": "TACTICIAN_NOTIFY_PW"},
            "username and password go together",
        ),
    ],
)
def test_a_bad_channel_is_refused_and_nothing_is_submitted(
    app: Tactician, name: str, data: Any, message: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        app.submit_many([notification(Channel.from_mapping(name, data), "subject", "text")])

    assert message in refused.value.message
    assert "\n" not in refused.value.message
    assert "hunter2" not in refused.value.message
    assert app.tasks() == []


@pytest.mark.parametrize(
    ("subject", "event", "message"),
    [
        ("", None, "the subject must be a non-empty string"),
        ("late", {"when": object()}, "the event is not JSON"),
        ("late", {"ratio": float("nan")}, "the event is not JSON"),
    ],
)
def test_a_bad_notification_is_refused_and_nothing_is_submitted(
    app: Tactician, subject: str, event: Any, message: str
) -> None:
    channel = Channel.from_mapping("ops", HOOK)
    with pytest.raises(InvalidInput, match=message):
        app.submit_many([notification(channel, subject, "text", event=event)])
    assert app.tasks() == []
