"""Prometheus metrics (standard naming: <namespace>_<what>_<unit>_total)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

INTAKE_MESSAGES = Counter(
    "casestream_intake_messages_total", "Intake messages consumed, by outcome.", ["tenant", "outcome"])
DLQ_MESSAGES = Counter(
    "casestream_dlq_messages_total", "Messages sent to the tenant's DLQ, by reason.", ["tenant", "reason"])
DOMAIN_EVENTS = Counter(
    "casestream_domain_events_total", "Domain events emitted, by type.", ["tenant", "type"])
DUPLICATES = Counter(
    "casestream_intake_duplicates_total", "Intake messages already applied (redeliveries).", ["tenant"])
REREADS = Counter(
    "casestream_partition_rereads_total",
    "Partitions read again from their committed offset: a commit stuck behind records lost inside the worker.",
    ["tenant"])
PROJECTED = Counter(
    "casestream_projected_events_total", "Domain events written to a sink.", ["tenant", "sink"])
PROJECTION_REJECTED = Counter(
    "casestream_projection_rejected_events_total",
    "Domain events a sink refused for good (their document rejected by the index), dead-lettered "
    "projection_rejected.", ["tenant", "sink"])
PROJECTION_REPAIRS = Counter(
    "casestream_projection_repairs_total",
    "Documents found behind the events to write (a version gap: refused before, a record skipped) and "
    "repaired with the events in between, read back from the domain-event log.", ["tenant", "sink"])
APPLY_SECONDS = Histogram(
    "casestream_apply_duration_seconds", "Time to decide and apply one batch of routed intake messages.", ["tenant"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))

# on-call paging and automation (streams/domain/oncall.py, agents/timers.py)
TIME_TO_ACKNOWLEDGE = Histogram(
    "casestream_time_to_acknowledge_seconds", "From case creation to its first acknowledgement.", ["tenant"],
    buckets=(10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 86400))
ESCALATION_STEPS = Counter(
    "casestream_escalation_steps_total", "Escalation steps started, by policy and step number (1-based).",
    ["tenant", "policy", "step"])
ESCALATIONS_ENDED = Counter(
    "casestream_escalations_ended_total",
    "Escalations that ended, by outcome: acknowledged (success: before the policy ended), resolved, "
    "policy_end (nobody acknowledged), superseded, policy_removed.", ["tenant", "outcome"])
SLA_BREACHES = Counter(
    "casestream_sla_breaches_total", "SLA targets breached, by SLA (first_response, resolution).", ["tenant", "sla"])
AUTOMATIONS = Counter(
    "casestream_automation_rules_applied_total", "Automation rules applied, by rule.", ["tenant", "rule"])
NOTIFICATIONS_REQUESTED = Counter(
    "casestream_notifications_requested_total", "Notifications requested by escalation, shadow or not.",
    ["tenant", "shadow"])
TIMERS_PENDING = Gauge(
    "casestream_timers_pending", "Timers pending in this worker's partitions, by kind.", ["tenant", "kind"])
STATE_MEMORY = Gauge(
    "casestream_state_memory_bytes",
    "Memory of the worker's RocksDB table stores (streams/store.py): part=cache (read blocks and the "
    "memtables charged to it, under the budget), memtables, budget.", ["tenant", "part"])
TIMERS_FIRED = Counter(
    "casestream_timers_fired_total", "Due timers sent for firing (a timer may be re-sent; it fires once).",
    ["tenant", "kind"])
TIMER_LATENESS = Histogram(
    "casestream_timer_lateness_seconds", "How late a due timer was sent, by the worker's clock.", ["tenant"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600))
CONFIG_RELOADS = Counter(
    "casestream_config_reloads_total", "On-call configuration reloads, by result (ok, error).",
    ["tenant", "result"])

RELAYED = Counter(
    "casestream_relayed_events_total", "Domain events copied to a relay topic, by subscription.",
    ["tenant", "subscription"])

# notification delivery (agents/notify.py)
DELIVERIES = Counter(
    "casestream_notification_deliveries_total",
    "Notification attempts by channel and outcome (delivered, retry, permanent).", ["tenant", "channel", "outcome"])
DELIVERY_SECONDS = Histogram(
    "casestream_notification_delivery_duration_seconds", "Duration of one delivery attempt (HTTP).",
    ["tenant", "channel"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
DELIVERIES_PENDING = Gauge(
    "casestream_notification_deliveries_pending", "Deliveries waiting to be sent or retried (the retry queue).",
    ["tenant"])
BREAKER_STATE = Gauge(
    "casestream_notification_breaker_state", "Circuit breaker per endpoint: 0 closed, 1 half-open, 2 open.",
    ["tenant", "endpoint"])

# the intake gateway (streams/gateway.py)
GATEWAY_REQUESTS = Counter(
    "casestream_gateway_requests_total", "Gateway intake requests, by monitor kind and HTTP status.",
    ["tenant", "kind", "status"])
GATEWAY_EVENTS = Counter(
    "casestream_gateway_events_total", "Events in gateway requests: accepted (Kafka acknowledged) or rate_limited.",
    ["tenant", "kind", "outcome"])
GATEWAY_SECONDS = Histogram(
    "casestream_gateway_request_duration_seconds", "Gateway intake request duration (to Kafka's acknowledgement).",
    ["kind"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))

# the analyst's view (streams/api.py)
ANALYTICS_PERCENTILES = Counter(
    "casestream_analytics_percentiles_total",
    "Analytics answers with percentiles, by how they were computed: aggregation (the search server's) "
    "or values (every value read, on a server without the aggregation).", ["tenant", "source"])


def record_oncall(tenant: str, ack_status: str, event: dict, case: dict | None) -> None:
    """On-call metrics of one emitted domain event (``case``: the case state after it)."""
    t = event["type"]
    if t == "EscalationStepStarted":
        ESCALATION_STEPS.labels(tenant, event["escalation_policy_id"], str(event["step_index"] + 1)).inc()
    elif t == "EscalationEnded":
        ESCALATIONS_ENDED.labels(tenant, event["reason"]).inc()
    elif t == "SlaBreached":
        SLA_BREACHES.labels(tenant, event["sla"]).inc()
    elif t == "AutomationApplied":
        AUTOMATIONS.labels(tenant, event["rule_id"]).inc()
    elif t == "NotificationRequested":
        NOTIFICATIONS_REQUESTED.labels(tenant, str(event["is_shadow"]).lower()).inc()
    elif t == "StatusChanged" and event["to_status"] == ack_status and case is not None \
            and case.get("acknowledged_at") == event["occurred_at"] and case.get("created_at") is not None:
        TIME_TO_ACKNOWLEDGE.labels(tenant).observe((event["occurred_at"] - case["created_at"]) / 1000)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    start_http_server(port, addr=addr)
