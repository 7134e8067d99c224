-- Integrations of the intake gateway (streams/integrations.py): one row per
-- monitor connection of this tenant, and its keys. Only the SHA-256 of a key
-- is stored. The signing secret is stored as it is: verifying an HMAC needs
-- the secret itself.

CREATE TABLE integrations (
    id              text        PRIMARY KEY,                 -- int_<12 hex>
    kind            text        NOT NULL
                    CHECK (kind IN ('pagerduty', 'alertmanager', 'grafana', 'datadog', 'events')),
    name            text        NOT NULL,
    options         jsonb       NOT NULL DEFAULT '{}',
    signing_secret  text,                                    -- whsec_...; null: requests are not signed
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz
);

CREATE TABLE integration_keys (
    key_hash        text        PRIMARY KEY,                 -- sha256(key), hex
    integration_id  text        NOT NULL REFERENCES integrations (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,                             -- null: no expiry (set by a rotation)
    revoked_at      timestamptz
);

CREATE INDEX integration_keys_integration ON integration_keys (integration_id);
