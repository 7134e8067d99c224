-- Integrations of kind slack: Slack's interactivity requests (the Acknowledge /
-- Resolve buttons). Their signing secret is the one Slack issues for the app.
ALTER TABLE integrations DROP CONSTRAINT integrations_kind_check;
ALTER TABLE integrations ADD CONSTRAINT integrations_kind_check
    CHECK (kind IN ('pagerduty', 'alertmanager', 'grafana', 'datadog', 'events', 'slack'));
