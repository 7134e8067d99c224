"""SLA maths (streams/domain/sla.py)."""

from __future__ import annotations

import pytest

from streams.domain.sla import SlaError, breaches, deadlines, next_due, parse_slas

SLAS = parse_slas({"P1": {"first_response": "15m", "resolution": "4h"}, "P3": {"resolution": "3d"}})
T0 = 1_795_514_400_000
MIN = 60_000


def case(**kw):
    return {"priority": "P1", "created_at": T0, "acknowledged_at": None, "resolved_at": None, **kw}


def test_deadlines_follow_the_current_priority():
    assert deadlines(case(), SLAS) == {"first_response": T0 + 15 * MIN, "resolution": T0 + 240 * MIN}
    assert deadlines(case(priority="P3"), SLAS) == {"resolution": T0 + 3 * 1440 * MIN}
    assert deadlines(case(priority="P5"), SLAS) == {} and deadlines(case(priority=None), SLAS) == {}


def test_breaches_unmet_past_due_or_met_late():
    assert breaches(case(), SLAS, T0 + 15 * MIN - 1) == {}
    assert breaches(case(), SLAS, T0 + 15 * MIN) == {"first_response": T0 + 15 * MIN}
    assert breaches(case(acknowledged_at=T0 + 5 * MIN), SLAS, T0 + 60 * MIN) == {}
    assert breaches(case(acknowledged_at=T0 + 20 * MIN), SLAS, T0 + 60 * MIN) == {"first_response": T0 + 15 * MIN}
    late = case(acknowledged_at=T0 + MIN, resolved_at=T0 + 300 * MIN)
    assert breaches(late, SLAS, T0 + 400 * MIN) == {"resolution": T0 + 240 * MIN}


def test_next_due_is_the_earliest_unmet_deadline():
    assert next_due(case(), SLAS) == T0 + 15 * MIN
    assert next_due(case(acknowledged_at=T0 + MIN), SLAS) == T0 + 240 * MIN
    assert next_due(case(acknowledged_at=T0 + MIN, resolved_at=T0 + 2 * MIN), SLAS) is None


@pytest.mark.parametrize("data, msg", [
    ({"P9": {"resolution": "1h"}}, "slas.P9"), ({"P1": {}}, "slas.P1"), ({"P1": {"response": "1h"}}, "slas.P1"),
    ({"P1": {"resolution": "forever"}}, "slas.P1.resolution"),
    ({"P1": {"first_response": "2h", "resolution": "1h"}}, "shorter"),
])
def test_invalid_slas(data, msg):
    with pytest.raises(SlaError, match=msg.replace(".", r"\.")):
        parse_slas(data)
