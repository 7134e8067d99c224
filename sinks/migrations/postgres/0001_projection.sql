-- The case projection and the timeline of one tenant, both pure functions of
-- T.domain-events. Rebuildable by replay.

CREATE TABLE cases (
    case_id           text PRIMARY KEY,
    tenant            text        NOT NULL,
    dedup_key         text        NOT NULL,
    status            text        NOT NULL,
    case_type         text        NOT NULL,
    work_type         text        NOT NULL,
    summary           text,
    source            text,
    severity          text,
    priority          text,
    urgency           text,
    project           text,
    component         text,
    "group"           text,
    class             text,
    tags              text[]      NOT NULL DEFAULT '{}',
    links             jsonb       NOT NULL DEFAULT '[]',
    custom_details    jsonb       NOT NULL DEFAULT '{}',
    assignee          jsonb,
    occurrence_count  bigint      NOT NULL,
    comment_count     bigint      NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    last_seen_at      timestamptz NOT NULL,
    status_changed_at timestamptz NOT NULL,
    acknowledged_at   timestamptz,
    resolved_at       timestamptz,
    version           bigint      NOT NULL
);
CREATE INDEX cases_dedup_key ON cases (dedup_key);
CREATE INDEX cases_status ON cases (status);
CREATE INDEX cases_created_at ON cases (created_at);

-- One row per domain event; (case_id, version) makes redelivery harmless.
CREATE TABLE timeline (
    case_id     text        NOT NULL,
    version     bigint      NOT NULL,
    event_id    text        NOT NULL UNIQUE,
    type        text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    caused_by   text        NOT NULL,
    actor       jsonb,
    payload     jsonb       NOT NULL,
    PRIMARY KEY (case_id, version)
);

-- The consumer position, written in the same transaction as the rows.
CREATE TABLE projection_positions (
    topic       text   NOT NULL,
    partition   int    NOT NULL,
    "offset"    bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);

-- The exact folded state of each case (streams.domain.cases.apply), from
-- which `cases` is written; kept apart so analysts see typed columns only.
CREATE TABLE case_states (
    case_id  text   PRIMARY KEY,
    version  bigint NOT NULL,
    state    jsonb  NOT NULL
);
