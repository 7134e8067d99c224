"""Prometheus metrics (standard naming: <namespace>_<what>_<unit>_total)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

INTAKE_MESSAGES = Counter(
    "casestream_intake_messages_total", "Intake messages consumed, by outcome.", ["tenant", "outcome"])
DLQ_MESSAGES = Counter(
    "casestream_dlq_messages_total", "Messages sent to the tenant's DLQ, by reason.", ["tenant", "reason"])
DOMAIN_EVENTS = Counter(
    "casestream_domain_events_total", "Domain events emitted, by type.", ["tenant", "type"])
DUPLICATES = Counter(
    "casestream_intake_duplicates_total", "Intake messages already applied (redeliveries).", ["tenant"])
PROJECTED = Counter(
    "casestream_projected_events_total", "Domain events written to a sink.", ["tenant", "sink"])
APPLY_SECONDS = Histogram(
    "casestream_apply_duration_seconds", "Time to decide and apply one batch of routed intake messages.", ["tenant"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))


def serve(port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr)
