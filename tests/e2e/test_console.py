"""The web console in a real browser: Playwright drives Debian's chromium (headless) against the
API served by uvicorn on SQLite. Each test leaves a screenshot in test-results/ (ignored by git).

Without /usr/bin/chromium (or the playwright package) the tests skip with the reason, except in
CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tactician.app import Tactician
from tactician.domain import KindSpec, NewTask, Result, TaskState
from tactician.govern.audit import GENESIS, AuditRecord, record_hash
from tactician.govern.roles import Actor, Role
from tactician.run.gate import POLICY_TTL_S
from tactician.settings import Settings
from tactician.store.protocol import Finish
from tactician.store.sites import SyncState
from tests.e2e.serving import serving
from tests.integration.driving import final, run_until

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parents[2] / "test-results"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
VIEWPORT = {"width": 1366, "height": 768}
ROOT = Actor("root", Role.ADMIN)
BUNDLE = """name: console-test
approvals:
  - name: fixes
    match: {kinds: [fix]}
    approvers: {roles: [approver, admin]}
    required: 1
    expires_after: 1h
"""


def fix_host(host: str) -> None:
    """The approved remediation (module level: it runs in a forked runner)."""


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"the browser tests need it in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@dataclass
class World:
    app: Tactician
    base: str
    tokens: dict[Role, str]
    db_path: Path

    def actor(self, role: Role) -> Actor:
        return self.app.gate.actor(self.tokens[role])

    def submit(self, kind: str, role: Role = Role.OPERATOR, **fields: Any) -> str:
        task = NewTask(kind=kind, **fields)
        (task_id,) = self.app.submit_many([task], actor=self.actor(role))
        return task_id


@pytest.fixture
def world(sqlite_url: str) -> Iterator[World]:
    settings = Settings(db=sqlite_url)
    app = Tactician(settings=settings)
    app.store.register_kinds([KindSpec("job", pool="p"), KindSpec("fix", pool="p")])
    app.store.set_pool("p", 2)
    tokens = {role: app.gate.create_token(ROOT, f"t-{role.value}", role) for role in Role}
    app.gate.deploy(ROOT, BUNDLE, "console.yaml")
    with serving(settings) as client:
        yield World(app, str(client.base_url).rstrip("/"), tokens, Path(app.store.url[10:]))
    app.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(10_000)
    tab = context.new_page()
    yield tab
    tab.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()


def sign_in(page: Any, world: World, role: Role) -> None:
    from playwright.sync_api import expect

    page.goto(f"{world.base}/console/login")
    page.fill("#token", world.tokens[role])
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{world.base}/console/")


def flash(page: Any, kind: str) -> Any:
    return page.locator(f"p.flash.{kind}")


# --- signing in and the live queue -----------------------------------------------------------


def test_sign_in_refuses_a_bad_token_then_shows_the_live_queue(page: Any, world: World) -> None:
    from playwright.sync_api import expect

    for n in range(3):
        world.submit("job", payload={"n": n}, weight=1 + n)
    page.goto(f"{world.base}/console/")
    expect(page).to_have_url(f"{world.base}/console/login")
    page.fill("#token", "tct_not-a-token")
    page.click("button[type=submit]")
    expect(page.locator(".flash.error")).to_contain_text("unknown token")
    page.screenshot(path=str(ARTIFACTS / "login-refused.png"))

    page.fill("#token", world.tokens[Role.VIEWER])
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{world.base}/console/")
    queue = page.locator("#queue")
    expect(queue).to_be_visible()
    expect(queue.locator("tbody tr")).to_have_count(3)
    expect(page.locator("[data-state=ready]")).to_have_text("3")
    expect(queue).to_contain_text("next in line")
    cookie = next(c for c in page.context.cookies() if c["name"] == "tct_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # The layout: the queue sits in the first screen of a laptop, with no sideways scrolling.
    box = queue.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= VIEWPORT["width"]
    assert box["y"] < VIEWPORT["height"] / 2
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
    for column in ("Task", "Kind", "State", "Due", "Score", "Action", "Why"):
        expect(queue.locator("thead")).to_contain_text(column)

    # The queue refreshes itself: a task submitted now appears without a reload.
    world.submit("job", payload={"n": 9}, weight=9)
    expect(queue.locator("tbody tr")).to_have_count(4, timeout=8_000)
    expect(page.locator("#live-status")).to_contain_text("updated")


def test_a_task_page_explains_why(page: Any, world: World) -> None:
    from playwright.sync_api import expect

    now = world.app.store.db_now()
    urgent = world.submit("job", payload={"n": 1}, due_at=now + 600, weight=5, estimate=30)
    world.submit("job", payload={"n": 2}, due_at=now + 7200)
    sign_in(page, world, Role.OPERATOR)
    page.click(f"#queue tr[data-task='{urgent}'] a")
    expect(page).to_have_url(f"{world.base}/console/tasks/{urgent}")
    expect(page.locator("h1")).to_contain_text("job")
    expect(page.locator("#why")).to_contain_text("next in line")
    reasons = page.locator("#reasons tbody tr")
    assert reasons.count() >= 1
    expect(page.locator("#timeline")).to_contain_text("task.submitted")
    expect(page.locator("#timeline")).to_contain_text("t-operator")
    expect(page.locator("#attempts, .empty").first).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "task-why.png"), full_page=True)

    page.goto(f"{world.base}/console/tasks/nope")
    expect(page.locator("h1")).to_have_text("Not found")


# --- approvals -----------------------------------------------------------------------------------


def test_approve_one_task_and_reject_another_with_a_reason(page: Any, world: World) -> None:
    from playwright.sync_api import expect

    good = world.submit("fix", payload={"host": "a"})
    bad = world.submit("fix", payload={"host": "b"})
    assert world.app.get(good).state is TaskState.AWAITING_APPROVAL
    sign_in(page, world, Role.APPROVER)
    expect(page.locator("nav .count")).to_have_text("2")
    page.click("nav >> text=Approvals")
    inbox = page.locator("#inbox")
    expect(inbox.locator("tbody tr")).to_have_count(2)
    row = inbox.locator(f"tr[data-task='{good}']")
    expect(row).to_contain_text("fixes")
    expect(row).to_contain_text("t-operator")
    expect(row).to_contain_text("0 of 1 approvals")
    page.screenshot(path=str(ARTIFACTS / "approvals-inbox.png"))

    row.locator("input[name=reason]").fill("checked the host, go")
    row.locator("button[value=approve]").click()
    expect(flash(page, "ok")).to_contain_text(f"task {good}: approved")
    expect(inbox.locator(f"tr[data-task='{good}']")).to_have_count(0)
    expect(page.locator(f"#decided tr[data-task='{good}']")).to_contain_text("approved")
    assert world.app.get(good).state is TaskState.PENDING

    # It runs: the planner leases it, and the queue and its page say so.
    world.app.planner().tick()
    assert world.app.get(good).state is TaskState.LEASED
    page.click("nav >> text=Queue")
    expect(page.locator(f"#queue tr[data-task='{good}']")).to_contain_text("leased")
    page.goto(f"{world.base}/console/tasks/{good}")
    expect(page.locator(".head .badge")).to_have_text("leased")
    expect(page.locator("#timeline")).to_contain_text("approval.approved")
    # ... and a real worker runs it to the end, which its page shows too.
    world.app.task(fix_host, name="fix", pool="p")
    assert run_until(world.app, final(world.app, good), timeout=30)
    page.goto(f"{world.base}/console/tasks/{good}")
    expect(page.locator(".head .badge")).to_have_text("succeeded")
    expect(page.locator("#timeline")).to_contain_text("task.finished")

    page.goto(f"{world.base}/console/approvals")
    row = page.locator(f"#inbox tr[data-task='{bad}']")
    row.locator("input[name=reason]").fill("not during the freeze")
    row.locator("button[value=reject]").click()
    expect(flash(page, "ok")).to_contain_text(f"task {bad}: rejected")
    expect(page.locator("#inbox-empty")).to_be_visible()
    decided = page.locator(f"#decided tr[data-task='{bad}']")
    expect(decided).to_contain_text("rejected")
    expect(decided).to_contain_text("not during the freeze")
    page.goto(f"{world.base}/console/tasks/{bad}")
    expect(page.locator(".head .badge")).to_have_text("rejected")
    expect(page.locator("dl.facts")).to_contain_text("rejected by t-approver: not during")


def test_refusals_are_a_one_line_message(page: Any, world: World) -> None:
    from playwright.sync_api import expect

    own = world.submit("fix", role=Role.ADMIN, payload={"host": "c"})
    sign_in(page, world, Role.ADMIN)
    page.goto(f"{world.base}/console/approvals")
    row = page.locator(f"#inbox tr[data-task='{own}']")
    row.locator("input[name=reason]").fill("mine")
    row.locator("button[value=approve]").click()
    expect(flash(page, "error")).to_contain_text("asked for this task and cannot approve")
    expect(page.locator(f"#inbox tr[data-task='{own}']")).to_have_count(1)

    page.click("button:has-text('Sign out')")
    sign_in(page, world, Role.VIEWER)
    page.goto(f"{world.base}/console/approvals")
    row = page.locator(f"#inbox tr[data-task='{own}']")
    row.locator("input[name=reason]").fill("looks fine")
    row.locator("button[value=reject]").click()
    expect(flash(page, "error")).to_have_text("t-viewer (viewer) may not approval.vote")
    refused = [r for r in world.app.store.audit_records() if r.action == "access.refused"]
    assert [r.actor for r in refused] == ["t-admin", "t-viewer"]
    assert world.app.get(own).state is TaskState.AWAITING_APPROVAL


# --- overrides, pools, policies ------------------------------------------------------------------


def test_overrides_pools_and_policies(page: Any, world: World) -> None:
    from playwright.sync_api import expect

    task = world.submit("job", payload={"n": 1})
    other = world.submit("job", payload={"n": 2})
    sign_in(page, world, Role.OPERATOR)
    page.goto(f"{world.base}/console/overrides")
    form = page.locator("#override-form")
    form.locator("input[name=task_id]").fill(task)
    form.locator("select[name=what]").select_option("hold")
    form.locator("input[name=reason]").fill("waiting for the vendor")
    form.locator("button").click()
    expect(flash(page, "ok")).to_contain_text("hold set")
    held = page.locator(f"#held tr[data-task='{task}']")
    expect(held).to_contain_text("held by t-operator: waiting for the vendor")

    form.locator("input[name=task_id]").fill(other)
    form.locator("select[name=what]").select_option("pin")
    form.locator("input[name=score]").fill("0.9")
    form.locator("input[name=reason]").fill("customer escalation")
    form.locator("button").click()
    expect(page.locator("#overrides")).to_contain_text("customer escalation")
    page.goto(f"{world.base}/console/")
    expect(page.locator(f"#queue tr[data-task='{other}']")).to_contain_text("overridden by")
    page.goto(f"{world.base}/console/overrides")
    page.screenshot(path=str(ARTIFACTS / "overrides.png"), full_page=True)

    held = page.locator(f"#held tr[data-task='{task}']")
    held.locator("input[name=reason]").fill("vendor answered")
    held.locator("button").click()
    expect(page.locator(f"#held tr[data-task='{task}']")).to_have_count(0)
    assert world.app.get(task).state is not TaskState.HELD
    page.locator("#overrides button:has-text('Clear')").click()
    expect(page.locator("#overrides")).to_have_count(0)

    form = page.locator("#override-form")  # a bad input is a message, nothing changes
    form.locator("input[name=task_id]").fill("nope")
    form.locator("input[name=reason]").fill("x")
    form.locator("button").click()
    expect(flash(page, "error")).to_be_visible()

    page.click("nav >> text=Pools")
    expect(page.locator("#pools")).to_contain_text("p")
    expect(page.locator("#pools tbody tr").first.locator("td").nth(1)).to_have_text("2")
    page.screenshot(path=str(ARTIFACTS / "pools.png"))
    page.click("nav >> text=Policies")
    expect(page.locator("#slots")).to_contain_text("console-test")
    expect(page.locator("#deployments tbody tr")).to_have_count(1)
    world.app.gate.deploy(
        ROOT, "name: trial\n", "trial.yaml", slot="experiment", share=0.3, split_by="task"
    )
    world.app.gate.deploy(ROOT, "name: shade\n", "shade.yaml", slot="shadow")
    time.sleep(POLICY_TTL_S)  # the server rereads deployments at most once a second
    page.reload()
    expect(page.locator("#experiment tbody tr")).to_have_count(2)
    expect(page.locator("#shadow")).to_contain_text("never acted on")
    page.screenshot(path=str(ARTIFACTS / "policies.png"), full_page=True)


# --- edge sites ----------------------------------------------------------------------------------


def site_chain(count: int, now: float) -> list[AuditRecord]:
    """A site's first `count` audit records, linked as its agent would have written them."""
    records: list[AuditRecord] = []
    prev = GENESIS
    for seq in range(1, count + 1):
        fields = (seq, now, "agent", "task.submitted", f"t{seq}", "{}", prev)
        prev = record_hash(*fields)
        records.append(AuditRecord(*fields, prev))
    return records


def test_sites_show_bundle_link_backlog_lag_and_tokens(page: Any, world: World) -> None:
    from playwright.sync_api import expect

    sign_in(page, world, Role.VIEWER)
    page.click("nav >> text=Sites")
    expect(page).to_have_url(f"{world.base}/console/sites")
    expect(page.locator("#sites-empty")).to_contain_text("tactician agent --central URL")
    expect(page.locator("#sites-empty")).to_contain_text("--site NAME")
    page.screenshot(path=str(ARTIFACTS / "sites-empty.png"))

    store, live = world.app.store, world.app.gate.policy().version
    now = store.db_now()
    store.site_pulled("north", live)
    unsynced = SyncState(backlog=7, unsynced=3, oldest_unsynced_at=now - 150)
    assert store.accept_site_records("north", site_chain(2, now), unsynced) == (2, 2)
    lease = store.lease_tokens("north", "job", 4, per_second=1.0, burst=10.0, lease_s=600)
    assert lease.granted == 4
    retired = "0" * 64  # a bundle the centre has since replaced
    store.site_pulled("south", retired)
    store.accept_site_records("south", [], SyncState(backlog=2))
    with sqlite3.connect(world.db_path) as db:  # south has not been heard from for three hours
        db.execute("UPDATE sites SET last_seen = last_seen - 3 * 3600 WHERE name = 'south'")

    # No reload: the page refreshes its table every 5 s.
    sites = page.locator("#sites")
    expect(sites.locator("tbody tr")).to_have_count(2, timeout=15_000)
    headers = ["Site", "Bundle", "Link", "Last seen", "Backlog", "Unsynced", "Lag", "Tokens held"]
    expect(sites.locator("thead th")).to_have_text([*headers, "Acked seq"])
    just_now = re.compile(r"now|\ds ago")  # north was heard from as the test began
    old = retired[:12]
    shown = {
        "north": ["north", f"{live[:12]} current", "up", just_now, "7", "3", "2m", "job 4", "2"],
        "south": ["south", f"{old} behind", "down for 3h", "3h ago", "2", "0", "—", "none", "0"],
    }
    for name, cells in shown.items():
        expect(sites.locator(f"tr[data-site='{name}'] td")).to_have_text(cells)
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
    page.screenshot(path=str(ARTIFACTS / "sites.png"), full_page=True)


# --- KPIs over time ------------------------------------------------------------------------------


def run_all(world: World) -> None:
    """Plan and run every waiting job, two at a time (the pool's capacity), as a worker would."""
    store, planner = world.app.store, world.app.planner()
    for _ in range(20):
        planner.tick()
        claims = store.claim("w", ["job"], 2)
        if not claims:
            return
        finishes = [
            Finish(Result(c.task_id, c.token, True, store.db_now(), 0.01), c.kind, c.attempt, None)
            for c in claims
        ]
        assert all(store.finish("w", finishes, store.kinds()))


def test_kpi_charts_show_adherence_misses_depth_and_interventions(page: Any, world: World) -> None:
    from playwright.sync_api import expect

    now = world.app.store.db_now()
    for n in range(4):
        world.submit("job", payload={"n": n}, due_at=now + 3600)
    late = [world.submit("job", payload={"late": n}, due_at=now + 0.5) for n in range(2)]
    time.sleep(0.6)  # their deadlines pass before they run
    run_all(world)
    assert {world.app.get(t).state for t in late} == {TaskState.SUCCEEDED}
    held = world.submit("job", payload={"held": True})
    world.app.store.hold(held, world.actor(Role.OPERATOR), "waiting for the vendor")
    fix = world.submit("fix", payload={"host": "k"})
    world.app.gate.vote(world.actor(Role.APPROVER), fix, "approve", "fine")

    sign_in(page, world, Role.VIEWER)
    page.click("nav >> text=KPIs")
    expect(page).to_have_url(f"{world.base}/console/kpis")
    titles = {
        "sla": "SLA adherence",
        "missed": "Missed deadlines",
        "depth": "Queue depth",
        "interventions": "Manual interventions",
    }
    for key, title in titles.items():
        svg = page.locator(f"#kpi-{key} svg.chart")
        expect(svg).to_be_visible()
        expect(svg).to_have_attribute("role", "img")
        expect(page.locator(f"#kpi-{key}-title")).to_have_text(title)
        box = svg.bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 80
    # 4 of the 6 finished on time; 2 missed; 1 hold and 1 vote; the held job waits.
    expect(page.locator("#kpi-sla .headline")).to_have_text("now 67%")
    expect(page.locator("#kpi-sla circle title").last).to_contain_text("4 of 6 on time")
    expect(page.locator("#kpi-missed .headline")).to_have_text("2 in all")
    expect(page.locator("#kpi-interventions .headline")).to_have_text("2 in all")
    expect(page.locator("#kpi-interventions rect title").last).to_contain_text("task.held 1")
    expect(page.locator("#kpi-depth .headline")).to_have_text("now 2")  # the held job, the fix
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
    page.screenshot(path=str(ARTIFACTS / "kpis.png"), full_page=True)

    page.click("text=last 15m")
    expect(page).to_have_url(f"{world.base}/console/kpis?window=15m")
    expect(page.locator("svg.chart")).to_have_count(4)
    expect(page.locator("#live-status")).to_contain_text("updated", timeout=15_000)


# --- audit, CSRF, sessions -----------------------------------------------------------------------


def test_verify_the_audit_trail_then_catch_tampering(page: Any, world: World) -> None:
    from playwright.sync_api import expect

    world.submit("job")
    sign_in(page, world, Role.VIEWER)
    page.click("nav >> text=Audit")
    expect(page.locator("#audit")).to_contain_text("task.submitted")
    expect(page.locator("#audit")).to_contain_text("console.login")
    page.click("#verify")
    expect(flash(page, "ok")).to_contain_text("audit chain intact")
    page.screenshot(path=str(ARTIFACTS / "audit-intact.png"))

    with sqlite3.connect(world.db_path) as db:  # someone with the file gets past the triggers
        db.execute("DROP TRIGGER audit_log_no_update")
        db.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2")
    page.click("#verify")
    expect(flash(page, "error")).to_contain_text("audit chain broken at record 2")


def test_a_post_without_the_csrf_token_is_refused(page: Any, world: World) -> None:
    from playwright.sync_api import expect

    task = world.submit("fix")
    sign_in(page, world, Role.APPROVER)
    page.goto(f"{world.base}/console/approvals")
    row = page.locator(f"#inbox tr[data-task='{task}']")
    row.locator("input[name=reason]").fill("ok")
    page.evaluate("document.querySelectorAll('input[name=csrf]').forEach(e => e.remove())")
    row.locator("button[value=approve]").click()
    expect(page.locator("body")).to_contain_text("Refused")
    assert world.app.store.approval(task).state == "pending"

    post = page.context.request.post
    assert post(f"{world.base}/console/audit/verify", form={}).status == 403
    wrong = {"csrf": "guess", "verdict": "approve", "reason": "ok"}
    assert post(f"{world.base}/console/approvals/{task}", form=wrong).status == 403
    assert world.app.store.approval(task).state == "pending"
    # The login form has its own: a cross-site login is refused too.
    fresh = page.context.browser.new_context()
    response = fresh.request.post(
        f"{world.base}/console/login", form={"token": world.tokens[Role.ADMIN]}
    )
    assert response.status == 403
    fresh.close()


def test_sign_out_and_a_revoked_token_end_the_session(page: Any, world: World) -> None:
    from playwright.sync_api import expect

    sign_in(page, world, Role.OPERATOR)
    page.click("button:has-text('Sign out')")
    expect(page).to_have_url(f"{world.base}/console/login")
    page.goto(f"{world.base}/console/pools")
    expect(page).to_have_url(f"{world.base}/console/login")

    sign_in(page, world, Role.OPERATOR)
    world.app.gate.revoke_token(ROOT, "t-operator")
    page.goto(f"{world.base}/console/approvals")
    expect(page).to_have_url(f"{world.base}/console/login")


def test_the_drift_fallback_is_shown_on_every_page_and_an_operator_clears_it(
    page: Any, world: World
) -> None:
    from playwright.sync_api import expect

    world.app.store.engage_fallback(
        "duration_error:job", "duration error of kind job rose", "v1", {"detector": "ADWIN"}
    )
    banner = page.locator("section.drift")
    sign_in(page, world, Role.VIEWER)
    for where in ("/console/", "/console/approvals", "/console/pools"):
        page.goto(f"{world.base}{where}")
        expect(banner).to_contain_text("Drift fallback engaged")
        expect(banner).to_contain_text("duration_error:job")
    expect(banner.locator("form")).to_have_count(0)  # a viewer may not clear it

    page.click("button:has-text('Sign out')")
    sign_in(page, world, Role.OPERATOR)
    page.goto(f"{world.base}/console/pools")
    banner.locator("input[name=reason]").fill("new disks; durations back to normal")
    banner.locator("button[type=submit]").click()
    expect(flash(page, "ok")).to_contain_text("drift fallback cleared")
    expect(page).to_have_url(f"{world.base}/console/pools")
    expect(banner).to_have_count(0)
    assert world.app.store.fallback() is None
    (cleared,) = world.app.store.audit_records(actions=["drift.cleared"])
    assert cleared.actor == "t-operator"
    assert cleared.details["reason"] == "new disks; durations back to normal"
