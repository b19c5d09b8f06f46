{{/*
Names, labels and the pieces every CollaFuse pod shares.
*/}}

{{- define "collafuse.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix: release name, plus the chart name unless the release name contains it.
Capped at 36 characters so that "<fullname>-site-<id(20)>-state" stays a valid 63-character name.
*/}}
{{- define "collafuse.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 36 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 36 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 36 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "collafuse.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels. Call with (dict "root" $ "component" "coordinator"). */}}
{{- define "collafuse.selectorLabels" -}}
app.kubernetes.io/name: {{ include "collafuse.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .site }}
collafuse.io/site: {{ . }}
{{- end }}
{{- end }}

{{/* Common labels. Call with (dict "root" $ "component" "coordinator" ["site" "site-a"]). */}}
{{- define "collafuse.labels" -}}
helm.sh/chart: {{ include "collafuse.chart" .root }}
{{ include "collafuse.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: collafuse
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Resource name of a component: <fullname>-<suffix>. Call with (dict "root" $ "suffix" "coordinator"). */}}
{{- define "collafuse.componentName" -}}
{{- printf "%s-%s" (include "collafuse.fullname" .root) .suffix | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* An image reference from {repository, tag, digest}. Call with (dict "image" .Values.image "default" .Chart.AppVersion). */}}
{{- define "collafuse.imageRef" -}}
{{- $tag := default .default .image.tag }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "collafuse.image" -}}
{{ include "collafuse.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) }}
{{- end }}

{{- define "collafuse.isCentral" -}}
{{- if eq .Values.mode "central" }}true{{ end }}
{{- end }}

{{/* Resources with the GPU limit added. Call with (dict "resources" ... "gpu" N). */}}
{{- define "collafuse.resources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if gt (int .gpu) 0 }}
{{- $limits := deepCopy (default dict $res.limits) }}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpu) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{- define "collafuse.authSecretName" -}}
{{- default (include "collafuse.componentName" (dict "root" . "suffix" "auth")) .Values.auth.existingSecret }}
{{- end }}

{{- define "collafuse.minioSecretName" -}}
{{- default (include "collafuse.componentName" (dict "root" . "suffix" "minio")) .Values.minio.auth.existingSecret }}
{{- end }}

{{- define "collafuse.coordinatorUrl" -}}
{{- if eq .Values.mode "central" }}
{{- printf "http://%s:%v" (include "collafuse.componentName" (dict "root" . "suffix" "coordinator")) .Values.coordinator.port }}
{{- else }}
{{- required "remote.coordinatorUrl is required in mode: site" .Values.remote.coordinatorUrl }}
{{- end }}
{{- end }}

{{- define "collafuse.serverUrl" -}}
{{- if eq .Values.mode "central" }}
{{- printf "http://%s:%v" (include "collafuse.componentName" (dict "root" . "suffix" "server")) .Values.server.port }}
{{- else }}
{{- required "remote.serverUrl is required in mode: site" .Values.remote.serverUrl }}
{{- end }}
{{- end }}

{{/* The store's S3 environment (coordinator, server roles). */}}
{{- define "collafuse.storeEnv" -}}
- name: COLLAFUSE_STORE
  value: {{ printf "s3://%s/%s" .Values.store.bucket .Values.store.prefix | trimSuffix "/" | quote }}
{{- if .Values.minio.enabled }}
- name: COLLAFUSE_S3_ENDPOINT
  value: {{ printf "%s:9000" (include "collafuse.componentName" (dict "root" . "suffix" "minio")) | quote }}
- name: COLLAFUSE_S3_SECURE
  value: "false"
- name: COLLAFUSE_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "collafuse.minioSecretName" . }}
      key: root-user
- name: COLLAFUSE_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "collafuse.minioSecretName" . }}
      key: root-password
{{- else }}
- name: COLLAFUSE_S3_ENDPOINT
  value: {{ required "externalS3.endpoint is required when minio.enabled is false" .Values.externalS3.endpoint | quote }}
- name: COLLAFUSE_S3_SECURE
  value: {{ .Values.externalS3.secure | toString | quote }}
- name: COLLAFUSE_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ default (include "collafuse.componentName" (dict "root" . "suffix" "s3")) .Values.externalS3.existingSecret }}
      key: {{ ternary .Values.externalS3.accessKeyKey "access-key" (ne .Values.externalS3.existingSecret "") }}
- name: COLLAFUSE_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ default (include "collafuse.componentName" (dict "root" . "suffix" "s3")) .Values.externalS3.existingSecret }}
      key: {{ ternary .Values.externalS3.secretKeyKey "secret-key" (ne .Values.externalS3.existingSecret "") }}
{{- end }}
{{- end }}

{{/* Environment every CollaFuse service gets. Call with (dict "root" $ "threads" N). */}}
{{- define "collafuse.commonEnv" -}}
- name: COLLAFUSE_CONFIG
  value: /etc/collafuse/config/federation.json
- name: COLLAFUSE_TORCH_THREADS
  value: {{ .threads | quote }}
- name: COLLAFUSE_LOG_LEVEL
  value: {{ .root.Values.logLevel | quote }}
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
{{- end }}

{{- define "collafuse.adminTokenEnv" -}}
- name: COLLAFUSE_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "collafuse.authSecretName" . }}
      key: admin-token
{{- end }}

{{/* HTTP probes on the service port. Call with (dict "port" "http"). */}}
{{- define "collafuse.probes" -}}
startupProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: 5
  failureThreshold: 60
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: 15
  timeoutSeconds: 3
  failureThreshold: 4
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
{{- end }}

{{/* Pod-level fields every CollaFuse pod shares. Call with (dict "root" $ "component" "server" "values" .Values.server). */}}
{{- define "collafuse.podCommon" -}}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Volumes every CollaFuse pod mounts: /tmp and the federation config. */}}
{{- define "collafuse.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: config
  configMap:
    name: {{ include "collafuse.componentName" (dict "root" . "suffix" "config") }}
{{- end }}

{{- define "collafuse.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: config
  mountPath: /etc/collafuse/config
  readOnly: true
{{- end }}

{{/* Whether a monitoring CR is rendered: (dict "root" $ "setting" .enabled "kind" "ServiceMonitor"). */}}
{{- define "collafuse.crEnabled" -}}
{{- $s := toString .setting }}
{{- if eq $s "true" }}true
{{- else if and (eq $s "auto") (.root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" .kind)) }}true
{{- end }}
{{- end }}

{{/* The effective settings of one site: siteDefaults overridden by the entry. */}}
{{/*
Keys set on the entry replace the defaults (false and 0 included); `data` and `state` merge one
level deep so that an entry can set only `data.existingClaim`. Returns YAML: use with fromYaml.
*/}}
{{- define "collafuse.siteValues" -}}
{{- $site := deepCopy .root.Values.siteDefaults }}
{{- range $k, $v := .site }}
{{- if and (has $k (list "data" "state")) (kindIs "map" $v) }}
{{- $merged := deepCopy (get $site $k) }}
{{- range $k2, $v2 := $v }}
{{- $_ := set $merged $k2 $v2 }}
{{- end }}
{{- $_ := set $site $k $merged }}
{{- else }}
{{- $_ := set $site $k $v }}
{{- end }}
{{- end }}
{{- if not (hasKey $site "deploy") }}
{{- $_ := set $site "deploy" true }}
{{- end }}
{{- toYaml $site }}
{{- end }}

{{/* serviceAccountName for a component (the namespace's default one when serviceAccount.create is false). */}}
{{- define "collafuse.serviceAccountName" -}}
{{- if .root.Values.serviceAccount.create }}
{{- include "collafuse.componentName" (dict "root" .root "suffix" .component) }}
{{- else }}
{{- print "default" }}
{{- end }}
{{- end }}
