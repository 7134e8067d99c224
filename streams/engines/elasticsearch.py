"""Elasticsearch: the official single-node test distribution from Maven Central.

``org.elasticsearch.distribution.integ-test-zip:elasticsearch`` is the real
server with transport and x-pack core/security, and no painless,
analysis-common or reindex modules (casestream needs none of them). The zip
is unpacked once into the cache; each data directory gets its own config,
data and logs. Security off, heap capped, loopback only, disk watermarks
off (a nearly full development disk must not turn indices read-only).
Elasticsearch refuses to run as root: as root it runs as the unprivileged
``CASESTREAM_SERVICE_USER`` (default ``nobody``).
"""

from __future__ import annotations

import os
import shutil
import zipfile

import orjson

from streams.engines.base import HOST, Engine, base_env, http_json
from streams.engines.cache import cache_dir, find_java, maven_fetch
from streams.engines.process import EngineError

ES_VERSION = "8.19.21"
HEAP = os.environ.get("CASESTREAM_ES_HEAP", "512m")


class Elasticsearch(Engine):
    name = "elasticsearch"
    label = "Elasticsearch"
    services = ("elasticsearch",)
    port_names = ("elasticsearch", "transport")
    start_timeout = 180.0
    needs_unprivileged = True

    @classmethod
    def default_version(cls) -> str:
        return os.environ.get("CASESTREAM_ELASTICSEARCH_VERSION", ES_VERSION)

    @property
    def dist(self):
        return cache_dir() / f"elasticsearch-{self.version}"

    def install(self) -> None:
        if (self.dist / ".complete").exists():
            return
        zips = maven_fetch("elasticsearch.pom.xml", cache_dir() / f"elasticsearch-{self.version}-zip",
                           f"Elasticsearch {self.version} (test distribution)",
                           {"elasticsearch.version": self.version})
        found = sorted(zips.glob("*.zip"))
        if not found:
            raise EngineError(f"no Elasticsearch zip in {zips}; delete that directory and retry")
        partial = self.dist.with_name(self.dist.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(found[0]) as z:
            for info in z.infolist():
                parts = info.filename.split("/", 1)  # strip the top directory elasticsearch-<v>/
                if len(parts) < 2 or not parts[1]:
                    continue
                target = partial / parts[1]
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                mode = (info.external_attr >> 16) & 0o777
                os.chmod(target, mode or 0o644)
        for d in [partial, *(p for p in partial.rglob("*") if p.is_dir())]:
            os.chmod(d, 0o755)
        (partial / ".complete").write_text("unpacked\n")
        shutil.rmtree(self.dist, ignore_errors=True)
        partial.rename(self.dist)

    def settings(self) -> str:
        return "\n".join([
            "# written by casestream (streams/engines/elasticsearch.py) at every start",
            "cluster.name: casestream",
            "node.name: casestream-1",
            "discovery.type: single-node",
            f"network.host: {HOST}",
            f"http.port: {self.ports['elasticsearch']}",
            f"transport.port: {self.ports['transport']}",
            f"path.data: {self.home / 'data'}",
            f"path.logs: {self.home / 'logs'}",
            "xpack.security.enabled: false",
            "cluster.routing.allocation.disk.threshold_enabled: false",
            "action.destructive_requires_name: false",
            "",
        ])

    def prepare(self) -> None:
        config = self.home / "config"
        for d in ("data", "logs", "tmp"):
            (self.home / d).mkdir(parents=True, exist_ok=True)
        if not config.exists():
            shutil.copytree(self.dist / "config", config)
        (config / "elasticsearch.yml").write_text(self.settings())
        user = self.user
        if user is not None:
            if not user.can_read(self.dist / "bin" / "elasticsearch"):
                raise EngineError(f"Elasticsearch runs as '{user.name}' (it refuses root), who cannot read "
                                  f"{self.dist}; set CASESTREAM_CACHE_DIR to a directory that account can read")
            user.own(self.home)
            if not user.can_write(self.home / "data"):
                raise EngineError(f"Elasticsearch runs as '{user.name}' (it refuses root), who cannot reach "
                                  f"{self.home}; set CASESTREAM_DATA_DIR to a directory outside /root "
                                  f"(e.g. /var/tmp/casestream)")

    def command(self):
        java_home = _java_home()
        env = base_env()
        env.update(ES_JAVA_HOME=str(java_home), ES_PATH_CONF=str(self.home / "config"),
                   ES_TMPDIR=str(self.home / "tmp"), ES_JAVA_OPTS=f"-Xms{HEAP} -Xmx{HEAP}")
        env.pop("JAVA_HOME", None)
        return [str(self.dist / "bin" / "elasticsearch")], env

    def address(self, service: str) -> str:
        return f"http://{HOST}:{self.ports['elasticsearch']}"

    def ready(self) -> bool:
        status, body = http_json(f"{self.address('elasticsearch')}/_cluster/health?wait_for_status=yellow&timeout=1s")
        if status != 200:
            return False
        try:
            return orjson.loads(body).get("status") in ("green", "yellow")
        except orjson.JSONDecodeError:
            return False


def _java_home():
    """Elasticsearch 8 runs on 17 to 24; 9 needs 21 or newer."""
    major = int(Elasticsearch.default_version().split(".")[0])
    try:
        home, _ = find_java(21 if major >= 9 else 17, None if major >= 9 else 24)
    except EngineError:
        home, _ = find_java(21 if major >= 9 else 17)
    return home
