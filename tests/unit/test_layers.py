"""The layer rule of the house (README "Architecture"), checked on the source.

Every import counts, also those inside functions (a lazy import hides a
cycle from Python, not from this test):

* the pure domain (``streams.domain``) and the stateful stage
  (``streams.stage``) import no client library and nothing that does I/O;
* the agents import no command-line code (``streams.cli``, ``streams.demo``,
  ``streams.dlq``), and never each other except through ``agents.topology``;
* the project's modules import each other without cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("streams", "agents", "sinks", "schemas")
CLIENT_LIBS = {"faust", "aiokafka", "asyncpg", "elasticsearch", "aiohttp", "rocksdict", "prometheus_client",
               "mode", "socket", "requests", "subprocess", "asyncio", "urllib.request", "http.client"}
PURE = ("streams.domain", "streams.stage")
PURE_MAY_IMPORT = ("streams.domain", "streams.stage", "streams.config", "schemas")
CLI = ("streams.cli", "streams.demo", "streams.dlq")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _imports(name: str, path: Path) -> set[str]:
    """Everything ``name`` imports: project modules by their full name, other libraries by their top name."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in PACKAGES:
                while t not in MODULES and "." in t:
                    t = t.rsplit(".", 1)[0]
                out.add(t)
            else:
                out.add(t)
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _under(n, PURE)))
def test_the_domain_and_the_stage_do_no_io(name):
    wrong = sorted(t for t in GRAPH[name]
                   if t.split(".")[0] in CLIENT_LIBS or t in CLIENT_LIBS or (t in MODULES and not _under(t, PURE_MAY_IMPORT)))
    assert not wrong, f"{name} imports {wrong}: the pure layers take their inputs as values"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _under(n, ("agents",))))
def test_agents_import_no_cli_and_not_each_other(name):
    wrong = sorted(t for t in GRAPH[name]
                   if _under(t, CLI) or (_under(t, ("agents",)) and t not in ("agents", "agents.topology")))
    assert not wrong, f"{name} imports {wrong}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_checker_sees_a_cycle():
    # the test above can fail: a cycle through a lazy import is found
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert "streams.domain.case_state" in GRAPH["streams.domain.cases"]
    assert "agents.intake" in GRAPH["streams.app"] and "faust" in GRAPH["agents.topology"]
