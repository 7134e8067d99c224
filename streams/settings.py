"""Settings from the environment. Nothing here assumes which engines answer:
the same code runs against the project's own (streams/engines), the servers
of docker-compose.yml, or any others."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from streams.config import PROJECT_ROOT

DEFAULT_TENANT = "case-management"


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap_servers: str
    elasticsearch_url: str
    postgres_dsn: str
    data_dir: Path
    tenants_file: Path
    topics_file: Path
    tenant_name: str
    stall_seconds: float = 60.0
    # Kafka consumer-group session timeout (CASESTREAM_SESSION_TIMEOUT, seconds): how long the group
    # coordinator waits for a silent member (crashed, stopped, partitioned) before it moves its
    # partitions. With static membership a restart within it keeps the partitions without a
    # rebalance; a dead member's partitions wait this long. Faust's default, 60 s; tests use a few.
    session_timeout: float = 60.0
    # a graceful stop (SIGTERM) that has not finished after this many seconds ends the process
    # anyway (CASESTREAM_SHUTDOWN_SECONDS; 0: wait for ever)
    shutdown_seconds: float = 30.0
    # memory of all the worker's RocksDB table stores together: read cache and memtables
    # (CASESTREAM_STATE_MEMORY_MB; streams/store.py)
    state_memory_mb: float = 128.0
    db_prefix: str = "casestream_"
    projections: tuple[str, ...] = ("postgres", "elasticsearch")
    index_prefix: str = ""
    oncall_dir: Path | None = None        # per-tenant on-call config: <dir>/<tenant>.yaml
    clock: str = "system"                 # "system", or "file:<path>" (tests: a file holding epoch ms)
    timer_tick: float = 0.5               # seconds between scans for due timers
    rate_per_integration: tuple[float, float] = (50.0, 500.0)   # gateway: events/s, burst
    rate_per_tenant: tuple[float, float] = (500.0, 5000.0)
    # failed authentications per client address (requests/s, burst), checked before a key is looked up
    rate_per_address: tuple[float, float] = (10.0, 100.0)
    # proxies (CIDRs) whose X-Forwarded-For names the client address (default: none, the peer is the client)
    trusted_proxies: tuple[str, ...] = ()
    # response_url prefixes the gateway may post Slack message updates to besides https://hooks.slack.com/
    # (tests: a local receiver)
    slack_response_prefixes: tuple[str, ...] = ()

    @property
    def heartbeat_interval(self) -> float:
        """Consumer heartbeats: a tenth of the session timeout, at most Faust's default 3 s
        (several heartbeats fit in a session even when one is late)."""
        return min(3.0, self.session_timeout / 10)

    @property
    def kafka_servers(self) -> list[str]:
        return [s.strip() for s in self.kafka_bootstrap_servers.split(",") if s.strip()]

    def store_dir(self, tenant: str) -> Path:
        """RocksDB stores of one tenant's worker (never shared between tenants)."""
        return self.data_dir / "stores" / tenant

    @property
    def services_dir(self) -> Path:
        return self.data_dir / "services"


def load_settings(env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    config_dir = Path(env.get("CASESTREAM_CONFIG_DIR", PROJECT_ROOT))
    return Settings(
        kafka_bootstrap_servers=env.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        elasticsearch_url=env.get("ELASTICSEARCH_URL", "http://127.0.0.1:9200"),
        postgres_dsn=env.get("POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"),
        data_dir=Path(env.get("CASESTREAM_DATA_DIR", "./.casestream")).expanduser().resolve(),
        tenants_file=Path(env.get("CASESTREAM_TENANTS_FILE", config_dir / "tenants.yaml")),
        topics_file=Path(env.get("CASESTREAM_TOPICS_FILE", config_dir / "topics.yaml")),
        tenant_name=env.get("TENANT_NAME") or DEFAULT_TENANT,
        stall_seconds=float(env.get("CASESTREAM_STALL_SECONDS", "60")),
        session_timeout=float(env.get("CASESTREAM_SESSION_TIMEOUT", "60")),
        shutdown_seconds=float(env.get("CASESTREAM_SHUTDOWN_SECONDS", "30")),
        state_memory_mb=float(env.get("CASESTREAM_STATE_MEMORY_MB", "128")),
        db_prefix=env.get("CASESTREAM_DB_PREFIX", "casestream_"),
        projections=tuple(p.strip() for p in env.get("CASESTREAM_PROJECTIONS", "postgres,elasticsearch").split(",")
                          if p.strip()),
        index_prefix=env.get("CASESTREAM_INDEX_PREFIX", ""),
        oncall_dir=Path(env.get("CASESTREAM_ONCALL_DIR", config_dir / "oncall")),
        clock=env.get("CASESTREAM_CLOCK", "system"),
        timer_tick=float(env.get("CASESTREAM_TIMER_TICK", "0.5")),
        rate_per_integration=_rate(env, "CASESTREAM_RATE_PER_INTEGRATION", "50/500"),
        rate_per_tenant=_rate(env, "CASESTREAM_RATE_PER_TENANT", "500/5000"),
        rate_per_address=_rate(env, "CASESTREAM_RATE_PER_ADDRESS", "10/100"),
        trusted_proxies=_networks(env, "CASESTREAM_TRUSTED_PROXIES"),
        slack_response_prefixes=tuple(p.strip() for p in env.get("CASESTREAM_SLACK_RESPONSE_PREFIXES", "").split(",")
                                      if p.strip()),
    )


def _networks(env: dict[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated addresses or CIDRs (``10.0.0.0/8, 192.0.2.7``)."""
    import ipaddress

    out = []
    for part in env.get(name, "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            from streams.config import ConfigError

            raise ConfigError(f"{name}: {part!r} is not an address or CIDR; give e.g. 10.0.0.0/8,192.0.2.7") from None
    return tuple(out)


def _rate(env: dict[str, str], name: str, default: str) -> tuple[float, float]:
    """``<events per second>/<burst>``, e.g. ``50/500``."""
    text = env.get(name, default)
    try:
        rate, burst = (float(x) for x in text.split("/"))
        if rate <= 0 or burst < 1:
            raise ValueError
    except ValueError:
        from streams.config import ConfigError

        raise ConfigError(f"{name}={text!r}: give <events per second>/<burst>, e.g. {default}") from None
    return rate, burst


def default_instance_id(tenant: str, store_dir: Path | None = None) -> str:
    """Stable per host, tenant and local store: static group membership across
    restarts. The store directory is part of it because two live members with
    one instance id process the same partitions until the broker fences one
    (seen on Apache Kafka: ~5 s of double work, then the older one fails);
    two workers on one host have two stores (RocksDB locks its directory), so
    they get two ids without being told, and a restart in place keeps its id."""
    base = f"{tenant}-{socket.gethostname()}"
    if store_dir is None:
        return base
    import hashlib

    return f"{base}-{hashlib.sha1(str(Path(store_dir).resolve()).encode()).hexdigest()[:8]}"
