#!/usr/bin/env python3
"""Cross-checks of a `helm template` rendering of charts/weft that a schema cannot make.

Usage: check_manifests.py RENDERED.yaml --release R --namespace NS --expect-kinds K1,K2,...
                          [--tls helm|cert-manager|none] [--failure-policy Ignore|Fail]
                          [--crds] [--dashboard FILE [--dashboard-namespace NS]
                          [--dashboard-label KEY=VALUE]]

Run by charts/test.sh with the .venv's Python (PyYAML comes with kubernetes-validate).
Prints one line per check group and exits 1 listing every failed check.
"""
import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import yaml

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
    return cond


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def structural_errors(node, path, in_junctor=False):
    """Kubernetes' structural-schema rules (a CRD whose schema breaks them is refused by the API
    server): every node reached through properties/items/additionalProperties has a type (or
    x-kubernetes-int-or-string / x-kubernetes-preserve-unknown-fields); nothing under
    anyOf/oneOf/allOf/not sets type, additionalProperties, default, nullable or description; no
    $ref; properties and additionalProperties are mutually exclusive."""
    errs = []
    if not isinstance(node, dict):
        return [f"{path}: not an object"]
    for bad in ("$ref", "definitions", "$defs"):
        if bad in node:
            errs.append(f"{path}: {bad} is not allowed")
    if in_junctor:
        for k in ("type", "additionalProperties", "default", "nullable", "description"):
            if k in node:
                errs.append(f"{path}: {k} inside anyOf/oneOf/allOf/not")
    elif not (node.get("type") or node.get("x-kubernetes-int-or-string")
              or node.get("x-kubernetes-preserve-unknown-fields")):
        errs.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        errs.append(f"{path}: both properties and additionalProperties")
    if node.get("additionalProperties") is False:
        errs.append(f"{path}: additionalProperties: false")
    for k, v in (node.get("properties") or {}).items():
        errs += structural_errors(v, f"{path}.{k}", in_junctor)
    if isinstance(node.get("items"), dict):
        errs += structural_errors(node["items"], f"{path}[]", in_junctor)
    if isinstance(node.get("additionalProperties"), dict):
        errs += structural_errors(node["additionalProperties"], f"{path}{{}}", in_junctor)
    for j in ("anyOf", "oneOf", "allOf"):
        for i, b in enumerate(node.get(j, [])):
            errs += structural_errors(b, f"{path}/{j}[{i}]", True)
    if "not" in node:
        errs += structural_errors(node["not"], f"{path}/not", True)
    return errs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--release", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--expect-kinds", required=True)
    ap.add_argument("--tls", choices=["helm", "cert-manager", "none"], required=True)
    ap.add_argument("--failure-policy", default="Ignore")
    ap.add_argument("--crds", action="store_true", help="the rendering includes crds/")
    ap.add_argument("--dashboard", help="the Grafana dashboard JSON file the rendering must carry "
                    "in a ConfigMap; without it, no dashboard ConfigMap may be rendered")
    ap.add_argument("--dashboard-namespace", help="the dashboard ConfigMap's namespace "
                    "(default: --namespace)")
    ap.add_argument("--dashboard-label", default="grafana_dashboard=1",
                    help="a label the dashboard ConfigMap must have (the Grafana sidecar's)")
    args = ap.parse_args()
    ns = args.namespace
    dashboard_ns = args.dashboard_namespace or ns

    with open(args.rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]

    def is_dashboard(d):
        return d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")

    by_kind = {}
    dashboards = [d for d in docs if is_dashboard(d)]
    for d in docs:
        if not is_dashboard(d):
            by_kind.setdefault(d["kind"], []).append(d)

    def one(kind):
        objs = by_kind.get(kind, [])
        check(len(objs) == 1, f"exactly one {kind} (found {len(objs)})")
        return objs[0] if objs else None

    # -- kinds
    expected = set(args.expect_kinds.split(","))
    got = set(by_kind) | ({"ConfigMap"} if dashboards else set())
    check(got == expected, f"kinds: expected {sorted(expected)}, got {sorted(got)}")
    print(f"  kinds: {', '.join(sorted(got))}")

    # -- labels and namespaces
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration",
                      "CustomResourceDefinition"}
    for d in docs:
        name = f'{d["kind"]}/{d["metadata"]["name"]}'
        if d["kind"] == "CustomResourceDefinition":
            continue  # crds/ files are not templated: no release labels
        labels = d["metadata"].get("labels", {})
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                    "app.kubernetes.io/version", "app.kubernetes.io/managed-by", "helm.sh/chart"):
            check(key in labels, f"{name}: label {key}")
        check(labels.get("app.kubernetes.io/instance") == args.release,
              f"{name}: app.kubernetes.io/instance is the release")
        if d["kind"] in cluster_scoped:
            check("namespace" not in d["metadata"], f"{name}: cluster-scoped, no namespace")
        else:
            want_ns = dashboard_ns if is_dashboard(d) else ns
            check(d["metadata"].get("namespace") == want_ns, f"{name}: namespace {want_ns}")
    print("  labels and namespaces: checked on every object")

    # -- the Deployment and its pod
    dep = one("Deployment")
    if dep is None:
        return
    fullname = dep["metadata"]["name"]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    check(labels_match(dep["spec"]["selector"]["matchLabels"], pod_labels),
          "Deployment selector matches its pod labels")
    psc = spec.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, "pod runAsNonRoot")
    check((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
          "pod seccompProfile RuntimeDefault")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        check(not spec.get(key), f"pod has no {key}")
    check(spec.get("enableServiceLinks") is False, "pod enableServiceLinks false")
    for v in spec.get("volumes", []):
        check("hostPath" not in v, f"volume {v['name']}: no hostPath")
    containers = spec.get("containers", []) + spec.get("initContainers", [])
    check(len(containers) >= 1, "pod has containers")
    for c in containers:
        sc = c.get("securityContext", {})
        n = c["name"]
        check(sc.get("readOnlyRootFilesystem") is True, f"{n}: readOnlyRootFilesystem")
        check(sc.get("allowPrivilegeEscalation") is False, f"{n}: allowPrivilegeEscalation false")
        check(sc.get("privileged") in (None, False), f"{n}: not privileged")
        check("ALL" in (sc.get("capabilities") or {}).get("drop", []), f"{n}: drops ALL capabilities")
        check(not (sc.get("capabilities") or {}).get("add"), f"{n}: adds no capabilities")
        check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{n}: runAsNonRoot")
        check(sc.get("runAsUser", psc.get("runAsUser", 65532)) != 0, f"{n}: not uid 0")
        for p in c.get("ports", []):
            check(p["containerPort"] >= 1024, f"{n}: port {p['containerPort']} unprivileged")
    print(f"  pod security (restricted PSS): {len(containers)} container(s)")

    cp = next((c for c in spec["containers"] if c["name"] == "control-plane"), None)
    if not check(cp is not None, "container control-plane"):
        return
    ports = {p["name"]: p["containerPort"] for p in cp.get("ports", [])}
    check(ports.get("grpc-xds") == 18000, "container port grpc-xds 18000")
    check(ports.get("http-admin") == 19000, "container port http-admin 19000")
    lp, rp = cp.get("livenessProbe", {}), cp.get("readinessProbe", {})
    check(lp.get("httpGet", {}).get("path") == "/healthz" and lp["httpGet"].get("port") == "http-admin",
          "liveness probe GET /healthz on the admin port")
    check(rp.get("httpGet", {}).get("path") == "/readyz" and rp["httpGet"].get("port") == "http-admin",
          "readiness probe GET /readyz on the admin port")
    cargs = cp.get("args", [])
    check(f"--xds-listen=0.0.0.0:{ports.get('grpc-xds')}" in cargs, "--xds-listen matches grpc-xds port")
    check(f"--admin-listen=0.0.0.0:{ports.get('http-admin')}" in cargs,
          "--admin-listen matches http-admin port")
    if "--kubernetes" in cargs:
        check(f"--kube-lease-namespace={ns}" in cargs, "--kube-lease-namespace is the release namespace")
    env = {e["name"]: e for e in cp.get("env", [])}
    check(env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
          "POD_NAME from the downward API (Lease holder identity)")
    check(env.get("POD_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
          == "metadata.namespace", "POD_NAMESPACE from the downward API")
    mounts = {m["name"]: m["mountPath"] for m in cp.get("volumeMounts", [])}
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    for m in mounts:
        check(m in vols, f"volumeMount {m} has a volume")
    check(mounts.get("tmp") == "/tmp" and "emptyDir" in vols.get("tmp", {}), "writable /tmp emptyDir")
    print("  control-plane container: ports, probes, flags, mounts")

    # -- ConfigMap / registry file
    reg_args = [a for a in cargs if a.startswith("--registry-file=")]
    if "ConfigMap" in by_kind:
        cm = one("ConfigMap")
        check(len(reg_args) == 1, "--registry-file passed when the registry ConfigMap exists")
        check(vols.get("registry", {}).get("configMap", {}).get("name") == cm["metadata"]["name"],
              "registry volume is the ConfigMap")
        if reg_args and "registry" in mounts:
            path = reg_args[0].split("=", 1)[1]
            check(os.path.dirname(path) == mounts["registry"], "--registry-file is under the mount")
            check(os.path.basename(path) in cm["data"], "--registry-file names a ConfigMap key")
            doc = yaml.safe_load(cm["data"][os.path.basename(path)])
            check(isinstance(doc, dict) and set(doc) <= {"services", "routes", "policies"},
                  "registry.yaml is a registry document")
        print("  registry ConfigMap: mounted and passed with --registry-file")
    else:
        check(not reg_args, "no --registry-file without the ConfigMap")
    check("checksum/config" in pod["metadata"].get("annotations", {}), "checksum/config annotation")

    # -- Grafana dashboard: the file as it is, where the Grafana sidecar finds it
    if args.dashboard:
        if check(len(dashboards) == 1, f"exactly one dashboard ConfigMap (found {len(dashboards)})"):
            cm = dashboards[0]
            check(cm["metadata"]["name"] == f"{fullname}-dashboard"[:63].rstrip("-"),
                  "dashboard ConfigMap is named <fullname>-dashboard")
            key, _, value = args.dashboard_label.partition("=")
            check(cm["metadata"].get("labels", {}).get(key) == value,
                  f"dashboard ConfigMap labelled {key}: \"{value}\"")
            with open(args.dashboard) as f:
                want_text = f.read()
            got_text = cm.get("data", {}).get("weft.json")
            if check(isinstance(got_text, str), "dashboard ConfigMap has data weft.json"):
                try:
                    got = json.loads(got_text)
                except ValueError as e:
                    got = None
                    check(False, f"dashboard ConfigMap weft.json is not JSON: {e}")
                check(got == json.loads(want_text), f"dashboard ConfigMap weft.json equals {args.dashboard}")
                check(got_text.rstrip("\n") == want_text.rstrip("\n"),
                      f"dashboard ConfigMap weft.json is {args.dashboard} byte for byte")
            print(f"  Grafana dashboard ConfigMap: {args.dashboard} in {dashboard_ns}, labelled {key}={value}")
    else:
        check(not dashboards, "no dashboard ConfigMap (grafana.dashboard.enabled=false)")

    # -- Service
    svc = one("Service")
    if svc:
        check(svc["metadata"]["name"] == fullname, "Service name is the full name")
        check(labels_match(svc["spec"]["selector"], pod_labels), "Service selector matches the pods")
        sports = {p["name"]: p for p in svc["spec"]["ports"]}
        check(sports.get("grpc-xds", {}).get("port") == 18000, "Service xDS port 18000")
        check(sports.get("http-admin", {}).get("port") == 19000, "Service admin port 19000")
        for p in sports.values():
            check(p["targetPort"] in ports, f"Service port {p['name']} targets a container port")
        print("  Service: selector and ports")

    # -- ServiceAccount and RBAC
    sa_name = spec.get("serviceAccountName")
    if "ServiceAccount" in by_kind:
        check(one("ServiceAccount")["metadata"]["name"] == sa_name, "pod uses the chart's ServiceAccount")
    for r in by_kind.get("ClusterRole", []) + by_kind.get("Role", []):
        for rule in r["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                check("*" not in rule.get(key, []), f'{r["kind"]}/{r["metadata"]["name"]}: no "*" in {key}')
            check(not set(rule["verbs"]) & {"delete", "deletecollection", "escalate", "bind", "impersonate"},
                  f'{r["kind"]}: no delete/escalate/bind/impersonate verbs')
    if "ClusterRole" in by_kind:
        cr = one("ClusterRole")
        grants = {}
        for rule in cr["rules"]:
            for g in rule["apiGroups"]:
                for res in rule["resources"]:
                    grants.setdefault((g, res), set()).update(rule["verbs"])
        want = {("", "services"): {"get", "list", "watch"},
                ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"}}
        for res in ("trafficroutes", "trafficpolicies", "externalservices"):
            want[("mesh.weft.dev", res)] = {"get", "list", "watch"}
            want[("mesh.weft.dev", res + "/status")] = {"patch", "update"}
        check(grants == want, f"ClusterRole grants exactly {want}, got {grants}")
        role = one("Role")
        check(role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                 "verbs": ["get", "create", "update"]}],
              "Role: leases get/create/update only")
        for kind, ref in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
            b = one(kind)
            check(b["roleRef"]["kind"] == ref and b["roleRef"]["name"] == by_kind[ref][0]["metadata"]["name"],
                  f"{kind} refers to the {ref}")
            check(b["subjects"] == [{"kind": "ServiceAccount", "name": sa_name, "namespace": ns}],
                  f"{kind} binds the pod's ServiceAccount")
        print("  RBAC: least privilege, bound to the pod's ServiceAccount")

    # -- PDB, HPA, ServiceMonitor, NetworkPolicy select the pods
    if "PodDisruptionBudget" in by_kind:
        pdb = one("PodDisruptionBudget")
        check(labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels), "PDB selects the pods")
        check(("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"]),
              "PDB sets exactly one of minAvailable/maxUnavailable")
    if "HorizontalPodAutoscaler" in by_kind:
        hpa = one("HorizontalPodAutoscaler")
        check(hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": fullname},
              "HPA targets the Deployment")
        check("replicas" not in dep["spec"], "Deployment leaves replicas to the HPA")
        check(len(hpa["spec"].get("metrics", [])) >= 1, "HPA has metrics")
    else:
        check("replicas" in dep["spec"], "Deployment sets replicas without an HPA")
    if "ServiceMonitor" in by_kind:
        sm = one("ServiceMonitor")
        check(labels_match(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]),
              "ServiceMonitor selects the Service")
        check(sm["spec"]["namespaceSelector"] == {"matchNames": [ns]}, "ServiceMonitor namespace")
        ep = sm["spec"]["endpoints"]
        check(len(ep) == 1 and ep[0]["port"] == "http-admin" and ep[0]["path"] == "/metrics",
              "ServiceMonitor scrapes /metrics on http-admin")
        # The xDS metrics' own `service` label (ads, cds, ...) must survive the scrape: without
        # honorLabels, Prometheus renames it exported_service and the dashboard loses it.
        check(len(ep) == 1 and ep[0].get("honorLabels") is True, "ServiceMonitor honorLabels: true")
    if "NetworkPolicy" in by_kind:
        np = one("NetworkPolicy")
        check(labels_match(np["spec"]["podSelector"]["matchLabels"], pod_labels), "NetworkPolicy selects the pods")
        allowed = {p["port"] for rule in np["spec"].get("ingress", []) for p in rule.get("ports", [])}
        check(set(ports.values()) <= allowed, f"NetworkPolicy admits every container port {sorted(ports.values())}")
    print("  PDB / HPA / ServiceMonitor / NetworkPolicy: selectors and targets")

    # -- the injection webhook
    mwcs = by_kind.get("MutatingWebhookConfiguration", [])
    if args.tls == "none":
        check(not mwcs, "no webhook when the injector is off")
        check(not any(a.startswith("--webhook") for a in cargs), "no --webhook-* flags when the injector is off")
    else:
        mwc = one("MutatingWebhookConfiguration")
        whs = mwc["webhooks"]
        check(len(whs) == 1, "one webhook")
        wh = whs[0]
        check(wh["failurePolicy"] == args.failure_policy, f"failurePolicy {args.failure_policy}")
        check(wh["sideEffects"] == "None", "sideEffects None")
        check(wh["admissionReviewVersions"] == ["v1"], "admissionReviewVersions [v1]")
        svcref = wh["clientConfig"]["service"]
        check(svcref["name"] == fullname and svcref["namespace"] == ns, "webhook calls the chart's Service")
        check(svcref["path"] == "/mutate", "webhook path /mutate")
        wport = next((p for p in svc["spec"]["ports"] if p["port"] == svcref["port"]), None)
        check(wport is not None and ports.get(wport["targetPort"]) == 9443,
              "webhook Service port targets container port 9443")
        check("--webhook-listen=0.0.0.0:9443" in cargs, "--webhook-listen on 9443")
        check(any(a.startswith("--injector-image=") for a in cargs), "--injector-image")
        check(wh["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                               "resources": ["pods"], "scope": "Namespaced"}], "webhook rule: CREATE pods")
        exprs = wh["namespaceSelector"]["matchExpressions"]
        excluded = {v for e in exprs if e["key"] == "kubernetes.io/metadata.name" and e["operator"] == "NotIn"
                    for v in e["values"]}
        check({"kube-system", ns} <= excluded, f"namespaceSelector excludes kube-system and {ns}")
        check(wh["objectSelector"] == {"matchLabels": {"mesh.weft.dev/inject": "enabled"}},
              "objectSelector mesh.weft.dev/inject=enabled")
        secret_vol = vols.get("webhook-tls", {}).get("secret", {}).get("secretName")
        cert_dir = mounts.get("webhook-tls")
        check(f"--webhook-cert={cert_dir}/tls.crt" in cargs and f"--webhook-key={cert_dir}/tls.key" in cargs,
              "--webhook-cert/--webhook-key point into the mounted Secret")
        host = f"{fullname}.{ns}.svc"
        if args.tls == "helm":
            secret = one("Secret")
            check(secret["metadata"]["name"] == secret_vol, "pod mounts the webhook Secret")
            check(secret["type"] == "kubernetes.io/tls", "Secret type kubernetes.io/tls")
            data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
            check(wh["clientConfig"].get("caBundle") == secret["data"]["ca.crt"],
                  "caBundle is the Secret's ca.crt (one CA per render)")
            check(pod["metadata"]["annotations"].get("checksum/webhook-tls")
                  == hashlib.sha256(data["tls.crt"]).hexdigest(),
                  "checksum/webhook-tls is the sha256 of the Secret's tls.crt")
            check("annotations" not in mwc["metadata"]
                  or "cert-manager.io/inject-ca-from" not in mwc["metadata"]["annotations"],
                  "no cert-manager annotation in helm TLS mode")
            with tempfile.TemporaryDirectory() as td:
                for k, v in data.items():
                    with open(os.path.join(td, k), "wb") as f:
                        f.write(v)
                ok = subprocess.run(["openssl", "verify", "-CAfile", os.path.join(td, "ca.crt"),
                                     "-purpose", "sslserver", "-verify_hostname", host,
                                     os.path.join(td, "tls.crt")], capture_output=True, text=True)
                check(ok.returncode == 0, f"tls.crt verifies against ca.crt for {host}: {ok.stdout}{ok.stderr}")
                pub_crt = subprocess.run(["openssl", "x509", "-noout", "-pubkey", "-in", os.path.join(td, "tls.crt")],
                                         capture_output=True, text=True).stdout
                pub_key = subprocess.run(["openssl", "pkey", "-pubout", "-in", os.path.join(td, "tls.key")],
                                         capture_output=True, text=True).stdout
                check(pub_crt and pub_crt == pub_key, "tls.key is the key of tls.crt")
            print(f"  webhook: helm-made TLS (openssl verify for {host}), caBundle, checksum")
        else:
            check("Secret" not in by_kind, "no chart-made Secret with cert-manager")
            cert = one("Certificate")
            ann = mwc["metadata"].get("annotations", {}).get("cert-manager.io/inject-ca-from")
            check(ann == f'{ns}/{cert["metadata"]["name"]}', "inject-ca-from names the Certificate")
            check("caBundle" not in wh["clientConfig"], "no caBundle with cert-manager (injected)")
            check(cert["spec"]["secretName"] == secret_vol, "Certificate's Secret is the mounted one")
            check(host in cert["spec"]["dnsNames"], f"Certificate covers {host}")
            ref = cert["spec"]["issuerRef"]
            if "Issuer" in by_kind:
                check(ref["name"] == one("Issuer")["metadata"]["name"] and ref.get("kind") == "Issuer",
                      "Certificate uses the chart's Issuer")
            print(f"  webhook: cert-manager Certificate for {host}, inject-ca-from")

    # -- CRDs (crds/, rendered with --include-crds)
    if args.crds:
        crds = by_kind.get("CustomResourceDefinition", [])
        names = {c["spec"]["names"]["plural"]: c for c in crds}
        for plural, kind in (("trafficroutes", "TrafficRoute"), ("trafficpolicies", "TrafficPolicy"),
                             ("externalservices", "ExternalService")):
            c = names.get(plural)
            if not check(c is not None, f"CRD {plural}.mesh.weft.dev"):
                continue
            check(c["metadata"]["name"] == f"{plural}.mesh.weft.dev", f"CRD name {plural}.mesh.weft.dev")
            check(c["spec"]["group"] == "mesh.weft.dev", f"{plural}: group mesh.weft.dev")
            check(c["spec"]["names"]["kind"] == kind, f"{plural}: kind {kind}")
            vs = {v["name"]: v for v in c["spec"]["versions"]}
            v1 = vs.get("v1alpha1")
            if check(v1 is not None, f"{plural}: version v1alpha1"):
                check(v1.get("served") is True, f"{plural}: v1alpha1 served")
                schema = v1.get("schema", {}).get("openAPIV3Schema")
                if check(schema is not None, f"{plural}: v1alpha1 has a schema"):
                    for e in structural_errors(schema, f"{plural}.v1alpha1"):
                        check(False, f"structural schema: {e}")
                check("status" in v1.get("subresources", {}),
                      f"{plural}: status subresource (RBAC grants {plural}/status)")
            check(sum(1 for v in vs.values() if v.get("storage")) == 1, f"{plural}: one storage version")
        print(f"  CRDs: {', '.join(sorted(names))}")


if __name__ == "__main__":
    main()
    if failures:
        print(f"FAILED {len(failures)} check(s):", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        sys.exit(1)
    print("  all checks passed")
