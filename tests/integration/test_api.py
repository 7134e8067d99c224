"""The analyst's HTTP API (`casestream api`) over real sockets, on projected data."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import orjson
import pytest

from streams.config import PROJECT_ROOT
from streams.engines import free_port

pytestmark = pytest.mark.integration
API_LOGS: dict[str, Path] = {}  # base URL -> the API process's log


@pytest.fixture(scope="module")
def api(stack, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("api") / "api.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "api", "--port", str(port)], env=stack.env,
                            cwd=str(PROJECT_ROOT), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    API_LOGS[base] = log_path
    stack.poll(lambda: get(base, "/health"), lambda r: r[0] == 200, what="the API to answer")
    yield base
    proc.terminate()
    proc.wait(20)


def get(base: str, path: str, **params):
    url = base + path + ("?" + urllib.parse.urlencode(params, doseq=True) if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


@pytest.fixture(scope="module")
def seeded(stack, api):
    """Five on-call pages with known times, severities and outcomes, all tagged with the run id."""
    import uuid

    run = uuid.uuid4().hex[:8]
    tag = f"run:{run}"
    msgs = []
    spec = [  # key, severity, ack after s, resolve after s
        ("a", "critical", 60, 600), ("b", "critical", 120, None), ("c", "warning", None, 300),
        ("d", "warning", 30, 90), ("e", "info", None, None)]
    from datetime import datetime, timedelta, timezone

    base = datetime(2031, 3, 1, 10, 0, tzinfo=timezone.utc)  # a day no other test uses

    def at(seconds: int) -> str:
        return (base + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")

    for i, (k, sev, ack, res) in enumerate(spec):
        key, t0 = f"{run}/{k}", i * 60
        msgs.append({"event_id": f"{run}-{k}-t", "action": "trigger", "dedup_key": key, "severity": sev,
                     "summary": f"disk {k} full on host-{i}", "tags": [tag, f"host:{i}"], "timestamp": at(t0)})
        if ack is not None:
            msgs.append({"event_id": f"{run}-{k}-a", "action": "acknowledge", "dedup_key": key,
                         "timestamp": at(t0 + ack)})
        if res is not None:
            msgs.append({"event_id": f"{run}-{k}-r", "action": "resolve", "dedup_key": key,
                         "timestamp": at(t0 + res)})
    stack.send("on-call", msgs)
    found = stack.poll(lambda: get(api, "/v1/on-call/cases", tag=tag, size=50)[1],
                       lambda r: r.get("total") == 5 and sum(c["status"] == "RESOLVED" for c in r["cases"]) == 3
                       and sum(c["status"] == "ACKNOWLEDGED" for c in r["cases"]) == 1,
                       what="five searchable pages")
    versions = {c["case_id"]: c["version"] for c in found["cases"]}
    # the PostgreSQL projection is a separate agent: wait for it too
    stack.poll(lambda: stack.pg("on-call", "SELECT case_id, version FROM case_states WHERE case_id = ANY($1::text[])",
                                sorted(versions)),
               lambda rows: {r["case_id"]: r["version"] for r in rows} == versions, what="the PostgreSQL projection")
    return {"run": run, "tag": tag}


def test_search_filters_facets_and_full_text(api, seeded):
    tag = seeded["tag"]
    status, r = get(api, "/v1/on-call/cases", tag=tag, facets="status,severity")
    assert status == 200 and r["total"] == 5
    facets = {f: {v["value"]: v["count"] for v in vals} for f, vals in r["facets"].items()}
    assert facets["severity"] == {"critical": 2, "warning": 2, "info": 1}
    assert facets["status"] == {"RESOLVED": 3, "ACKNOWLEDGED": 1, "TRIGGERED": 1}
    _, crit = get(api, "/v1/on-call/cases", tag=tag, severity="critical")
    assert crit["total"] == 2 and {c["severity"] for c in crit["cases"]} == {"critical"}
    assert all("state" not in c for c in r["cases"] + crit["cases"])  # the document's stored state is left out
    _, text = get(api, "/v1/on-call/cases", tag=tag, q="host-3")
    assert [c["dedup_key"] for c in text["cases"]] == [f"{seeded['run']}/d"]
    _, both = get(api, "/v1/on-call/cases", tag=tag, status="TRIGGERED,ACKNOWLEDGED")
    assert both["total"] == 2


def test_pagination_walks_every_case_once_in_sort_order(api, seeded):
    seen, cursor = [], None
    for _ in range(10):
        params = {"tag": seeded["tag"], "size": 2, "sort": "created_at"}
        if cursor:
            params["cursor"] = cursor
        status, page = get(api, "/v1/on-call/cases", **params)
        assert status == 200
        seen += page["cases"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == 5 and len({c["case_id"] for c in seen}) == 5
    assert [c["created_at"] for c in seen] == sorted(c["created_at"] for c in seen)


def test_case_and_timeline(api, seeded):
    _, r = get(api, "/v1/on-call/cases", tag=seeded["tag"], q="host-0")
    case_id = r["cases"][0]["case_id"]
    status, case = get(api, f"/v1/on-call/cases/{case_id}")
    assert status == 200 and case["status"] == "RESOLVED" and case["version"] == 3
    status, tl = get(api, f"/v1/on-call/cases/{case_id}/timeline")
    assert status == 200 and [e["type"] for e in tl["events"]] == ["CaseCreated", "StatusChanged", "StatusChanged"]
    assert [e["version"] for e in tl["events"]] == [1, 2, 3]


def _pct(*values: float) -> dict:
    """What the API promises for these values: linear interpolation between the closest ranks
    (exact on every server for a bucket this small; see QueryService._add_percentiles)."""
    return {k: pytest.approx(v, rel=1e-9) for k, v in zip(("p50", "p90", "p95", "p99"), values)}


def test_analytics(stack, api, seeded):
    day = {"created_from": "2031-03-01T00:00:00Z", "created_to": "2031-03-02T00:00:00Z"}
    status, r = get(api, "/v1/on-call/analytics", metric="mtta", interval="day", group_by="severity", **day)
    assert status == 200 and r["metric"] == "mtta" and len(r["buckets"]) == 1
    bucket = r["buckets"][0]
    assert bucket["start"] == 1930089600000 and bucket["count"] == 3  # 2031-03-01; a, b, d were acknowledged
    assert bucket["mean_seconds"] == 70
    assert bucket["percentiles_seconds"] == _pct(60, 108, 114, 118.8)  # 30, 60, 120 s
    groups = {g["value"]: g for g in bucket["groups"]}
    assert (groups["critical"]["count"], groups["critical"]["mean_seconds"]) == (2, 90)
    assert groups["critical"]["percentiles_seconds"] == _pct(90, 114, 117, 119.4)  # 60, 120 s
    assert (groups["warning"]["count"], groups["warning"]["mean_seconds"]) == (1, 30)
    assert groups["warning"]["percentiles_seconds"] == _pct(30, 30, 30, 30)
    documented = orjson.loads((PROJECT_ROOT / "schemas" / "openapi.json").read_bytes())["components"]["schemas"]
    assert set(documented["Analytics"]["required"]) <= set(r)
    assert set(bucket["percentiles_seconds"]) == set(documented["Percentiles"]["properties"])
    status, r = get(api, "/v1/on-call/analytics", metric="mttr", interval="hour", **day)
    assert status == 200 and [(b["count"], b["mean_seconds"]) for b in r["buckets"]] == [(3, 330)]
    assert r["buckets"][0]["percentiles_seconds"] == _pct(300, 540, 570, 594)  # 90, 300, 600 s
    status, counts = get(api, "/v1/on-call/analytics", metric="count", interval="hour", **day)
    assert status == 200 and [b["count"] for b in counts["buckets"]] == [5]
    assert "percentiles_seconds" not in counts["buckets"][0]
    # the server's own aggregation where it has one; the values read only where it answers that it has not
    probe = stack.es("POST", f"/{stack.index('on-call')}/_search",
                     {"size": 0, "aggs": {"p": {"percentiles": {"field": "time_to_resolve_seconds"}}}})
    server_has_it = "aggregations" in probe
    assert server_has_it or probe.get("_status") == 400, probe
    with urllib.request.urlopen(api + "/metrics", timeout=10) as m:
        metrics = m.read().decode()
    used = {src: sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                     if line.startswith("casestream_analytics_percentiles_total{") and 'tenant="on-call"' in line
                     and f'source="{src}"' in line) for src in ("aggregation", "values")}
    assert used == ({"aggregation": 2, "values": 0} if server_has_it else {"aggregation": 0, "values": 2}), used
    refused = "no percentiles aggregation" in API_LOGS[api].read_text(errors="replace")
    assert refused is not server_has_it, f"server has percentiles: {server_has_it}; the API was refused: {refused}"


def test_errors_name_the_parameter(api, seeded):
    status, r = get(api, "/v1/nope/cases")
    assert status == 400 and r["parameter"] == "tenant" and "on-call" in r["message"]
    status, r = get(api, "/v1/on-call/cases", sort="colour")
    assert status == 400 and r["parameter"] == "sort"
    status, r = get(api, "/v1/on-call/cases", cursor="!!!not-a-cursor")
    assert status == 400 and r["parameter"] == "cursor"
    status, r = get(api, "/v1/on-call/cases", size="0")
    assert status == 400 and r["parameter"] == "size"
    status, r = get(api, "/v1/on-call/cases", colour="red")
    assert status == 400 and r["parameter"] == "colour"
    status, r = get(api, "/v1/on-call/analytics", metric="p99")
    assert status == 400 and r["parameter"] == "metric"
    status, r = get(api, "/v1/on-call/cases/PG-00000000000000000000-1")
    assert status == 404 and r["error"] == "not_found"


def test_one_tenant_never_sees_the_other(api, seeded):
    status, r = get(api, "/v1/case-management/cases", tag=seeded["tag"])
    assert status == 200 and r["total"] == 0
    _, oc = get(api, "/v1/on-call/cases", tag=seeded["tag"])
    status, r = get(api, f"/v1/case-management/cases/{oc['cases'][0]['case_id']}")
    assert status == 404


def test_replay_equals_the_live_projection(stack, api, seeded):
    """Rebuild both projections from the log: field for field what the live sinks made."""
    tag = seeded["tag"]
    _, before = get(api, "/v1/on-call/cases", tag=tag, size=50, sort="created_at")
    ids = sorted(c["case_id"] for c in before["cases"])
    pg_before = stack.pg("on-call", "SELECT * FROM cases WHERE case_id = ANY($1::text[]) ORDER BY case_id", ids)
    tl_before = stack.pg("on-call", "SELECT * FROM timeline WHERE case_id = ANY($1::text[]) "
                                    "ORDER BY case_id, version", ids)
    old_alias = stack.es("GET", f"/_alias/{stack.index('on-call')}")
    out = subprocess.run([sys.executable, "-m", "streams.cli", "replay", "--tenant", "on-call", "--sink", "all",
                          "--from-beginning", "--json"], capture_output=True, env=stack.env, cwd=str(PROJECT_ROOT),
                         timeout=300)
    assert out.returncode == 0, out.stderr
    results = {r["sink"]: r for r in orjson.loads(out.stdout)}
    assert results["elasticsearch"]["events"] > 0 and results["postgres"]["events"] > 0
    new_alias = stack.es("GET", f"/_alias/{stack.index('on-call')}")
    assert set(new_alias) != set(old_alias)  # a fresh index behind the alias
    _, after = get(api, "/v1/on-call/cases", tag=tag, size=50, sort="created_at")
    assert sorted(after["cases"], key=lambda c: c["case_id"]) == sorted(before["cases"], key=lambda c: c["case_id"])
    assert stack.pg("on-call", "SELECT * FROM cases WHERE case_id = ANY($1::text[]) ORDER BY case_id", ids) \
        == pg_before
    assert stack.pg("on-call", "SELECT * FROM timeline WHERE case_id = ANY($1::text[]) "
                               "ORDER BY case_id, version", ids) == tl_before
