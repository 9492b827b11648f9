"""No input makes a registry route answer 5xx: arbitrary JSON values and raw bytes."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=8)
fields = st.sampled_from(["stage", "percent", "reason", "line", "target", "user_id",
                          "dry_run", "extra"])
paths = st.sampled_from(["/v1/checkpoints/{id}/promote", "/v1/rollback", "/v1/serve",
                         "/v1/storage/cleanup"])


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(fields, json_values, max_size=4) | json_values, path=paths)
def test_no_json_body_causes_a_5xx(reg, body, path):
    cid = reg.candidate()["id"] if "{id}" in path else 0
    r = reg.client.post(path.replace("{id}", str(cid)), json=body, headers=reg.h())
    assert r.status_code < 500, r.text


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), path=paths,
       cid=st.integers() | st.text(string.ascii_letters + string.digits + "-_.~%", max_size=12))
def test_no_raw_body_or_path_causes_a_5xx(reg, raw, path, cid):
    r = reg.client.post(path.replace("{id}", str(cid)), content=raw,
                        headers={**reg.h(), "content-type": "application/json"})
    assert r.status_code < 500, r.text
    r = reg.client.get("/v1/checkpoints", params={"line": str(cid), "cursor": str(cid)},
                       headers=reg.h("read"))
    assert r.status_code < 500, r.text
