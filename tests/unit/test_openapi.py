"""schemas/openapi.json describes exactly the routes the HTTP service serves (no servers needed:
building the aiohttp app connects to nothing)."""

from __future__ import annotations

import json
import re

import pytest

from streams.api import OPENAPI_FILE, create_api
from streams.settings import load_settings

DOC = json.loads(OPENAPI_FILE.read_text())


def served(routes: str) -> set[tuple[str, str]]:
    app = create_api(load_settings({}), routes)
    out = set()
    for r in app.router.routes():
        if r.method == "HEAD":
            continue
        path = r.resource.canonical
        out.add((r.method.lower(), path))
    return out


def documented() -> set[tuple[str, str]]:
    return {(m, p) for p, ops in DOC["paths"].items() for m in ops}


def test_every_route_is_documented_and_every_documented_route_is_served():
    assert served("all") == documented()


@pytest.mark.parametrize("routes,absent", [("intake", "/v1/{tenant}/cases"), ("query", "/v2/enqueue")])
def test_route_sets(routes, absent):
    paths = {p for _, p in served(routes)}
    assert absent not in paths
    assert {"/health", "/metrics", "/openapi.json"} <= paths


def test_path_parameters_are_declared():
    for path, ops in DOC["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        for op in ops.values():
            declared = set()
            for p in op.get("parameters", []):
                if "$ref" in p:
                    p = DOC["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]
                if p["in"] == "path":
                    declared.add(p["name"])
            assert declared == names, path


def test_every_reference_resolves():
    text = OPENAPI_FILE.read_text()
    for ref in set(re.findall(r'"\$ref": "#/components/(\w+)/(\w+)"', text)):
        assert ref[1] in DOC["components"][ref[0]], ref


def test_gateway_statuses_are_documented():
    """Every status the gateway answers (see streams/gateway.py) is in the document."""
    from streams.gateway import Gateway

    statuses = {"202", "400", "401", "403", "413", "429", "503"}
    for path in ("/v2/enqueue", "/v1/integrations/{key}/{kind}"):
        assert statuses <= set(DOC["paths"][path]["post"]["responses"]), path
    assert Gateway  # the pipeline whose answers these are


def test_the_readme_shows_the_datadog_template_the_gateway_reads():
    from streams.config import PROJECT_ROOT
    from streams.domain.monitors import DATADOG_TEMPLATE

    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split("**Datadog**", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(block) == DATADOG_TEMPLATE
