{{- define "kvops.adapter.name" -}}
{{- printf "%s-prometheus-adapter" (include "kvops.fullname" .) -}}
{{- end -}}

{{- define "kvops.adapter.selectorLabels" -}}
app.kubernetes.io/name: prometheus-adapter
app.kubernetes.io/component: metrics-adapter
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvops.adapter.enabled" -}}
{{- if eq .Values.autoscaling.mode "prometheus-adapter" -}}true{{- end -}}
{{- end -}}
