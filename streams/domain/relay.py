"""Relay routing: which subscriptions a domain event goes to. Pure.

A subscription (``subscriptions`` in the tenant's ``oncall/<tenant>.yaml``)
names event types (none: all) and a ``match`` on the case as it is right
after the event (status, severity, priority, project, tags, urgency, source,
component, group, class). The apply agent, which holds the case state when
it emits events, copies each matching event to ``<tenant>.relay.<id>``,
keyed by case id, in emission order -- so per-case order holds on every
relay topic.
"""

from __future__ import annotations

from streams.config import Tenant
from streams.domain.case_state import fold_each
from streams.domain.oncall import matches


def route_events(tenant: Tenant, subscriptions, before: dict[str, dict | None], events: list[dict]
                 ) -> list[tuple[object, dict]]:
    """(subscription, event) for every match, in event order. ``before``: case
    id -> its state before the first of ``events`` (None for a new case)."""
    if not subscriptions or not events:
        return []
    out = []
    for e, state in fold_each(tenant, before, events):
        for sub in subscriptions:
            if (not sub.event_types or e["type"] in sub.event_types) and matches(sub.match, state):
                out.append((sub, e))
    return out
