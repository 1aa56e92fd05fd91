{{/*
Chart name, truncated to 63 characters (the DNS label limit of Kubernetes names).
*/}}
{{- define "weft.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: <release>-weft, or just the release name when it already contains
the chart name. Also the name of the Service, so clients dial <fullname>.<namespace>.svc.
*/}}
{{- define "weft.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
chart label: name-version.
*/}}
{{- define "weft.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "weft.labels" -}}
helm.sh/chart: {{ include "weft.chart" . }}
{{ include "weft.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: weft
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: stable for the life of a release (a Deployment's selector is immutable).
*/}}
{{- define "weft.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end }}

{{/*
ServiceAccount the control plane runs as.
*/}}
{{- define "weft.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "weft.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: repository[:tag][@digest]; the tag defaults to the chart's appVersion.
Call with (dict "image" .Values.image "root" $).
*/}}
{{- define "weft.imageRef" -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion -}}
{{- if .image.digest -}}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end }}

{{/*
DNS name of the Service inside the cluster (without the cluster domain).
*/}}
{{- define "weft.serviceHost" -}}
{{- printf "%s.%s.svc" (include "weft.fullname" .) .Release.Namespace }}
{{- end }}

{{/*
Webhook serving certificate: Secret name, and where it is mounted in the pod.
*/}}
{{- define "weft.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "weft.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "weft.webhookCertDir" -}}
/etc/weft/webhook-tls
{{- end }}

{{- define "weft.registryDir" -}}
/etc/weft/registry
{{- end }}

{{/*
Whether the chart itself makes the webhook's certificate (Helm genCA/genSignedCert) rather
than cert-manager.
*/}}
{{- define "weft.webhookHelmTLS" -}}
{{- if and .Values.injector.enabled (not .Values.injector.certManager.enabled) }}true{{ end }}
{{- end }}

{{/*
The webhook's TLS material when the chart makes it, as JSON {"ca": ..., "crt": ..., "key": ...}
(PEM strings).

- An existing Secret (from an earlier install or upgrade) is looked up and reused, so the
  certificate and the webhook's caBundle do not change on every `helm upgrade` (and pods are
  not restarted for nothing). `helm template` and `--dry-run` cannot look up, and generate.
- Otherwise a CA and a serving certificate for the Service's DNS names are generated.

The result is memoised for the whole render (stored under .Values, which every template of
the chart shares), because generating twice would give the Secret, the webhook's caBundle and
the pod's checksum annotation three different CAs.
*/}}
{{- define "weft.webhookTLS" -}}
{{- if not (hasKey .Values "__weftWebhookTLS") }}
{{- $secretName := include "weft.webhookSecretName" . }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $secretName }}
{{- $data := dict }}
{{- if and $existing $existing.data }}
{{- $data = $existing.data }}
{{- end }}
{{- $tls := dict }}
{{- if and (hasKey $data "ca.crt") (hasKey $data "tls.crt") (hasKey $data "tls.key") }}
{{- $tls = dict "ca" (index $data "ca.crt" | b64dec) "crt" (index $data "tls.crt" | b64dec) "key" (index $data "tls.key" | b64dec) }}
{{- else }}
{{- $svc := include "weft.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $altNames := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) }}
{{- $days := int .Values.injector.tls.validityDays }}
{{- $ca := genCA (printf "%s-webhook-ca" $svc) $days }}
{{- $cert := genSignedCert (printf "%s.%s.svc" $svc $ns) nil $altNames $days $ca }}
{{- $tls = dict "ca" $ca.Cert "crt" $cert.Cert "key" $cert.Key }}
{{- end }}
{{- $_ := set .Values "__weftWebhookTLS" $tls }}
{{- end }}
{{- index .Values "__weftWebhookTLS" | toJson }}
{{- end }}

{{/*
Flags of the control plane.
*/}}
{{- define "weft.args" -}}
- --xds-listen=0.0.0.0:{{ .Values.ports.xds }}
- --admin-listen=0.0.0.0:{{ .Values.ports.admin }}
- --log-format={{ .Values.logFormat }}
{{- if .Values.kubernetes.enabled }}
- --kubernetes
- --kube-lease-namespace={{ .Release.Namespace }}
{{- with .Values.kubernetes.namespaces }}
- --kube-namespaces={{ join "," . }}
{{- end }}
{{- with .Values.kubernetes.serviceSelector }}
- --kube-service-selector={{ . }}
{{- end }}
{{- end }}
{{- if .Values.registryFile.enabled }}
- --registry-file={{ include "weft.registryDir" . }}/registry.yaml
{{- end }}
{{- if .Values.tls.enabled }}
- --tls-cert={{ include "weft.grpcCertDir" . }}/tls.crt
- --tls-key={{ include "weft.grpcCertDir" . }}/tls.key
- --tls-client-ca={{ include "weft.grpcCertDir" . }}/ca.crt
- --trust-domain={{ .Values.tls.trustDomain }}
{{- end }}
{{- if .Values.injector.enabled }}
- --webhook-listen=0.0.0.0:{{ .Values.ports.webhook }}
- --webhook-cert={{ include "weft.webhookCertDir" . }}/tls.crt
- --webhook-key={{ include "weft.webhookCertDir" . }}/tls.key
- --injector-image={{ include "weft.imageRef" (dict "image" .Values.injector.image "root" .) }}
- --injector-control-plane=http://{{ include "weft.fullname" . }}.{{ .Release.Namespace }}.svc:{{ .Values.ports.xds }}
{{- end }}
{{- with .Values.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Where the gRPC port's mTLS Secret is mounted; checks the tls values. */}}
{{- define "weft.grpcCertDir" -}}
{{- if not .Values.tls.secretName -}}
{{- fail "tls.enabled needs tls.secretName: a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt (docs/security.md)" -}}
{{- end -}}
{{- if .Values.injector.enabled -}}
{{- fail "tls.enabled needs injector.enabled=false: injected sidecars would dial the gRPC port without a workload certificate, and this chart cannot issue them one (docs/security.md)" -}}
{{- end -}}
/etc/weft/grpc-tls
{{- end -}}
