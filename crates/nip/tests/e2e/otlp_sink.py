#!/usr/bin/env python3
"""A minimal OTLP/gRPC receiver for the e2e test of `nip serve --otel-enabled`.

Implements the real TraceService and LogsService Export RPCs (grpcio + opentelemetry-proto from
PyPI) and appends one JSON line per span and per log record to OUT:
  {"signal": "span", "service": ..., "name": ..., "kind": ..., "attributes": {...}, "status": ...}
  {"signal": "log", "service": ..., "severity": ..., "body": ..., "attributes": {...}}
Usage: otlp_sink.py PORT OUT. Prints "ready" once listening; stops on SIGTERM.
"""
import json
import signal
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

LOCK = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


def attrs(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


class Sink:
    def __init__(self, path):
        self.out = open(path, "a", encoding="utf-8")

    def write(self, rows):
        with LOCK:
            for row in rows:
                self.out.write(json.dumps(row, default=str) + "\n")
            self.out.flush()


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink):
        self.sink = sink

    def Export(self, request, context):
        rows = []
        for rs in request.resource_spans:
            resource = attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    rows.append({
                        "signal": "span",
                        "service": resource.get("service.name"),
                        "resource": resource,
                        "name": span.name,
                        "kind": span.kind,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "attributes": attrs(span.attributes),
                        "status": span.status.code,
                    })
        self.sink.write(rows)
        return trace_service_pb2.ExportTraceServiceResponse()


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, sink):
        self.sink = sink

    def Export(self, request, context):
        rows = []
        for rl in request.resource_logs:
            resource = attrs(rl.resource.attributes)
            for sl in rl.scope_logs:
                for rec in sl.log_records:
                    rows.append({
                        "signal": "log",
                        "service": resource.get("service.name"),
                        "severity": rec.severity_text,
                        "body": value(rec.body),
                        "attributes": attrs(rec.attributes),
                        "trace_id": rec.trace_id.hex(),
                    })
        self.sink.write(rows)
        return logs_service_pb2.ExportLogsServiceResponse()


def main():
    port, path = int(sys.argv[1]), sys.argv[2]
    sink = Sink(path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(sink), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(sink), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print("ready", flush=True)
    done.wait()
    server.stop(grace=1).wait()


if __name__ == "__main__":
    main()
