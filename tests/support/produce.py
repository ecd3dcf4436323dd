#!/usr/bin/env python3
"""An independent producer for costwatch's codec test: kafka-python, with its own record-batch
and compression code (no librdkafka), sends every line of stdin ("<key hex>\t<payload hex>")
with one codec and exits non-zero unless the broker acknowledged every message."""
import argparse
import sys

from kafka import KafkaProducer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--compression", required=True, choices=["gzip", "snappy", "lz4", "zstd"])
    args = parser.parse_args()
    producer = KafkaProducer(
        bootstrap_servers=args.brokers.split(","),
        compression_type=args.compression,
        # Large, lingering batches, so that many messages share one compressed batch.
        linger_ms=50,
        batch_size=256 * 1024,
        acks=1,
    )
    futures = []
    for line in sys.stdin:
        key, payload = line.rstrip("\n").split("\t")
        futures.append(producer.send(args.topic, key=bytes.fromhex(key), value=bytes.fromhex(payload)))
    producer.flush(timeout=60)
    for future in futures:
        future.get(timeout=60)
    producer.close()
    print(f"{len(futures)} messages acknowledged ({args.compression})")


if __name__ == "__main__":
    sys.exit(main())
