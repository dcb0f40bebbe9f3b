{{/* The prefix of every object name: the release name, plus "-kvops" unless it holds it. */}}
{{- define "kvops.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kvops.operator.name" -}}
{{- printf "%s-operator" (include "kvops.fullname" .) -}}
{{- end -}}

{{- define "kvops.serviceAccountName" -}}
{{- default (include "kvops.operator.name" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* Labels on every object the chart renders. */}}
{{- define "kvops.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/part-of: kvops
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* What selects the operator's pod; the same labels `kvops manifests` gives it. */}}
{{- define "kvops.operator.selectorLabels" -}}
app.kubernetes.io/name: kvops-operator
app.kubernetes.io/component: operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvops.operator.image" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{/* Prometheus Operator objects only where the cluster serves their API. */}}
{{- define "kvops.monitoringApi" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}

{{/* The restricted Pod Security contexts of operator/pods.py (uid 10001: the image's user). */}}
{{- define "kvops.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "kvops.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}
