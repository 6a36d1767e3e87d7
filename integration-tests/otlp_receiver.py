#!/usr/bin/env python3
"""A minimal OTLP trace and metrics receiver for the integration tests.

Usage: otlp_receiver.py OUT.jsonl [--http] [--metrics METRICS.jsonl]
OTLP/gRPC (TraceService/Export, MetricsService/Export), or with --http OTLP/HTTP with
protobuf bodies (POST /v1/traces, /v1/metrics). Binds 127.0.0.1 on a free port, prints
`listening on 127.0.0.1:PORT` (flushed), and appends one JSON object per received span to
OUT.jsonl:
  {"service", "resource": {..}, "trace_id", "span_id", "parent_span_id", "name",
   "start_ns", "end_ns", "attributes": {..}, "events": [..]}
and, with --metrics, one per received metric data point to METRICS.jsonl (metrics are
accepted and discarded otherwise):
  {"service", "resource": {..}, "name", "unit", "type": "sum" | "gauge" | "histogram",
   "monotonic" (sums), "temporality" (sums, histograms), "time_ns", "attributes": {..},
   "value" (sums, gauges) | "count", "sum", "bounds", "bucket_counts" (histograms)}
Needs `grpcio` and `opentelemetry-proto` (PyPI). Exits on SIGTERM.
"""

import http.server
import json
import signal
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)


def value_of(any_value):
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    value = getattr(any_value, kind)
    if kind == "array_value":
        return [value_of(v) for v in value.values]
    if kind == "kvlist_value":
        return {kv.key: value_of(kv.value) for kv in value.values}
    if kind == "bytes_value":
        return value.hex()
    return value


def attrs(key_values):
    return {kv.key: value_of(kv.value) for kv in key_values}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()

    def Export(self, request, context):
        self.record(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def record(self, request):
        lines = []
        for resource_spans in request.resource_spans:
            resource = attrs(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    lines.append(
                        json.dumps(
                            {
                                "service": resource.get("service.name"),
                                "resource": resource,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "name": span.name,
                                "start_ns": span.start_time_unix_nano,
                                "end_ns": span.end_time_unix_nano,
                                "attributes": attrs(span.attributes),
                                "events": [e.name for e in span.events],
                            }
                        )
                    )
        with self.lock:
            with open(self.out, "a", encoding="utf-8") as f:
                for line in lines:
                    f.write(line + "\n")


def number_of(point):
    return point.as_double if point.WhichOneof("value") == "as_double" else point.as_int


class MetricsReceiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()

    def Export(self, request, context):
        self.record(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def record(self, request):
        if self.out is None:
            return
        lines = []
        for resource_metrics in request.resource_metrics:
            resource = attrs(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    base = {
                        "service": resource.get("service.name"),
                        "resource": resource,
                        "name": metric.name,
                        "unit": metric.unit,
                        "type": kind,
                    }
                    data = getattr(metric, kind)
                    for point in data.data_points:
                        line = dict(base)
                        line["time_ns"] = point.time_unix_nano
                        line["attributes"] = attrs(point.attributes)
                        if kind == "sum":
                            line["monotonic"] = data.is_monotonic
                            line["temporality"] = data.aggregation_temporality
                            line["value"] = number_of(point)
                        elif kind == "gauge":
                            line["value"] = number_of(point)
                        elif kind == "histogram":
                            line["temporality"] = data.aggregation_temporality
                            line["count"] = point.count
                            line["sum"] = point.sum
                            line["bounds"] = list(point.explicit_bounds)
                            line["bucket_counts"] = list(point.bucket_counts)
                        lines.append(json.dumps(line))
        with self.lock:
            with open(self.out, "a", encoding="utf-8") as f:
                for line in lines:
                    f.write(line + "\n")


def serve_http(receiver, metrics):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path == "/v1/traces":
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.record(request)
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            elif self.path == "/v1/metrics":
                request = metrics_service_pb2.ExportMetricsServiceRequest()
                request.ParseFromString(body)
                metrics.record(request)
                answer = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


def main():
    out = sys.argv[1]
    options = sys.argv[2:]
    metrics_out = None
    if "--metrics" in options:
        metrics_out = options[options.index("--metrics") + 1]
    metrics = MetricsReceiver(metrics_out)
    if "--http" in options:
        serve_http(Receiver(out), metrics)
        return
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(out), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(metrics, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(1)


if __name__ == "__main__":
    main()
