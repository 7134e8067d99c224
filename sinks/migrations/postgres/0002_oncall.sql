-- The page's on-call properties (streams.domain.cases.ONCALL_DEFAULTS), folded
-- from the escalation, responder and SLA events. Existing rows get the
-- defaults of a case without a policy; constant defaults add no table rewrite.

ALTER TABLE cases
    ADD COLUMN escalation_policy_id          text,
    ADD COLUMN escalation_policy_step_id     text,
    ADD COLUMN escalation_policy_retry_count int         NOT NULL DEFAULT 0,
    ADD COLUMN escalation_active             boolean     NOT NULL DEFAULT false,
    ADD COLUMN is_shadow                     boolean     NOT NULL DEFAULT false,
    ADD COLUMN targets                       jsonb       NOT NULL DEFAULT '[]',   -- [{"kind", "id"}]
    ADD COLUMN responder_users               text[]      NOT NULL DEFAULT '{}',   -- user ids, in order added
    ADD COLUMN responders                    jsonb       NOT NULL DEFAULT '[]',   -- [{"id", "name", "email"}]
    ADD COLUMN responders_added_at           timestamptz,
    ADD COLUMN time_to_first_acknowledge_ms  bigint,
    ADD COLUMN sla_breaches                  text[]      NOT NULL DEFAULT '{}';

-- What the fold computes at the first acknowledge, for cases acknowledged
-- before this migration (their stored state has no such field).
UPDATE cases
   SET time_to_first_acknowledge_ms = round(extract(epoch FROM acknowledged_at - created_at) * 1000)::bigint
 WHERE acknowledged_at IS NOT NULL;
