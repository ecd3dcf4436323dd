#!/usr/bin/env python3
"""Creates or replaces a SCRAM user on a broker over TLS (AlterUserScramCredentials, KIP-554),
as an operator would with kafka-configs.sh, for costwatch's SASL test. The password is read
from stdin, so that it is not in the process list. Uses confluent-kafka's admin client."""
import argparse
import sys

from confluent_kafka.admin import AdminClient, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--mechanism", required=True, choices=["SCRAM-SHA-256", "SCRAM-SHA-512"])
    args = parser.parse_args()
    password = sys.stdin.read().rstrip("\n").encode()
    admin = AdminClient(
        {
            "bootstrap.servers": args.brokers,
            "security.protocol": "SSL",
            "ssl.ca.location": args.ca,
            "broker.address.family": "v4",
        }
    )
    mechanism = ScramMechanism[args.mechanism.replace("-", "_")]
    upsert = UserScramCredentialUpsertion(args.user, ScramCredentialInfo(mechanism, 4096), password)
    for user, future in admin.alter_user_scram_credentials([upsert]).items():
        future.result(timeout=30)
        print(f"{args.mechanism} user {user} set")


if __name__ == "__main__":
    sys.exit(main())
