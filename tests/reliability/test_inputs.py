"""Input-side reliability scenarios (issue 11 §4, scenarios 8 and 9), on the session stack's running workers.

8. Poison pills on one intake partition: every bad record is a dead letter with its reason, every
   valid alert after each pill is applied, the worker never crashes or restarts.
9. One dedup key triggered 1 000 times at once by several producers and gateway clients: one open case,
   every trigger counted once; then a resolve, then a trigger opens a new case.

Each test counts its own figures from what it reads back and ends with a ``reliability:`` report line.
"""

from __future__ import annotations

import asyncio
import threading
import time

import orjson
import pytest

from streams.config import load_topics
from streams.domain.intake import MAX_MESSAGE_BYTES, routing_token
from tests.integration.test_gateway import gw, post  # noqa: F401  (gw: a fixture, the gateway and its keys)
from tests.reliability.harness import watchdog
from tests.reliability.report import PeakRss, Report, record, scale

pytestmark = pytest.mark.integration


# -- 8. poison pills on one partition -----------------------------------------------------------------

def _pills(marker: str) -> list[tuple[str, bytes | None, str]]:
    """(name, value, dead-letter reason) of each poison pill; ``marker`` makes the run's own."""
    m = marker.encode()
    deep = 10_000
    return [
        ("invalid json", b'{"action": "trigger", "dedup_key": "' + m + b'", summary: ', "invalid_json"),
        ("null value", None, "invalid_json"),
        (f"nested {deep} deep", b'{"action": "trigger", "m": "' + m + b'", "x": ' + b"[" * deep + b"]" * deep + b"}",
         "invalid_json"),
        ("nested unclosed", b'{"m": "' + m + b'", "x": ' + b"{\"a\": " * deep, "invalid_json"),
        ("invalid utf-8", b'{"action": "trigger", "dedup_key": "' + m + b'", "summary": "\xff\xfe\xc3\x28"}',
         "invalid_json"),
        ("not an object", orjson.dumps([marker, "trigger"]), "invalid_event"),
        ("dedup_key: 5", orjson.dumps({"action": "trigger", "dedup_key": 5, "summary": marker}), "invalid_event"),
        ('action: ["trigger"]', orjson.dumps({"action": ["trigger"], "dedup_key": marker, "summary": marker}),
         "invalid_event"),
        ("summary: object", orjson.dumps({"action": "trigger", "dedup_key": marker, "summary": {"m": marker}}),
         "invalid_event"),
        ("custom_details: string", orjson.dumps({"action": "trigger", "dedup_key": marker, "summary": marker,
                                                 "custom_details": "x"}), "invalid_event"),
        ("tags: number", orjson.dumps({"action": "trigger", "dedup_key": marker, "summary": marker, "tags": 7}),
         "invalid_event"),
        ("event_id: list", orjson.dumps({"event_id": [marker], "action": "trigger", "dedup_key": marker,
                                         "summary": marker}), "invalid_event"),
        ("too large", orjson.dumps({"action": "trigger", "dedup_key": marker, "summary": marker,
                                    "custom_details": {"pad": "x" * (MAX_MESSAGE_BYTES + 1)}}), "too_large"),
    ]


async def _topic_limit(stack, topic: str) -> int:
    """The topic's max.message.bytes (the broker's default when the topic sets none)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka)
    await admin.start()
    try:
        resp = (await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)]))[0]
    finally:
        await admin.close()
    configs = {c[0]: c[1] for c in resp.resources[0][4]}
    return int(configs["max.message.bytes"])


def test_poison_pills_on_one_partition(stack, engine_set, run_id):
    """Pills interleaved with valid alerts on one intake partition (one Kafka key for all): invalid JSON,
    a null value, JSON nested 10 000 deep, invalid UTF-8, wrong types, an oversized message, a 10 MB value
    and the largest value the topic accepts; after each pill of the first round, the product's largest valid
    message (512 KiB of custom_details) as a new case of one busy dedup key. Each pill acknowledged by Kafka is
    one dead letter with its reason and detail; each valid alert sent after it is applied (a case opens); the
    busy key's state reaches its changelog whole; the worker is the same process throughout, with no stall,
    no restart and no record refused for its size."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    tenant, started, rss = "on-call", time.monotonic(), PeakRss()
    worker = stack.oncall
    pid, before = worker.proc.pid, watchdog(stack)[worker.instance_id]
    log_start = len(worker.log_path.read_text(errors="replace"))
    topic = stack.topic(tenant, "intake")
    key = routing_token(f"{run_id}/pills").encode()   # one key: one intake partition for everything
    pills = _pills(run_id)
    rounds = scale(3)
    limit = asyncio.run(_topic_limit(stack, topic))
    big = {"10 MB": b'{"m": "' + run_id.encode() + b'", "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}',
           # the largest value the topic takes: its limit less the record batch's own bytes
           "largest the broker takes": b'{"m": "' + run_id.encode() + b'", "pad": "' + b"y" * (limit - 200) + b'"}',
           # as large, of control characters: UTF-8 text that JSON escapes to six times its size
           "largest, control characters": run_id.encode() + b"\x01" * (limit - 200)}

    busy = f"{run_id}/pill/busy"   # the product's largest valid messages, on one dedup key

    def valid(i: int, largest: bool) -> list[bytes]:
        """A trigger of a key of its own, or (``largest``) a resolve and a trigger of ``busy`` at the size limit:
        a new case each time, each holding 512 KiB of custom_details (far more than one key's state can keep)."""
        if not largest:
            return [orjson.dumps({"event_id": f"{run_id}-v{i}", "action": "trigger", "dedup_key": f"{run_id}/pill/v{i}",
                                  "summary": f"valid {i}"})]
        return [orjson.dumps({"event_id": f"{run_id}-r{i}", "action": "resolve", "dedup_key": busy}),
                orjson.dumps({"event_id": f"{run_id}-v{i}", "action": "trigger", "dedup_key": busy, "summary": "big",
                              "custom_details": {"pad": "z" * (MAX_MESSAGE_BYTES - 400)}})]

    placed: dict[tuple[int, int], tuple[str, str]] = {}   # (partition, offset) -> (pill, reason)
    valid_ids: list[str] = []
    busy_inputs = 0
    refused: dict[str, str] = {}                          # pill -> the broker's answer

    async def feed():
        nonlocal busy_inputs
        producer = AIOKafkaProducer(bootstrap_servers=stack.kafka, acks="all",
                                    max_request_size=len(big["10 MB"]) + 64 * 1024)
        await producer.start()
        try:
            async def one(value: bytes | None) -> tuple[int, int]:
                md = await producer.send_and_wait(topic, value, key=key)
                return md.partition, md.offset

            n = 0
            for r in range(rounds):
                sequence = [(f"{name} #{r}", value, reason) for name, value, reason in pills]
                if r == 0:  # the big ones once: the broker may refuse them (then nothing is written)
                    sequence += [(name, value, "too_large") for name, value in big.items()]
                for name, value, reason in sequence:
                    try:
                        placed[await one(value)] = (name, reason)
                    except KafkaError as exc:
                        refused[name] = type(exc).__name__
                    valid_ids.append(f"{run_id}-v{n}")
                    for value in valid(n, largest=r == 0):     # the first round: the largest after each pill
                        await one(value)
                        busy_inputs += r == 0
                    n += 1
        finally:
            await producer.stop()

    asyncio.run(feed())
    partitions = {p for p, _ in placed}
    assert len(partitions) == 1, partitions
    assert refused.keys() <= set(big), refused   # only a size the broker's limit forbids is refused

    wanted = set(valid_ids)
    created = stack.read(tenant, "domain-events",
                         lambda e: e["type"] == "CaseCreated" and e["caused_by"] in wanted,
                         until=lambda f: {e["caused_by"] for e in f} >= wanted, deadline=120)
    dead = stack.read(tenant, "dlq", lambda r: r.get("source", {}).get("topic") == topic and
                      (r["source"]["partition"], r["source"]["offset"]) in placed,
                      until=lambda f: {(r["source"]["partition"], r["source"]["offset"]) for r in f} >= set(placed),
                      deadline=120, settle=1.0)
    # the busy key's state, one changelog record, was written after its last input (the worker's producer
    # and the broker took it: a refused changelog write is only logged, and lost)
    keys_changelog = load_topics(tenant).changelog("keys").name
    entries = asyncio.run(stack._read(keys_changelog, "json", lambda r: r.get("dedup_key") == busy, None,
                                      lambda f: any(r.get("applied") == busy_inputs for r in f), 60.0, 0.0))
    rss.sample(worker.proc.pid)
    too_large_writes = worker.log_path.read_text(errors="replace")[log_start:].count("MessageSizeTooLarge")

    cases: dict[str, set[str]] = {}
    for e in created:
        cases.setdefault(e["caused_by"], set()).add(e["case_id"])
    letters: dict[tuple[int, int], list[dict]] = {}
    for r in dead:
        letters.setdefault((r["source"]["partition"], r["source"]["offset"]), []).append(r)
    wrong = {placed[at][0]: (rs[0]["reason"], rs[0]["detail"][:80]) for at, rs in letters.items()
             if rs[0]["reason"] != placed[at][1] or not rs[0]["detail"]}
    lost = len(wanted - set(cases)) + len(set(placed) - set(letters)) + (not entries) + too_large_writes
    doubled = sum(len(c) - 1 for c in cases.values()) + sum(len(rs) - 1 for rs in letters.values())
    after = watchdog(stack)[worker.instance_id]
    same_process = worker.alive() and worker.proc.pid == pid and after == before
    report = record(Report(
        "8 poison pills on one partition", engine_set.profile, events_in=len(placed) + len(wanted),
        effects_out=len(letters) + len(cases), lost=lost, doubled=doubled, divergent=len(wrong),
        duration_s=round(time.monotonic() - started, 1), peak_rss_mib=rss.peak,
        notes=f"{len(placed)} pills dead-lettered, {len(wanted)} valid alerts applied, "
              f"refused by the broker: {refused or 'none'} (intake max.message.bytes {limit}); "
              f"{busy_inputs} inputs of one key at the size limit, its state written: {bool(entries)}; "
              f"same worker process: {same_process}"))
    report.assert_clean(f"wrong reasons: {wrong}; missing: {sorted(wanted - set(cases))[:5]}"
                        f" {[placed[at] for at in set(placed) - set(letters)][:5]}" + stack.diagnostics())
    assert same_process, (pid, before, after, stack.diagnostics())
    nested = [rs[0]["detail"] for at, rs in letters.items() if placed[at][0].startswith("nested")]
    assert nested and all("nested deeper than 64" in d for d in nested), nested
    utf8 = [rs[0] for at, rs in letters.items() if placed[at][0].startswith("invalid utf-8")]
    assert utf8 and all(r["original_encoding"] == "base64" for r in utf8)
    # the largest records kept whole: the dead letter holds what a replay needs
    kept = {placed[at][0]: rs[0]["original_encoding"] for at, rs in letters.items() if placed[at][0] in big}
    assert all(rs[0]["original"] is not None for at, rs in letters.items() if placed[at][0] in big), kept
    assert kept.get("largest, control characters", "base64") == "base64", kept


# -- 9. one dedup key, 1 000 concurrent triggers ----------------------------------------------------------

def test_one_dedup_key_triggered_concurrently_by_many_producers(stack, gw, engine_set, run_id):
    """``scale(1000)`` triggers of one dedup key at once: four aiokafka producers (two keyed as
    ``casestream send`` keys, two unkeyed: any intake partition; half with an event_id of their own,
    half without, so each record is its own event) and four gateway clients (canonical events and
    PagerDuty v2, no event_id), plus client retries (explicit ids sent again, which must not count).
    Exactly one case opens and counts every trigger once (occurrence_count, versions 1..N, each
    trigger's identity the cause of one event, PostgreSQL's row); a resolve closes it and the next
    trigger opens a second case."""
    tenant, started, rss = "on-call", time.monotonic(), PeakRss()
    key = f"{run_id}/storm"
    total = scale(1000)
    clients, per_client = 4, max(1, total // 10 // 4)      # a tenth through the gateway
    producers = 4
    per_producer = (total - clients * per_client) // producers
    total = producers * per_producer + clients * per_client

    def trigger(p: int, i: int) -> dict:
        m = {"action": "trigger", "dedup_key": key, "summary": f"storm {p}/{i}"}
        return dict(m, event_id=f"{run_id}-{p}-{i}") if i % 2 == 0 else m

    batches = [[trigger(p, i) for i in range(per_producer)] for p in range(producers)]
    retries = [m for b in batches for m in b if "event_id" in m][::10]   # explicit ids sent a second time

    def gateway_client(c: int, answers: list) -> None:
        for i in range(per_client):
            if c % 2 == 0:
                status, body, _ = post(gw["base"], f"/v1/integrations/{gw['keys']['events']}/events",
                                       orjson.dumps({"action": "trigger", "dedup_key": key,
                                                     "summary": f"gateway {c}/{i}"}))
            else:
                status, body, _ = post(gw["base"], "/v2/enqueue", orjson.dumps({
                    "routing_key": gw["keys"]["pagerduty"], "event_action": "trigger", "dedup_key": key,
                    "payload": {"summary": f"pagerduty {c}/{i}", "source": "storm", "severity": "error"}}))
            answers.append((status, body.get("dedup_key") or body.get("dedup_keys", [None])[0]))

    async def kafka_producers() -> list[list[str]]:
        topic = stack.topic(tenant, "intake")
        sends = [stack._send(tenant, topic, b, p < 2) for p, b in enumerate(batches)]
        return await asyncio.gather(*sends, stack._send(tenant, topic, retries, True))

    answers: list = []
    threads = [threading.Thread(target=gateway_client, args=(c, answers)) for c in range(clients)]
    for t in threads:
        t.start()
    placed = asyncio.run(kafka_producers())
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and len(answers) == clients * per_client
    accepted = sum(1 for status, k in answers if status == 202 and k == key)
    assert accepted == len(answers), answers[:5]

    # each Kafka-sent trigger's identity: its event_id, else its record's
    identities = {m.get("event_id") or rid for b, ids in zip(batches, placed) for m, rid in zip(b, ids)}

    def mine(e):
        return e.get("dedup_key") == key

    def counted(found):
        return len({(e["case_id"], e["version"]) for e in found}) >= total

    events = stack.read(tenant, "domain-events", mine, until=counted, deadline=180, settle=2.0)
    rss.sample(stack.oncall.proc.pid)
    distinct = {(e["case_id"], e["version"]): e for e in events}
    cases = {e["case_id"] for e in distinct.values() if e["type"] == "CaseCreated"}
    causes = [e["caused_by"] for e in distinct.values()]
    counted_triggers = len(set(causes))
    occurrences = max((e.get("occurrence_count") or 1) for e in distinct.values())
    case_id = min(cases)
    row = stack.poll(lambda: stack.pg(tenant, "SELECT version, state FROM case_states WHERE case_id = $1", case_id),
                     lambda r: r and r[0]["version"] >= total, what="the case projected")[0]
    projected = orjson.loads(row["state"])["occurrence_count"]

    # then: resolve, and a trigger opens a new case
    stack.send(tenant, [{"event_id": f"{run_id}-resolve", "action": "resolve", "dedup_key": key},
                        {"event_id": f"{run_id}-again", "action": "trigger", "dedup_key": key, "summary": "again"}])
    after = stack.read(tenant, "domain-events", lambda e: mine(e) and e["caused_by"] in
                       (f"{run_id}-resolve", f"{run_id}-again"), count=2, settle=1.0)
    resolved = [e for e in after if e["type"] == "StatusChanged" and e["to_status"] == "RESOLVED"]
    reopened = {e["case_id"] for e in after if e["type"] == "CaseCreated"}

    reopened_right = bool(resolved) and len(reopened) == 1 and not reopened & cases
    lost = (total - counted_triggers) + len(identities - set(causes)) + (not reopened_right)
    doubled = (len(cases) - 1) + (len(causes) - len(set(causes))) + max(0, occurrences - total)
    divergent = (occurrences != total) + (projected != total) + \
        (sorted(v for c, v in distinct if c == case_id) != list(range(1, total + 1)))
    report = record(Report(
        "9 one dedup key x1000 concurrent", engine_set.profile, events_in=total + len(retries) + 2,
        effects_out=len(distinct) + len(after), lost=lost, doubled=doubled, divergent=divergent,
        duration_s=round(time.monotonic() - started, 1), peak_rss_mib=rss.peak,
        notes=f"{producers} producers x {per_producer} (2 keyed, 2 unkeyed; half with event_id), "
              f"{clients} gateway clients x {per_client}, {len(retries)} explicit ids sent again; "
              f"cases {len(cases)}, occurrence_count {occurrences} (PostgreSQL {projected}), "
              f"then resolved and a new case: {reopened_right}"))
    report.assert_clean(f"cases {cases}, missing identities {sorted(identities - set(causes))[:5]}")
