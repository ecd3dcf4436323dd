-- rejected_events shows which configured source (issue 18) a rejected message came in by, as
-- its last column; NULL for messages rejected before sources existed.
-- Recreating the view drops grants on it: grant SELECT on `rejected_events` again after
-- upgrading (deploy/postgres/grafana-grants.sql does).
DROP VIEW rejected_events;

CREATE VIEW rejected_events AS
SELECT
    r.received_at,
    r.topic,
    r.partition,
    r.kafka_offset,
    r.reason_code || ': ' || r.reason_message AS reason,
    r.reason_code,
    r.reason_message,
    r.payload,
    CASE WHEN r.payload_is_text THEN convert_from(r.payload, 'UTF8') END AS payload_text,
    r.payload_size,
    encode(r.payload_sha256, 'hex') AS payload_sha256,
    r.payload_size > length(r.payload) AS payload_truncated,
    r.source
FROM rejected_event r;
