#!/usr/bin/env python3
"""An independent producer for costwatch's source formats (tests/sources.rs): the shapes real
stacks write, sent with confluent-kafka. OTLP is built with the opentelemetry-proto package's own
classes; OTLP/JSON is its protobuf JSON with trace and span ids in hex, as the OTLP/JSON spec
(and the Collector's `otlp_json` encoding) writes them.

Every message goes to the topic of its format (--topic FORMAT=TOPIC). Part 1 and part 2 split
the load around a kill -9 of costwatch; part 2 re-sends copies of part 1's messages. Exits
non-zero unless the broker acknowledged every message."""
import argparse
import base64
import json
import sys
from datetime import datetime, timezone

from confluent_kafka import Producer
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status


def vllm_completion(ts):
    """A vLLM /v1/completions response body."""
    return {
        "id": "cmpl-8c2a1f7e4b0d4f0e9a6c3b2d1e0f9a8b",
        "object": "text_completion",
        "created": ts,
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "choices": [{"index": 0, "text": " Paris.", "logprobs": None, "finish_reason": "stop",
                     "stop_reason": None, "prompt_logprobs": None}],
        "usage": {"prompt_tokens": 1200, "total_tokens": 1500, "completion_tokens": 300,
                  "prompt_tokens_details": None},
    }


def vllm_chat(ts):
    """A vLLM /v1/chat/completions response body."""
    return {
        "id": "chatcmpl-3f9d0c55b6a84d1e8e0b7a5f2c4d6e81",
        "object": "chat.completion",
        "created": ts,
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!", "tool_calls": []},
                     "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
        "usage": {"prompt_tokens": 40, "total_tokens": 50, "completion_tokens": 10},
        "prompt_logprobs": None,
    }


def litellm_event(ts_iso, event_id, prompt, completion, kind="litellm_tokens"):
    """What LiteLLM's OpenMeter callback sends (integrations/openmeter.py): a CloudEvent 1.0."""
    return {
        "specversion": "1.0",
        "type": kind,
        "id": event_id,
        "time": ts_iso,
        "subject": "team-search",
        "source": "litellm-proxy",
        "data": {"model": "gpt-4o-mini", "cost": 0.000315, "prompt_tokens": prompt,
                 "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def attr(key, value):
    if isinstance(value, str):
        return KeyValue(key=key, value=AnyValue(string_value=value))
    return KeyValue(key=key, value=AnyValue(int_value=value))


def span(trace, span_id, name, end_ns, attrs, kind=Span.SPAN_KIND_CLIENT):
    return Span(trace_id=bytes.fromhex(trace), span_id=bytes.fromhex(span_id), name=name, kind=kind,
                start_time_unix_nano=end_ns - 250_000_000, end_time_unix_nano=end_ns,
                attributes=[attr(k, v) for k, v in attrs], status=Status(code=Status.STATUS_CODE_OK))


def collector_batch(end_ns, trace_a, trace_b):
    """A Collector batch: two resources, GenAI spans from the OpenAI instrumentation mixed with
    HTTP and database spans, which costwatch skips."""
    chat = [("gen_ai.operation.name", "chat"), ("gen_ai.system", "openai"),
            ("gen_ai.request.model", "meta-llama/Llama-3.1-8B-Instruct"),
            ("gen_ai.response.model", "meta-llama/Llama-3.1-8B-Instruct"),
            ("gen_ai.usage.input_tokens", 500), ("gen_ai.usage.output_tokens", 100)]
    chat_api = ResourceSpans(
        resource=Resource(attributes=[attr("service.name", "chat-api"), attr("host.type", "a100-80g")]),
        scope_spans=[
            ScopeSpans(scope=InstrumentationScope(name="opentelemetry.instrumentation.openai_v2"),
                       spans=[span(trace_a, "eee19b7ec3c1b174", "chat meta-llama/Llama-3.1-8B-Instruct", end_ns, chat)]),
            ScopeSpans(scope=InstrumentationScope(name="opentelemetry.instrumentation.fastapi"),
                       spans=[span(trace_a, "eee19b7ec3c1b173", "POST /v1/chat", end_ns,
                                   [("http.request.method", "POST"), ("http.response.status_code", 200)],
                                   Span.SPAN_KIND_SERVER)]),
        ])
    rag = ResourceSpans(
        resource=Resource(attributes=[attr("service.name", "rag"), attr("host.type", "hw-1")]),
        scope_spans=[ScopeSpans(scope=InstrumentationScope(name="opentelemetry.instrumentation.openai_v2"), spans=[
            span(trace_b, "b7ad6b7169203331", "embeddings text-embedding-3-small", end_ns,
                 [("gen_ai.operation.name", "embeddings"), ("gen_ai.request.model", "text-embedding-3-small"),
                  ("gen_ai.usage.input_tokens", 64)]),
            span(trace_b, "b7ad6b7169203332", "SELECT documents", end_ns,
                 [("db.system", "postgresql"), ("db.query.text", "SELECT * FROM documents")]),
            span(trace_b, "b7ad6b7169203333", "chat qwen2-7b-instruct", end_ns,
                 [("gen_ai.request.model", "qwen2-7b-instruct"), ("gen_ai.usage.input_tokens", 10),
                  ("gen_ai.usage.output_tokens", 20)]),
        ])])
    return ExportTraceServiceRequest(resource_spans=[chat_api, rag])


def without_hardware(end_ns):
    """A GenAI span whose resource says nothing about the hardware: rejected, missing_field."""
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=[attr("service.name", "anonymous")]),
        scope_spans=[ScopeSpans(spans=[span("0af7651916cd43dd8448eb211c80319c", "00f067aa0ba902b7", "chat", end_ns,
                                            [("gen_ai.request.model", "gpt-4o"), ("gen_ai.usage.input_tokens", 3)])])])])


def otlp_json(request):
    """OTLP/JSON: protobuf JSON, but trace and span ids in hex instead of base64."""
    doc = json_format.MessageToDict(request, use_integers_for_enums=True)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                for field in ("traceId", "spanId"):
                    s[field] = base64.b64decode(s[field]).hex()
    return json.dumps(doc).encode()


def billing(event_id, at_ms, tokens_in, tokens_out):
    """An in-house billing record, read by pointers."""
    return {"request": {"id": event_id}, "at": at_ms, "llm": {"name": "mistral-7b"}, "gpu": "l4",
            "team": "ads", "usage": {"in": tokens_in, "out": tokens_out}}


def messages(ts):
    """(part, format, key, payload) of the whole load."""
    iso = datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    end_ns = ts * 1_000_000_000
    j = lambda doc: json.dumps(doc).encode()
    batch = collector_batch(end_ns, "5b8efff798038103d269b633813fc60c", "4bf92f3577b34da6a3ce929d0e0e4736")
    batch_json = collector_batch(end_ns, "6b8efff798038103d269b633813fc60c", "5bf92f3577b34da6a3ce929d0e0e4736")
    return [
        (1, "openai", "a", j(vllm_completion(ts))),
        (1, "openai", "err", j({"object": "error", "message": "max_tokens is too large", "type": "BadRequestError",
                                "param": None, "code": 400})),
        (2, "openai", "b", j(vllm_chat(ts))),
        (2, "openai", "a", j(vllm_completion(ts))),
        (2, "openai", "cut", b'{"id": "cmpl-1", "usage": {"prompt_tok'),
        (1, "cloudevents", "c1", j(litellm_event(iso, "chatcmpl-9f1c2b3a", 1200, 300))),
        (1, "cloudevents", "s1", j(litellm_event(iso, "spend-1", 5, 5, kind="litellm_spend"))),
        (2, "cloudevents", "c2", j(litellm_event(iso, "chatcmpl-77aa01", 100, 50))),
        (2, "cloudevents", "c1", j(litellm_event(iso, "chatcmpl-9f1c2b3a", 1200, 300))),
        (2, "cloudevents", "bad", j(dict(litellm_event(iso, "chatcmpl-bad", 1, 1), time="yesterday"))),
        (1, "otlp_proto", "t1", batch.SerializeToString()),
        (2, "otlp_proto", "t1", batch.SerializeToString()),
        (2, "otlp_proto", "nohw", without_hardware(end_ns).SerializeToString()),
        (2, "otlp_proto", "junk", b"\x0a\xff\xff\xff\xff\x0f not protobuf"),
        (1, "otlp_json", "t1", otlp_json(batch_json)),
        (2, "otlp_json", "t1", otlp_json(batch_json)),
        (2, "otlp_json", "junk", b'{"resourceSpans": [{"scopeSpans": {"spans": 3}}]}'),
        (1, "json", "r-1", j(billing("r-1", ts * 1000 + 123, "1500", 250))),
        (2, "json", "r-2", j(billing("r-2", ts * 1000 + 456, 500, "50"))),
        (2, "json", "r-1", j(billing("r-1", ts * 1000 + 123, "1500", 250))),
        (2, "json", "r-3", j(billing("r-3", ts * 1000, "-3", 1))),
        (1, "costwatch", "n1", j({"event_id": "n1", "timestamp": iso, "model": "qwen2-7b-instruct",
                                  "hardware": "a100-80g", "compute": 1000, "storage": 500,
                                  "input_tokens": 800, "output_tokens": 200})),
        (2, "costwatch", "n1", j({"event_id": "n1", "timestamp": iso, "model": "qwen2-7b-instruct",
                                  "hardware": "a100-80g", "compute": 1000, "storage": 500,
                                  "input_tokens": 800, "output_tokens": 200})),
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic", action="append", required=True, help="FORMAT=TOPIC")
    parser.add_argument("--ts", type=int, required=True, help="event time, Unix seconds")
    parser.add_argument("--part", type=int, choices=[1, 2], required=True)
    args = parser.parse_args()
    topics = dict(t.split("=", 1) for t in args.topic)
    producer = Producer({"bootstrap.servers": args.brokers, "linger.ms": 5})
    failures = []
    sent = 0
    for part, fmt, key, payload in messages(args.ts):
        if part != args.part:
            continue
        producer.produce(topics[fmt], key=key.encode(), value=payload,
                         on_delivery=lambda err, msg: err and failures.append(err))
        sent += 1
    producer.flush(60)
    if failures:
        print(f"not acknowledged: {failures}", file=sys.stderr)
        return 1
    print(f"{sent} messages acknowledged (part {args.part})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
