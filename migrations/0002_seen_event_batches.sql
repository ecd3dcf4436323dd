-- Dedup ids are stored one row per partition per flush instead of one row per event: the
-- per-event insert was most of every flush's time (see BENCHMARKS.md). The ids of a flush are
-- packed into `ids`, each as a big-endian u16 byte length, the UTF-8 id, and a big-endian i64
-- event time in Unix milliseconds. A row is kept until the partition's watermark minus the dedup
-- horizon passes its newest event time. The old per-event rows are not carried over: nothing
-- had been released with them.
CREATE TABLE seen_event_batch (
    id              bigserial   PRIMARY KEY,
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    max_event_time  timestamptz NOT NULL,
    ids             bytea       NOT NULL
);
CREATE INDEX seen_event_batch_partition ON seen_event_batch (topic, partition, max_event_time);
DROP TABLE seen_event;
