#!/usr/bin/env python3
"""Long-running grpcio client of weft.demo.v1.Echo, driven over stdin by the weft-tests harness.

Usage: xds_client.py --target xds:///echo   (needs GRPC_XDS_BOOTSTRAP pointing at a bootstrap file)
       xds_client.py --target 127.0.0.1:50051   (plain target, for testing the client itself)

Protocol: one command per stdin line, one JSON line per command on stdout.
  call N [DEADLINE_S]  -> {"echo-1": 34, "echo-2": 33, ..., "errors": k, "last_error": "..."}
                          (N sequential unary calls; counts per replying backend)
  ping                 -> {"pong": true}
  quit                 -> exits 0
At startup it prints {"ready": true} once the stubs are loaded and the channel is created.
"""

import argparse
import json
import os
import sys


def repo_proto_dir():
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", "proto"))


def emit(obj):
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--proto-dir", default=repo_proto_dir())
    args = ap.parse_args()

    import grpc  # noqa: E402  (imported late so --help works without grpcio)

    # grpc.protos_and_services compiles the .proto at runtime (grpc_tools) from sys.path.
    sys.path.insert(0, args.proto_dir)
    protos, services = grpc.protos_and_services("weft/demo/v1/echo.proto")

    if args.target.startswith("xds:") and not os.environ.get("GRPC_XDS_BOOTSTRAP"):
        emit({"fatal": "GRPC_XDS_BOOTSTRAP is not set"})
        return 2

    channel = grpc.insecure_channel(args.target)
    stub = services.EchoStub(channel)
    emit({"ready": True})

    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        cmd = parts[0]
        if cmd == "quit":
            break
        if cmd == "ping":
            emit({"pong": True})
            continue
        if cmd == "call":
            n = int(parts[1]) if len(parts) > 1 else 1
            deadline = float(parts[2]) if len(parts) > 2 else 5.0
            counts = {}
            errors = 0
            last_error = None
            for i in range(n):
                try:
                    reply = stub.Echo(
                        protos.EchoRequest(message="m%d" % i),
                        timeout=deadline,
                        wait_for_ready=True,
                    )
                    counts[reply.backend] = counts.get(reply.backend, 0) + 1
                except grpc.RpcError as e:  # a failed call is counted, not fatal
                    errors += 1
                    last_error = "%s: %s" % (e.code(), e.details())
            out = dict(counts)
            out["errors"] = errors
            if last_error is not None:
                out["last_error"] = last_error
            emit(out)
            continue
        emit({"fatal": "unknown command %r" % cmd})
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
