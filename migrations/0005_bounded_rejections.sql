-- Rejected messages keep at most `ingest.max_rejected_payload_bytes` of their payload, with the
-- whole message's size and SHA-256 (a backlog of 10 MiB rejects was once stored whole, twice,
-- and timed every flush out). The text form is derived in the view rather than stored again.
-- Recreating the view drops grants on it: grant SELECT on `rejected_events` again after upgrading.
DROP VIEW rejected_events;

ALTER TABLE rejected_event
    ADD COLUMN payload_size    bigint,
    ADD COLUMN payload_sha256  bytea,
    -- The kept bytes are valid UTF-8 without NUL, so the view can show them as text.
    ADD COLUMN payload_is_text boolean NOT NULL DEFAULT false;

UPDATE rejected_event
SET payload_size = length(payload),
    payload_sha256 = sha256(payload),
    payload_is_text = payload_text IS NOT NULL;

ALTER TABLE rejected_event
    ALTER COLUMN payload_size SET NOT NULL,
    ALTER COLUMN payload_sha256 SET NOT NULL,
    DROP COLUMN payload_text;

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
    r.payload_size > length(r.payload) AS payload_truncated
FROM rejected_event r;
