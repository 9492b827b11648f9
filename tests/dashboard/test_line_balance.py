"""The overview's class balance per model line (``?line=``), on SQLite and Postgres: the
card, the chart and the status poll count exactly what GET /v1/balance?line= counts; no
parameter is every event, as before; junk or unknown lines are 4xx naming ``line``."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete

from service.lines import put_line
from service.models import model_lines, reference_snapshots
from tests.dashboard.conftest import login
from tests.service.helpers import event

NOW = datetime.now(UTC)


def _post(client: Any, env: Any, events: list[dict[str, Any]]) -> None:
    r = client.post("/v1/feedback/batch", json={"events": events}, headers=env.headers("ingest"))
    assert r.status_code == 207 and r.json()["accepted"] == len(events), r.text


def _only_lines(env: Any, **scopes: str) -> dict[str, str]:
    """Exactly these lines (key -> scope), under fresh names; the dashboard's wipe leaves
    the lines other tests made, so drop them (their jobs and checkpoints are gone already)."""
    names = {k: f"l{secrets.token_hex(3)}" for k in scopes}
    with env.app.state.engine.begin() as conn:
        conn.execute(delete(reference_snapshots))
        conn.execute(delete(model_lines))
        for key, scope in scopes.items():
            put_line(conn, names[key], "toy-base-model", scope)
    return names


def _seed(client: Any, env: Any, names: dict[str, str]) -> None:
    """Line `s` (served) served 3 up + 1 down today and 1 down 3 days ago; line `a` (all)
    served 2 down; a client's own version string has 1 up."""
    d3 = (NOW - timedelta(days=3)).isoformat()
    _post(client, env, [
        *(event(label="up", model_version=f"{names['s']}-base") for _ in range(3)),
        event(label="down", model_version=f"{names['s']}-base"),
        event(label="down", model_version=f"{names['s']}-base", occurred_at=d3),
        *(event(label="down", model_version=f"{names['a']}-base") for _ in range(2)),
        event(label="up", model_version="client-v7"),
    ])


def _field(html: str, name: str) -> str:
    m = re.search(rf'data-field="{re.escape(name)}"[^>]*>([^<]*)<', html)
    assert m, f"no {name} on the page"
    return m.group(1)


@pytest.mark.parametrize("key, expect", [("s", (3, 2)), ("a", (4, 4)), (None, (4, 4))])
def test_each_line_shows_its_own_scope_as_v1_balance_does(dash_client, dash_env, key, expect):
    names = _only_lines(dash_env, s="served", a="all")
    _seed(dash_client, dash_env, names)
    login(dash_client, dash_env.keys["read"])
    line = names[key] if key else None
    params = {"line": line} if line else {}
    v1 = dash_client.get("/v1/balance", params=params, headers=dash_env.headers("read"))
    assert v1.status_code == 200, v1.text
    assert (v1.json()["n_desirable"], v1.json()["n_undesirable"]) == expect

    body = dash_client.get("/dashboard/api/balance", params=params).json()
    assert body["balance"] == v1.json()  # the same answer: counts, λD/λU, line, scope
    c = body["counts"]
    assert (sum(c["desirable"]), sum(c["undesirable"])) == expect  # all within 30 days
    daily = dash_client.get("/v1/balance/daily", params=params,
                            headers=dash_env.headers("read")).json()["days"]
    assert sum(d["n_undesirable"] for d in daily) == expect[1]
    hourly = dash_client.get("/dashboard/api/balance", params={**params, "bucket": "hour"})
    assert hourly.json()["balance"] == v1.json()
    status = dash_client.get("/dashboard/api/status", params=params).json()
    assert status["balance"] == v1.json()  # the page's poll keeps the line

    page = dash_client.get("/dashboard", params=params)
    assert page.status_code == 200, page.text
    assert _field(page.text, "balance.n_desirable") == str(expect[0])
    assert _field(page.text, "balance.n_undesirable") == str(expect[1])
    assert _field(page.text, "balance.lambda_u") == f"{v1.json()['lambda_u']:.3f}"
    assert f'data-line="{line or ""}"' in page.text
    if line:
        assert f"/dashboard/api/balance?bucket=day&amp;line={line}" in page.text
        assert f"/dashboard?line={line}&amp;bucket=hour" in page.text  # switching keeps it
        scope = "only the versions it served" if key == "s" else "every event"
        assert scope in page.text
    else:
        assert 'data-url="/dashboard/api/balance?bucket=day"' in page.text  # as before
        assert "All stored feedback" in page.text


def test_selector_lists_the_lines_only_when_there_are_several(dash_client, dash_env):
    names = _only_lines(dash_env, s="served")
    login(dash_client, dash_env.keys["read"])
    page = dash_client.get("/dashboard").text
    assert 'id="line-selector"' not in page
    _only_lines(dash_env)  # none at all
    assert 'id="line-selector"' not in dash_client.get("/dashboard").text

    names = _only_lines(dash_env, s="served", a="all")
    page = dash_client.get("/dashboard", params={"line": names["a"], "bucket": "hour"}).text
    nav = page[page.index('id="line-selector"'):]
    nav = nav[:nav.index("</nav>")]
    assert '<a href="/dashboard?bucket=hour" >all feedback</a>' in nav
    for key, scope in (("s", "served"), ("a", "all")):
        assert f'href="/dashboard?line={names[key]}&amp;bucket=hour"' in nav
        assert f"line {names[key]} <span class=\"muted\">({scope})</span>" in nav
    current = re.findall(r'<a href="[^"]*" data-line="([^"]+)" aria-current="page"', nav)
    assert current == [names["a"]]


@pytest.mark.parametrize("value", ["Bad Name", "x" * 65, "ok\x00x", "-lead", "", "é", "a\n"])
def test_bad_line_values_are_422_naming_line(dash_client, dash_env, value):
    login(dash_client, dash_env.keys["read"])
    for url in ("/dashboard/api/balance", "/dashboard/api/status"):
        r = dash_client.get(url, params={"line": value})
        assert r.status_code == 422, (url, r.text)
        assert r.json()["errors"][0]["field"] == "line"
    page = dash_client.get("/dashboard", params={"line": value})
    assert page.status_code == 422 and "line: must match" in page.text
    assert "\x00" not in page.text


def test_unknown_line_is_404_naming_line(dash_client, dash_env):
    _only_lines(dash_env, s="served", a="all")
    login(dash_client, dash_env.keys["read"])
    for url in ("/dashboard/api/balance", "/dashboard/api/status"):
        r = dash_client.get(url, params={"line": "no-such-line"})
        assert r.status_code == 404 and r.json()["errors"][0]["field"] == "line", r.text
    page = dash_client.get("/dashboard", params={"line": "no-such-line"})
    assert page.status_code == 404 and "No such line" in page.text
    assert "line: no model line named &#39;no-such-line&#39;" in page.text
    # the default line, with no PROSPECT_BASE_MODEL: 409 naming line, not a 500
    page = dash_client.get("/dashboard", params={"line": "default"})
    assert page.status_code == 409 and "line: the default line has no base model" in page.text
