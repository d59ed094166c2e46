{{/* Base name of every object: the release name, or release-chart when it does not contain the chart name. */}}
{{- define "k-vswitch.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "k-vswitch.agent" -}}{{ include "k-vswitch.fullname" . }}-agent{{- end -}}
{{- define "k-vswitch.controller" -}}{{ include "k-vswitch.fullname" . }}-controller{{- end -}}
{{- define "k-vswitch.cleanup" -}}{{ include "k-vswitch.fullname" . }}-cleanup{{- end -}}

{{- define "k-vswitch.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: k-vswitch
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component; pass (dict "root" $ "component" "agent"). */}}
{{- define "k-vswitch.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "k-vswitch.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The file kopf's liveness endpoint answers on; both probes use it. */}}
{{- define "k-vswitch.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: probes
  initialDelaySeconds: 10
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
readinessProbe:
  httpGet:
    path: /healthz
    port: probes
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 3
{{- end -}}

{{/* Environment shared by the agent and the controller. */}}
{{- define "k-vswitch.commonEnv" -}}
- name: POD_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: KVSWITCH_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: HOME
  value: /tmp
{{- if .Values.apiServer.host }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.apiServer.host | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.apiServer.port | quote }}
{{- end }}
{{- end -}}

{{/* "start size" of an IPv4 CIDR (already checked by the schema) as integers, for the checks below. */}}
{{- define "k-vswitch.cidrRange" -}}
{{- $parts := splitList "/" . -}}
{{- $o := splitList "." (first $parts) -}}
{{- $start := add (mul (atoi (index $o 0)) 16777216) (mul (atoi (index $o 1)) 65536) (mul (atoi (index $o 2)) 256) (atoi (index $o 3)) -}}
{{- $size := 1 -}}
{{- range until (sub 32 (atoi (last $parts)) | int) }}{{ $size = mul $size 2 }}{{ end -}}
{{- printf "%d %d" $start $size -}}
{{- end -}}

{{/* Checks across values that a JSON schema cannot express; they fail `helm install` early. */}}
{{- define "k-vswitch.validate" -}}
{{- $ports := dict "agent.probePort" .Values.agent.probePort "controller.probePort" .Values.controller.probePort -}}
{{- if .Values.metrics.enabled -}}
{{- $_ := set $ports "metrics.agentPort" .Values.metrics.agentPort -}}
{{- $_ := set $ports "metrics.controllerPort" .Values.metrics.controllerPort -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $name := keys $ports | sortAlpha -}}
{{- $port := toString (int (index $ports $name)) -}}
{{- if hasKey $seen $port -}}
{{- fail (printf "%s and %s are both %s: the agents and the controller use the node's network, so they need different ports" (index $seen $port) $name $port) -}}
{{- end -}}
{{- $_ := set $seen $port $name -}}
{{- end -}}
{{- $ranges := dict -}}
{{- range $key := list "clusterCIDR" "serviceCIDR" -}}
{{- $cidr := index $.Values $key -}}
{{- $r := splitList " " (include "k-vswitch.cidrRange" $cidr) -}}
{{- $start := atoi (index $r 0) -}}
{{- $size := atoi (index $r 1) -}}
{{- if ne (mod $start $size) 0 -}}
{{- fail (printf "%s %s has host bits set: the address must be the first of its /%s block" $key $cidr (last (splitList "/" $cidr))) -}}
{{- end -}}
{{- $_ := set $ranges $key (list $start (add $start $size)) -}}
{{- end -}}
{{- $c := $ranges.clusterCIDR -}}
{{- $s := $ranges.serviceCIDR -}}
{{- if and (lt (index $c 0) (index $s 1)) (lt (index $s 0) (index $c 1)) -}}
{{- fail (printf "clusterCIDR %s and serviceCIDR %s overlap: pod and service addresses must be disjoint" .Values.clusterCIDR .Values.serviceCIDR) -}}
{{- end -}}
{{- end -}}

{{/* KVSWITCH_METRICS_PORT of a daemon: its port, or 0 (off) when metrics are disabled. */}}
{{- define "k-vswitch.metricsPort" -}}
{{- if .root.Values.metrics.enabled -}}{{ int .port }}{{- else -}}0{{- end -}}
{{- end -}}

{{/* Prometheus' annotation-based discovery, on a daemon's pod template. */}}
{{- define "k-vswitch.metricsAnnotations" -}}
{{- if and .root.Values.metrics.enabled .root.Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ int .port | quote }}
prometheus.io/path: /metrics
{{- end -}}
{{- end -}}
