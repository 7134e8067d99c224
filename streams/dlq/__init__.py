"""Dead letters: inspect ``T.dlq`` and replay what it holds.

``casestream dlq list|show|replay`` (``streams/cli/dlq.py``) is a thin shell
over this package:

* ``records`` -- :class:`DeadLetter` (one record of ``T.dlq``), its original
  (:func:`original_bytes`, :func:`original_text`), how it is shown
  (:func:`utc`, :func:`describe_source`), the arguments naming dead letters
  (:func:`parse_ref`, :func:`parse_time`) and :class:`Filters`; pure;
* ``plans`` -- :func:`plan` decides, as a pure function of one dead letter,
  what replaying it publishes -- :class:`Plan` of :class:`Publish` (topic
  role, key, value bytes, headers) -- or why it is skipped;
* ``replays`` -- :func:`read_dead_letters` reads the DLQ of a tenant from the
  beginning up to the end offsets taken when it starts (it never waits for
  new records), keeping the records that match a :class:`Filters`;
  :func:`publish` sends the planned messages with ``acks=all`` and returns
  only once Kafka has acknowledged every one; :func:`replay` does both.

How a dead letter is replayed depends on where it came from (``source.topic``):

* ``T.intake`` (the route agent's rejections: invalid_json, invalid_event,
  too_large) and ``T.intake-routed`` (the apply agent's rejections:
  no_open_case, invalid_transition, unknown_case; and processing_error):
  the original bytes go back to ``T.intake``, keyed by dedup key (or case id)
  as ``casestream send`` keys them;
* ``T.timers`` (processing_error of a due timer): the timer JSON goes back to
  ``T.timers``, keyed by the routing token of its dedup key (as the timer
  scheduler sends it);
* ``gateway:<kind>`` (rate_limited): the monitor's body is translated again
  (``streams.domain.monitors.translate``) and each resulting message goes to
  ``T.intake`` -- byte for byte what the gateway would have published;
* ``T.domain-events`` (projection_rejected: a document the search index
  refused) is skipped with what to do instead: the event is still in the
  log, so the fix is a rebuild (``casestream reindex``), not a re-publish;
* a record without ``original`` is skipped, and so is a message already
  published by the same replay (a dead letter replayed and rejected again
  sits in the DLQ twice with the same original).

Replay is idempotent: the bytes are republished unchanged, and a replayed
intake message is a new attempt with an id of its own, derived from the id
the rejected record had (``casestream-event-id`` header; it wins over an
explicit ``event_id``): the rejection, remembered under the original id,
does not swallow it, and replaying the same dead letter again is the same
attempt. A rate-limited body's messages keep the translators' ids (they were
never applied) and get one per dead letter and position where they have
none; a timer's id derives from its timer id. Replaying the same dead
letters twice has no second effect.
"""

from streams.dlq.plans import INTAKE, NOTIFICATIONS, TIMERS, Plan, Publish, intake_key, plan, source_kind
from streams.dlq.records import (
    GATEWAY_PREFIX, DeadLetter, Filters, decode_value, describe_source, newest_last, original_bytes, original_text,
    parse_ref, parse_time, utc,
)
from streams.dlq.replays import (
    MAX_REQUEST_BYTES, REPLAY_HINT, Item, NotFound, ReplayReport, once, publish, read_dead_letters, read_one, replay,
)

__all__ = [
    "GATEWAY_PREFIX", "INTAKE", "MAX_REQUEST_BYTES", "NOTIFICATIONS", "REPLAY_HINT", "TIMERS",
    "DeadLetter", "Filters", "Item", "NotFound", "Plan", "Publish", "ReplayReport",
    "decode_value", "describe_source", "intake_key", "newest_last", "once", "original_bytes", "original_text",
    "parse_ref", "parse_time", "plan", "publish", "read_dead_letters", "read_one", "replay", "source_kind", "utc",
]
