"""Asks a control plane for client status over CSDS, as standard tooling does.

Usage: csds_client.py HOST:PORT [NODE_ID_PREFIX]

Uses only the published Envoy API stubs (PyPI `xds-protos`) and grpcio, so it is an
independent check of Weft's `envoy.service.status.v3.ClientStatusDiscoveryService`: each
resource's `xds_config` is unpacked into the real Envoy message type, which fails if the
bytes are not what they claim to be. Prints one JSON document on stdout.
"""

import importlib
import json
import pkgutil
import sys

import grpc
from google.protobuf import json_format

import envoy
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from envoy.type.matcher.v3 import node_pb2, string_pb2


def register_envoy_types() -> None:
    """Imports every Envoy config and extension message module, so that the Any values in
    resources (listeners hold filters, clusters protocol options) can be unpacked whatever
    extensions they use. About half a second."""
    for m in pkgutil.walk_packages(envoy.__path__, "envoy."):
        if m.name.endswith("_pb2") and m.name.startswith(("envoy.config.", "envoy.extensions.")):
            importlib.import_module(m.name)


def main() -> int:
    register_envoy_types()
    target = sys.argv[1]
    req = csds_pb2.ClientStatusRequest()
    if len(sys.argv) > 2:
        req.node_matchers.append(
            node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(prefix=sys.argv[2]))
        )
    with grpc.insecure_channel(target) as ch:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(ch)
        resp = stub.FetchClientStatus(req, timeout=10)
    clients = []
    for c in resp.config:
        resources = []
        for g in c.generic_xds_configs:
            r = {
                "type_url": g.type_url,
                "name": g.name,
                "version": g.version_info,
                "config_status": csds_pb2.ConfigStatus.Name(g.config_status),
                "client_status": config_dump_shared_pb2.ClientResourceStatus.Name(
                    g.client_status
                ),
            }
            if g.HasField("xds_config"):
                # Raises if the type is unknown or the bytes do not parse as it.
                r["config"] = json_format.MessageToDict(g.xds_config)
            if g.HasField("error_state"):
                r["error"] = g.error_state.details
            resources.append(r)
        clients.append(
            {"node_id": c.node.id, "scope": c.client_scope, "resources": resources}
        )
    json.dump({"clients": clients}, sys.stdout, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
