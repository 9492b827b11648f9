"""End to end in a real headless chromium against a real uvicorn server.

Seeded data: feedback posted through the API (so ingestion, the latest-vote rule and the
charts all see the same rows), a running job and a failed job written as a worker would,
with per-step metrics. Each page's screenshot goes to var/test-artifacts/dashboard/.
Every page is watched for console errors, failed requests and CSP violations (the pages'
CSP forbids eval, so waits use selectors, not wait_for_function strings).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from service.balance import compute_weights
from tests.dashboard.conftest import (
    ARTIFACTS,
    LiveServer,
    metric_row,
    seed_checkpoint,
    seed_job,
    seed_metrics,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.slow

TODAY = datetime.now(UTC).replace(hour=10, minute=0, second=0, microsecond=0)
if TODAY > datetime.now(UTC):  # before 10:00 UTC: keep occurred_at in the past
    TODAY = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
TWO_DAYS_AGO = TODAY - timedelta(days=2)
OLD = TODAY - timedelta(days=40)  # outside the 30-day chart, inside the balance
#: Votes on the production checkpoint, sent now (they count today too).
LIVE_UP, LIVE_DOWN = 7, 3


def _events() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    n = 0

    def add(day: datetime, up: bool, count: int, **extra: Any) -> None:
        nonlocal n
        for _ in range(count):
            n += 1
            out.append({"event_id": f"e2e-{n}", "prompt": f"secret prompt {n}",
                        "completion": f"answer {n}", "label": "up" if up else "down",
                        "model_version": "m-1", "user_id": f"user-{n % 4}@example.com",
                        "occurred_at": day.isoformat(), **extra})

    add(TODAY, True, 7)
    add(TODAY, False, 3)
    add(TWO_DAYS_AGO, True, 2)
    add(TWO_DAYS_AGO, False, 5)
    add(OLD, True, 4)
    # A vote changed later: e2e-replaced (up) is superseded by a down vote on TODAY, so
    # TODAY counts 7 up + 4 down in the chart and nothing for the replaced one.
    out.append({"event_id": "e2e-replaced", "prompt": "p", "completion": "c", "label": "up",
                "model_version": "m-1", "occurred_at": TODAY.isoformat()})
    out.append({"event_id": "e2e-replacement", "prompt": "p", "completion": "c",
                "label": "down", "model_version": "m-1", "occurred_at": TODAY.isoformat(),
                "replaces": "e2e-replaced"})
    return out


class Site:
    """The server, its keys, seeded ids, and a console-error watcher per page."""

    def __init__(self, server: LiveServer, keys: dict[str, str], env: Any) -> None:
        self.server = server
        self.url = server.url
        self.keys = keys
        self.env = env
        self.running_job = 0
        self.failed_job = 0
        self.production = (0, "")
        self.candidate = (0, "")
        self.problems: list[str] = []

    def page(self, browser: Any) -> Any:
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        page.set_default_timeout(15_000)
        page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: self.problems.append(f"pageerror: {e}"))
        # ERR_ABORTED: a poll in flight when the test navigates away; not a fault.
        page.on("requestfailed", lambda r: self.problems.append(
            f"requestfailed: {r.url} {r.failure}") if "ERR_ABORTED" not in (r.failure or "")
            else None)
        page.on("response", lambda r: self.problems.append(f"http {r.status}: {r.url}")
                if r.status >= 500 else None)
        return page

    def login(self, page: Any, scope: str = "read", path: str = "/dashboard") -> None:
        page.goto(self.url + path)
        page.fill("#key", self.keys[scope])
        page.click("button[type=submit]")
        page.wait_for_load_state("load")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    from service import migrate
    from service.settings import Settings
    from tests.conftest import make_env

    d = tmp_path_factory.mktemp("e2e")
    url = f"sqlite:///{d / 'prospect.db'}"
    migrate.upgrade(Settings(database_url=url))
    env = make_env("sqlite", url)
    server = start_server({
        "PROSPECT_DATABASE_URL": url,
        "PROSPECT_USER_ID_KEY": env.settings.user_id_key,
        "PROSPECT_BROKER_URL": f"sqla+sqlite:///{d / 'broker.db'}",
        "PROSPECT_DASHBOARD_POLL_INTERVAL_S": "0.5",
        "PROSPECT_KEY_CACHE_TTL_S": "0",
        "PROSPECT_LOG_FORMAT": "json",
    }, d / "server.log")
    try:
        s = Site(server, env.keys, env)
        r = httpx.post(server.url + "/v1/feedback/batch", json={"events": _events()},
                       headers=env.headers("ingest"), timeout=30)
        assert r.status_code == 207 and r.json()["accepted"] == len(_events()), r.text
        engine = env.app.state.engine
        s.running_job = seed_job(engine, status="running", step=40, total_steps=100)
        seed_metrics(engine, s.running_job, range(1, 41))
        s.failed_job = seed_job(engine, status="failed", step=3, total_steps=10,
                                line="other", error="RuntimeError: CUDA out of memory",
                                finished_at=datetime.now(UTC))
        seed_metrics(engine, s.failed_job, range(1, 4))
        s.production = seed_checkpoint(engine, stage="production")
        s.candidate = seed_checkpoint(engine, stage="candidate")
        votes = [{"event_id": f"live-{i}", "prompt": "p", "completion": f"c{i}",
                  "label": "up" if i < LIVE_UP else "down", "model_version": s.production[1],
                  "user_id": f"u{i}"} for i in range(LIVE_UP + LIVE_DOWN)]
        r = httpx.post(server.url + "/v1/feedback/batch", json={"events": votes},
                       headers=env.headers("ingest"), timeout=30)
        assert r.status_code == 207, r.text
        yield s
    finally:
        stop_server(server)
        log = server.log_tail(200_000)
        # The server's own log must never carry the seeded prompts, user ids or keys.
        for secret in ("secret prompt", "user-1@example.com", *env.keys.values()):
            assert secret not in log, f"{secret!r} leaked into the server log"


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _expected_days() -> tuple[list[int], list[int], list[int]]:
    """The 30-day daily axis as the server builds it, with the seeded counts."""
    now = datetime.now(UTC)
    start = (now - timedelta(days=30)).replace(hour=0, minute=0, second=0, microsecond=0)
    t = list(range(int(start.timestamp()), int(now.timestamp()), 86400))
    counts = {int(TODAY.replace(hour=0, minute=0, second=0).timestamp()): (7 + LIVE_UP, 4 + LIVE_DOWN),
              int(TWO_DAYS_AGO.replace(hour=0, minute=0, second=0).timestamp()): (2, 5)}
    return t, [counts.get(x, (0, 0))[0] for x in t], [counts.get(x, (0, 0))[1] for x in t]


def test_logged_out_visitor_is_sent_to_login(site: Site, browser: Any) -> None:
    page = site.page(browser)
    page.goto(f"{site.url}/dashboard/jobs/{site.running_job}")
    assert page.url.startswith(f"{site.url}/dashboard/login?next=")
    assert f"%2Fdashboard%2Fjobs%2F{site.running_job}" in page.url or \
        f"/dashboard/jobs/{site.running_job}" in page.url
    assert page.locator("input#key[type=password]").is_visible()
    assert page.locator("form[method=post][action='/dashboard/login']").count() == 1
    _shot(page, "login")
    assert not site.problems, site.problems
    # A wrong key: an error naming the field, still on the login page, no session.
    page.fill("#key", "prospect_not-a-real-key-0000000000000000")
    page.click("button[type=submit]")
    assert "key: unknown, revoked or expired" in page.inner_text("#login-error")
    assert not [c for c in page.context.cookies() if c["name"] == "prospect_session"]
    # The JSON endpoints answer 401 to a logged-out browser.
    status = page.evaluate("fetch('/dashboard/api/status').then(r => r.status)")
    assert status == 401
    page.context.close()
    # Only the two 401s this test asked for (the refused login page and the fetch).
    assert site.problems == ["console error: Failed to load resource: the server responded "
                             "with a status of 401 (Unauthorized)"] * 2, site.problems
    site.problems.clear()


def test_overview_draws_the_seeded_balance(site: Site, browser: Any) -> None:
    page = site.page(browser)
    site.login(page, "read")
    assert page.url == f"{site.url}/dashboard"
    # The session cookie: HTTP-only, SameSite, Secure (localhost counts as secure), and
    # the key appears in no URL the browser visited.
    [cookie] = [c for c in page.context.cookies() if c["name"] == "prospect_session"]
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Lax"
    assert cookie["path"] == "/dashboard"
    assert "prospect_session" not in page.evaluate("document.cookie")

    page.wait_for_selector("#balance-chart[data-ready='1']")
    page.wait_for_selector("#ingestion-chart[data-ready='1']")
    data = page.evaluate("window.prospectCharts['balance-chart'].plot.data")
    t, up, down = _expected_days()
    assert data[0] == t
    assert data[1] == up and data[2] == down
    assert sum(data[1]) == 9 + LIVE_UP and sum(data[2]) == 9 + LIVE_DOWN
    # uPlot drew it: the canvas has pixels in the desirable and undesirable colours.
    colours = page.evaluate("""() => {
        const c = document.querySelector('#balance-chart canvas');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let green = 0, red = 0;
        for (let i = 0; i < px.length; i += 4) {
            if (px[i] === 0x1a && px[i+1] === 0x7f && px[i+2] === 0x37) green++;
            if (px[i] === 0xcf && px[i+1] === 0x22 && px[i+2] === 0x2e) red++;
        }
        return {green, red};
    }""")
    assert colours["green"] > 50 and colours["red"] > 50, colours

    # The balance card: all stored feedback, latest vote each: nD = 7+2+4+7, nU = 4+5+3.
    n_d, n_u = 13 + LIVE_UP, 9 + LIVE_DOWN
    weights = compute_weights(n_d, n_u, 1.0, 1)
    assert page.inner_text("[data-field='balance.n_desirable']") == str(n_d)
    assert page.inner_text("[data-field='balance.n_undesirable']") == str(n_u)
    assert page.inner_text("[data-field='balance.lambda_d']") == f"{weights.lambda_d:.3f}"
    assert page.inner_text("[data-field='balance.lambda_u']") == f"{weights.lambda_u:.3f}"
    assert page.get_attribute("#training-allowed", "data-allowed") == "true"
    # Ingestion: every stored row arrived within this hour.
    ingest = page.evaluate("window.prospectCharts['ingestion-chart'].plot.data")
    stored = len(_events()) + LIVE_UP + LIVE_DOWN
    assert ingest[1][-1] == stored or sum(ingest[1][-2:]) == stored
    # The running job with its progress bar, and the checkpoint card.
    row = page.locator(f"#active-jobs [data-job-id='{site.running_job}']")
    assert row.locator("progress").get_attribute("value") == "40"
    assert row.locator("progress").get_attribute("max") == "100"
    assert page.locator("#card-rollout").is_visible()
    # The status refresh replaced the server-rendered values without breaking them.
    expect(page.locator("#updated")).to_contain_text("Updated")
    assert page.inner_text("[data-field='balance.n_desirable']") == str(n_d)
    _shot(page, "overview")
    page.context.close()
    assert not site.problems, site.problems


def test_job_page_plots_live_curves(site: Site, browser: Any) -> None:
    page = site.page(browser)
    site.login(page, "read", "/dashboard/jobs?status=running")
    assert page.url.endswith("/dashboard/jobs?status=running")
    assert page.locator("#jobs-table tbody tr").count() == 1
    _shot(page, "jobs")
    page.click(f"#jobs-table a[href='/dashboard/jobs/{site.running_job}']")
    page.wait_for_selector("#chart-loss[data-points='40']")
    loss = page.evaluate("window.prospectCharts['chart-loss'].plot.data")
    assert loss[0] == list(range(1, 41))
    assert loss[1] == pytest.approx([metric_row(s)["loss"] for s in range(1, 41)])
    rewards = page.evaluate("window.prospectCharts['chart-rewards'].plot.data")
    assert rewards[3] == pytest.approx([metric_row(s)["rewards/margins"] for s in range(1, 41)])
    for chart in ("chart-kl", "chart-tokens", "chart-grad", "chart-lr"):
        assert page.get_attribute(f"#{chart}", "data-points") == "40"
    # A read key sees no cancel button.
    assert page.locator("#cancel-form").count() == 0
    _shot(page, "job")

    # The worker records more steps: the page picks them up by polling.
    from sqlalchemy import update

    from service.models import training_jobs

    engine = site.env.app.state.engine
    seed_metrics(engine, site.running_job, range(41, 46))
    with engine.begin() as conn:
        conn.execute(update(training_jobs).where(training_jobs.c.id == site.running_job)
                     .values(step=45))
    page.wait_for_selector("#chart-loss[data-points='45']")
    expect(page.locator("#job-progress progress")).to_have_attribute("value", "45")

    # The failed job shows its error.
    page.goto(f"{site.url}/dashboard/jobs/{site.failed_job}")
    assert "CUDA out of memory" in page.inner_text("#job-error")
    page.wait_for_selector("#chart-loss[data-points='3']")
    _shot(page, "job-failed")
    page.context.close()
    assert not site.problems, site.problems


def test_admin_cancels_a_job_and_logs_out(site: Site, browser: Any) -> None:
    page = site.page(browser)
    site.login(page, "admin", f"/dashboard/jobs/{site.running_job}")
    page.wait_for_selector("#chart-loss[data-ready='1']")
    page.click("#cancel-form button")
    page.wait_for_load_state("load")
    assert "notice=cancel_requested" in page.url
    assert "Cancellation requested" in page.inner_text(".notice")
    from sqlalchemy import select

    from service.models import training_jobs

    with site.env.app.state.engine.connect() as conn:
        assert conn.execute(select(training_jobs.c.cancel_requested).where(
            training_jobs.c.id == site.running_job)).scalar_one() is True

    # Checkpoints: production's live rate with its interval; start a 10 % canary.
    page.goto(f"{site.url}/dashboard/checkpoints")
    assert page.locator("h1").inner_text() == "Checkpoints and rollout"
    prod_row = page.locator("#live-comparison tr[data-arm='production']")
    expect(prod_row).to_contain_text(site.production[1])
    expect(prod_row).to_contain_text(f"{LIVE_UP} / {LIVE_UP + LIVE_DOWN}")
    assert prod_row.locator(".ci .band").count() == 1  # the interval bar was drawn
    form = page.locator(f"tr[data-checkpoint-id='{site.candidate[0]}'] form[data-action='canary']")
    form.locator("input[name=percent]").fill("10")
    form.locator("button").click()
    page.wait_for_load_state("load")
    assert "notice=canary_set" in page.url
    canary_row = page.locator("#live-comparison tr[data-arm='canary']")
    expect(canary_row).to_contain_text(site.candidate[1])
    expect(canary_row).to_contain_text("10.0 %")
    _shot(page, "checkpoints")

    page.click("header form.logout button")
    page.wait_for_load_state("load")
    assert page.url.startswith(f"{site.url}/dashboard/login")
    page.goto(f"{site.url}/dashboard")
    assert page.url.startswith(f"{site.url}/dashboard/login")
    page.context.close()
    assert not site.problems, site.problems
