"""Outgoing notifications (webhook, Slack, email) as tasks of the engine itself.

A notification is a task of kind `tactician.notify`, so it is retried with backoff, audited and
visible like any other task. Its payload carries everything the handler needs (channel type,
destination, message), so any worker delivers it without reading configuration:

    app.submit_many([notification(channel, "Task late", "job 42 missed its deadline")])

A payload is readable by whoever can read tasks, so a channel can name its secrets by the
environment variable that holds them instead (`url_env`, `headers_env`, `password_env`; the
name must start with SECRET_PREFIX): the payload then carries the variable's name, and the
worker that sends reads its value. Only the engine submits these tasks (from the bundle's
channels): an operator's submission of the kind is refused (`Tactician.submit_many`).
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import os
import re
import smtplib
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, Literal, cast, get_args
from urllib.parse import urlsplit

import httpx

from tactician.domain import KindSpec, NewTask, RetryPolicy
from tactician.errors import HandlerError, InvalidInput, TargetOverloaded
from tactician.run.context import current_task
from tactician.run.executors import OVERLOAD_STATUS

NOTIFY_KIND = "tactician.notify"
SEND_TIMEOUT = 10.0
"""Seconds for one HTTP request or SMTP command: well inside the kind's hard timeout, so a slow
target fails with a message rather than a killed runner."""

ChannelType = Literal["webhook", "slack", "email"]
CHANNEL_TYPES: tuple[str, ...] = get_args(ChannelType)
_HTTP_FIELDS = frozenset({"type", "url", "headers", "url_env", "headers_env"})
_EMAIL_FIELDS = frozenset({"type", "host", "port", "sender", "to", "starttls"})
_EMAIL_FIELDS |= {"username", "password", "password_env"}
SECRET_PREFIX = "TACTICIAN_NOTIFY_"
"""The only environment variables a channel may name: a payload must not be able to send a
worker's other settings (its database URL, its LLM key) to an address of its choosing."""
_ENV_NAME = re.compile(rf"^{SECRET_PREFIX}[A-Za-z0-9_]+$")
_SLACK_TEXT_LIMIT = 3000  # characters in a section's text
_SLACK_FIELD_LIMIT = 2000  # characters in one section field
_SLACK_MAX_FIELDS = 10


def notify_kind() -> KindSpec:
    """The kind that delivers notifications."""
    return KindSpec(
        name=NOTIFY_KIND,
        pool=NOTIFY_KIND,
        retry=RetryPolicy(max_attempts=6, initial_delay=5.0, multiplier=2.0, max_delay=300.0),
        timeout=30.0,
        # Every destination shares this kind's one target, so a breaker opened by one broken
        # webhook would hold back the notifications to all the healthy ones.
        breaker_threshold=0,
    )


@dataclass(frozen=True)
class Channel:
    """Where a notification goes: an HTTP endpoint (webhook, Slack) or an SMTP server."""

    type: ChannelType
    name: str = ""
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    host: str | None = None
    port: int = 25
    sender: str | None = None
    to: tuple[str, ...] = ()
    starttls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    url_env: str | None = None
    """The environment variable that holds the URL (read by the worker that sends)."""
    headers_env: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Header name → the environment variable that holds its value."""
    password_env: str | None = None
    """The environment variable that holds the SMTP password."""

    @classmethod
    def from_mapping(cls, name: str, data: Any) -> Channel:
        """A channel as written under `channels:` in a policy bundle."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidInput("a channel needs a name")
        return cls._parse(name, data)

    @classmethod
    def _parse(cls, name: str, data: Any) -> Channel:
        label = f"channel {name}" if name else "channel"
        if not isinstance(data, Mapping):
            raise InvalidInput(f"{label}: expected a mapping of fields, got {_kind_of(data)}")
        # An empty YAML value (`url:`) reads as None: the same as leaving the field out.
        fields = {key: value for key, value in data.items() if value is not None}
        kind = fields.pop("type", None)
        if kind not in CHANNEL_TYPES:
            raise InvalidInput(
                f"{label}: type must be one of {', '.join(CHANNEL_TYPES)}, got {kind!r}"
            )
        allowed = _EMAIL_FIELDS if kind == "email" else _HTTP_FIELDS
        for key in fields:
            if key not in allowed:
                raise InvalidInput(f"{label}: unknown field {key!r} for {kind} channels")
        if isinstance(fields.get("to"), str):  # one recipient may be written without a list
            fields["to"] = [fields["to"]]
        if isinstance(fields.get("to"), list | tuple):
            fields["to"] = tuple(fields["to"])
        for key in ("headers", "headers_env"):
            if isinstance(fields.get(key), Mapping):
                fields[key] = dict(fields[key])
        return cls(type=kind, name=name, **fields)

    def __post_init__(self) -> None:
        if self.type not in CHANNEL_TYPES:
            raise InvalidInput(f"{self}: type must be one of {', '.join(CHANNEL_TYPES)}")
        if self.type == "email":
            self._check_email()
        else:
            self._check_http()

    def _check_http(self) -> None:
        if self.url_env is not None:
            self._check_env("url", self.url_env, self.url)
        else:
            parts = urlsplit(self.url) if isinstance(self.url, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise InvalidInput(f"{self}: url must be an http(s) URL with a host")
        for field_name in ("headers", "headers_env"):
            headers = getattr(self, field_name)
            if not isinstance(headers, Mapping):
                raise InvalidInput(f"{self}: {field_name} must be a mapping of names to values")
            for key, value in headers.items():
                if not (isinstance(key, str) and isinstance(value, str)) or _multiline(key + value):
                    raise InvalidInput(f"{self}: header {key!r} must be a one-line string")
        for key, name in self.headers_env.items():
            self._check_env(f"header {key!r}", name, self.headers.get(key))

    def _check_env(self, what: str, name: object, given: object) -> None:
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise InvalidInput(
                f"{self}: {what} names an environment variable, which must start with "
                f"{SECRET_PREFIX}, got {name!r}"
            )
        if given is not None:
            raise InvalidInput(f"{self}: give the {what} or its environment variable, not both")

    def resolved(self, environ: Mapping[str, str]) -> Channel:
        """This channel with the secrets it names read from `environ` (checked as if written
        in place); a variable that is not set is refused, naming it."""
        values: dict[str, str] = {}
        for name in [self.url_env, self.password_env, *self.headers_env.values()]:
            if name is None:
                continue
            value = environ.get(name)
            if not value:
                raise InvalidInput(f"{self}: the environment variable {name} is not set here")
            values[name] = value
        if not values:
            return self
        headers = dict(self.headers) | {k: values[v] for k, v in self.headers_env.items()}
        return dataclasses.replace(
            self,
            url=values[self.url_env] if self.url_env else self.url,
            password=values[self.password_env] if self.password_env else self.password,
            headers=headers,
            url_env=None,
            password_env=None,
            headers_env={},
        )

    def _check_email(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip() or _multiline(self.host):
            raise InvalidInput(f"{self}: host must be the SMTP server's name or address")
        if type(self.port) is not int or not 0 < self.port < 65536:
            raise InvalidInput(f"{self}: port must be a whole number from 1 to 65535")
        if not _is_address(self.sender):
            raise InvalidInput(f"{self}: sender must be an email address")
        if not isinstance(self.to, tuple) or not self.to:
            raise InvalidInput(f"{self}: to must list at least one email address")
        for address in self.to:
            if not _is_address(address):
                raise InvalidInput(f"{self}: to has {address!r}, which is not an email address")
        if not isinstance(self.starttls, bool):
            raise InvalidInput(f"{self}: starttls must be true or false")
        for key in ("username", "password"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise InvalidInput(f"{self}: {key} must be a string")
        if self.password_env is not None:
            self._check_env("password", self.password_env, self.password)
        has_password = self.password is not None or self.password_env is not None
        if (self.username is None) == has_password:
            raise InvalidInput(f"{self}: username and password go together")

    def __str__(self) -> str:
        return f"{self.type} channel {self.name}" if self.name else f"{self.type} channel"

    @property
    def destination(self) -> str:
        """Where it sends, safe to record: no credentials, query strings or Slack tokens."""
        if self.type == "email":
            return f"{', '.join(self.to)} via {self.host}:{self.port}"
        parts = urlsplit(self.url or "")
        origin = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        # A Slack webhook's path is its secret; other paths name the endpoint.
        return f"{origin}/…" if self.type == "slack" else origin + parts.path

    def payload_fields(self) -> dict[str, Any]:
        """This channel as the fields of a notify task's payload."""
        if self.type != "email":
            fields: dict[str, Any] = {"url": self.url, "url_env": self.url_env}
            fields |= {"headers": dict(self.headers), "headers_env": dict(self.headers_env)}
        else:
            fields = {"host": self.host, "port": self.port, "sender": self.sender}
            fields |= {"to": list(self.to), "starttls": self.starttls}
            fields |= {"username": self.username, "password": self.password}
            fields |= {"password_env": self.password_env}
        return {key: value for key, value in fields.items() if value not in (None, {})}


def notification(
    channel: Channel,
    subject: str,
    text: str,
    *,
    event: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> NewTask:
    """The task that sends `subject` and `text` (and the event's fields) to `channel`."""
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidInput(f"notification to {channel}: the subject must be a non-empty string")
    if not isinstance(text, str):
        raise InvalidInput(f"notification to {channel}: the text must be a string")
    payload: dict[str, Any] = {"channel": channel.type, "subject": subject, "text": text}
    if channel.name:
        payload["channel_name"] = channel.name
    if event is not None:
        payload["event"] = _plain_json(channel, event)
    return NewTask(
        kind=NOTIFY_KIND,
        payload=payload | channel.payload_fields(),
        idempotency_key=idempotency_key,
        source=f"notify:{channel.name}" if channel.name else "notify",
    )


def notify(
    channel: str,
    subject: str,
    text: str,
    event: Mapping[str, Any] | None = None,
    channel_name: str | None = None,
    url: str | None = None,
    headers: Mapping[str, str] | None = None,
    host: str | None = None,
    port: int | None = None,
    sender: str | None = None,
    to: Sequence[str] | None = None,
    starttls: bool | None = None,
    username: str | None = None,
    password: str | None = None,
    url_env: str | None = None,
    headers_env: Mapping[str, str] | None = None,
    password_env: str | None = None,
) -> None:
    """The handler: deliver one notification, or raise a one-line error naming where it went."""
    given: dict[str, Any] = {
        "type": channel,
        "url": url,
        "headers": headers,
        "host": host,
        "port": port,
    }
    given |= {"sender": sender, "to": to, "starttls": starttls}
    given |= {"username": username, "password": password, "password_env": password_env}
    given |= {"url_env": url_env, "headers_env": headers_env}
    try:
        target = Channel._parse(channel_name or "", given).resolved(os.environ)
    except InvalidInput as exc:
        # The same payload will be just as wrong on the next attempt.
        raise HandlerError(f"notification payload: {exc.message}", retryable=False) from None
    if target.type == "email":
        _send_email(target, subject, text, event)
    elif target.type == "slack":
        _post(target, _slack_body(subject, text, event))
    else:
        _post(target, {"subject": subject, "text": text, "event": event})


# --- delivery -------------------------------------------------------------------------------


def _post(channel: Channel, body: dict[str, Any]) -> None:
    assert channel.url is not None
    headers = dict(channel.headers)
    task_id = _task_id()
    if task_id is not None and channel.type == "webhook":
        # Delivery is at least once; the task id is the same on every attempt, so a receiver
        # can drop repeats.
        headers.setdefault("Idempotency-Key", task_id)
    where = f"{channel} to {channel.destination}"
    try:
        response = httpx.post(channel.url, json=body, headers=headers, timeout=SEND_TIMEOUT)
    except httpx.HTTPError as exc:
        raise HandlerError(f"{where} failed: {type(exc).__name__}: {_one_line(exc)}") from None
    if response.is_success:
        return
    detail = f"{where} answered {response.status_code}: {_one_line(response.text[:200])}"
    if response.status_code in OVERLOAD_STATUS:
        raise TargetOverloaded(detail)
    # A 4xx (or a redirect) will be answered the same way again; a 5xx may not.
    raise HandlerError(detail, retryable=response.status_code >= 500)


def _slack_body(subject: str, text: str, event: Mapping[str, Any] | None) -> dict[str, Any]:
    """An incoming-webhook message: `text` is the fallback shown in notifications."""
    section: dict[str, Any] = {
        "type": "section",
        "text": {
            "type": "mrkdwn",
            "text": _clip(f"*{_slack(subject)}*\n{_slack(text)}", _SLACK_TEXT_LIMIT),
        },
    }
    items = list((event or {}).items())[:_SLACK_MAX_FIELDS]
    if items:
        section["fields"] = [
            {
                "type": "mrkdwn",
                "text": _clip(f"*{_slack(key)}*\n{_slack(_show(value))}", _SLACK_FIELD_LIMIT),
            }
            for key, value in items
        ]
    return {"text": _slack(f"{subject}: {text}"), "blocks": [section]}


def _send_email(channel: Channel, subject: str, text: str, event: Mapping[str, Any] | None) -> None:
    assert channel.host is not None and channel.sender is not None
    message = EmailMessage()
    message["Subject"] = " ".join(subject.split())  # a header is one line
    message["From"] = channel.sender
    message["To"] = ", ".join(channel.to)
    message["Date"] = email.utils.formatdate()
    task_id = _task_id()
    # A Message-ID fixed by the task lets mail clients fold the copies a retry may send.
    message["Message-ID"] = (
        f"<{task_id}.notify@tactician>" if task_id else email.utils.make_msgid("notify")
    )
    lines = [f"{key}: {_show(value)}" for key, value in (event or {}).items()]
    message.set_content(text + ("\n\nEvent:\n" + "\n".join(lines) if lines else "") + "\n")
    where = f"{channel} to {channel.destination}"
    try:
        with smtplib.SMTP(channel.host, channel.port, timeout=SEND_TIMEOUT) as smtp:
            if channel.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if channel.username is not None and channel.password is not None:
                smtp.login(channel.username, channel.password)
            refused = smtp.send_message(message)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        raise HandlerError(
            f"{where}: every recipient refused: {_refusals(exc.recipients)}",
            retryable=any(code < 500 for code in codes),
        ) from None
    except smtplib.SMTPResponseException as exc:
        raise HandlerError(
            f"{where}: server answered {exc.smtp_code} {_one_line(_text(exc.smtp_error))}",
            retryable=exc.smtp_code < 500,  # 4xx is temporary, 5xx permanent (RFC 5321)
        ) from None
    except (smtplib.SMTPNotSupportedError, ssl.SSLCertVerificationError) as exc:
        # The server lacks STARTTLS or AUTH, or its certificate is not trusted: retrying
        # changes nothing until someone changes the channel.
        raise HandlerError(f"{where}: {_one_line(exc)}", retryable=False) from None
    except (smtplib.SMTPException, OSError) as exc:  # refused, reset, timed out: try again
        raise HandlerError(f"{where} failed: {type(exc).__name__}: {_one_line(exc)}") from None
    if refused:
        # The others have the message: a retry would send it to them again.
        raise HandlerError(f"{where}: delivered, except to {_refusals(refused)}", retryable=False)


# --- helpers --------------------------------------------------------------------------------


def _task_id() -> str | None:
    try:
        return current_task().task_id
    except RuntimeError:  # called directly, outside a worker
        return None


def _text(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)


def _refusals(recipients: Mapping[str, tuple[int, bytes]]) -> str:
    return ", ".join(
        f"{address} ({code} {_one_line(_text(reply))})"
        for address, (code, reply) in recipients.items()
    )


def _plain_json(channel: Channel, event: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(event, Mapping):
        raise InvalidInput(f"notification to {channel}: the event must be a mapping")
    try:
        return cast(dict[str, Any], json.loads(json.dumps(dict(event), allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"notification to {channel}: the event is not JSON: {exc}") from None


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _slack(text: str) -> str:
    """Escape the three characters Slack's mrkdwn reserves for links and mentions."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def _multiline(text: str) -> bool:
    return "\n" in text or "\r" in text


def _is_address(value: object) -> bool:
    if not isinstance(value, str) or _multiline(value):
        return False
    address = email.utils.parseaddr(value)[1]
    return "@" in address and not any(c.isspace() for c in address)


def _kind_of(value: object) -> str:
    return "nothing" if value is None else type(value).__name__
