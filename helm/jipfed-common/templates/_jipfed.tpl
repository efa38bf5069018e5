{{/*
Shared by the site and central workflow charts (both link this templates folder).
Values contract: see either chart's values.yaml.
*/}}

{{- define "jipfed.name" -}}
{{- printf "%s-%s" .Release.Name .Values.role | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "jipfed.labels" -}}
app.kubernetes.io/name: jipfed-{{ .Values.role }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: jip-federated
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end -}}

{{/* The worker image; a tag is required and `latest` is refused (pods must be reproducible). */}}
{{- define "jipfed.image" -}}
{{- $tag := required "image.tag is required (the worker image version, never latest)" .Values.image.tag | toString -}}
{{- if eq $tag "latest" -}}
{{- fail "image.tag must be a pinned version, not latest" -}}
{{- end -}}
{{- $repo := required "image.repository is required" .Values.image.repository -}}
{{- if .Values.image.registry -}}
{{- printf "%s/%s:%s" .Values.image.registry $repo $tag -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* Secret env of the pods (names as jipfed.tasks.execution.SECRET_ENV): references only. */}}
{{- define "jipfed.secretEnv" -}}
{{- $envNames := dict "central_token" "JIPFED_CENTRAL_TOKEN" "pacs_password" "JIPFED_PACS_PASSWORD" "store_secret_key" "JIPFED_STORE_SECRET_KEY" -}}
{{- range $name, $ref := .Values.secrets }}
{{- if $ref.name }}
- name: {{ index $envNames $name | required (printf "secrets.%s is not a known secret (known: %s)" $name (keys $envNames | sortAlpha | join ", ")) }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name | quote }}
      key: {{ required (printf "secrets.%s.key is required" $name) $ref.key | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The secrets that are set, as jipfed's execution config wants them: {name: {name, key}}. */}}
{{- define "jipfed.secretRefs" -}}
{{- $refs := dict -}}
{{- range $name, $ref := .Values.secrets }}
{{- if $ref.name }}
{{- $_ := set $refs $name (dict "name" $ref.name "key" $ref.key) -}}
{{- end }}
{{- end }}
{{- toYaml $refs -}}
{{- end -}}

{{/* Requests and limits of the test pod; the GPU only when gpu.enabled. */}}
{{- define "jipfed.podResources" -}}
{{- $resources := deepCopy .Values.resources -}}
{{- if .Values.gpu.enabled -}}
{{- $_ := set $resources.limits .Values.gpu.resourceName (.Values.gpu.count | int) -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/*
`helm test`'s pod: the worker image with the volumes, secrets, resources and GPU scheduling the
task pods get (jipfed.operators builds those from the Variable's execution config, see
jipfed.execution below), running `jipfed --help`. Volumes follow Kaapana's layout.
*/}}
{{- define "jipfed.pod" -}}
apiVersion: v1
kind: Pod
metadata:
  name: {{ include "jipfed.name" . }}-task
  labels:
    {{- include "jipfed.labels" . | nindent 4 }}
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  {{- with .Values.image.pullSecret }}
  imagePullSecrets:
    - name: {{ . | quote }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ .Values.securityContext.runAsUser | int }}
    runAsGroup: {{ .Values.securityContext.runAsGroup | int }}
    fsGroup: {{ .Values.securityContext.fsGroup | int }}
    seccompProfile:
      type: RuntimeDefault
  {{- if .Values.gpu.enabled }}
  {{- with .Values.gpu.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.gpu.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
  containers:
    - name: base
      image: {{ include "jipfed.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["--help"]
      {{- with include "jipfed.secretEnv" . }}
      env:
        {{- . | nindent 8 }}
      {{- end }}
      resources:
        {{- include "jipfed.podResources" . | nindent 8 }}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop: ["ALL"]
      volumeMounts:
        - name: workflow-data
          mountPath: {{ .Values.volumes.dataMountPath | quote }}
        - name: models
          mountPath: {{ .Values.volumes.modelsMountPath | quote }}
        - name: dshm
          mountPath: /dev/shm
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: workflow-data
      persistentVolumeClaim:
        claimName: {{ .Values.volumes.dataClaim | quote }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ .Values.volumes.modelsClaim | quote }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.volumes.shmSize | quote }}
    - name: tmp
      emptyDir: {}
{{- end -}}


{{/*
The identity Variable's execution config (schema: jipfed.tasks.execution.ExecutionConfig).
The GPU, when enabled, goes to gpu.step only (site: train, central: aggregate).
*/}}
{{- define "jipfed.execution" -}}
mode: {{ .Values.execution.mode | quote }}
image: {{ include "jipfed.image" . | quote }}
namespace: {{ .Values.execution.namespace | quote }}
startup_timeout_s: {{ .Values.execution.startupTimeoutS | int }}
image_pull_policy: {{ .Values.image.pullPolicy | quote }}
{{- with .Values.image.pullSecret }}
image_pull_secrets: [{{ . | quote }}]
{{- end }}
resources:
  {{- toYaml .Values.resources | nindent 2 }}
{{- if .Values.gpu.enabled }}
steps:
  {{ required "gpu.step is required (the step that gets the GPU)" .Values.gpu.step }}:
    gpu: {{ .Values.gpu.count | int }}
    {{- with .Values.gpu.nodeSelector }}
    node_selector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.gpu.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
volumes:
  data:
    claim: {{ .Values.volumes.dataClaim | quote }}
    mount_path: {{ .Values.volumes.dataMountPath | quote }}
    airflow_path: {{ .Values.volumes.dataAirflowPath | quote }}
  models:
    claim: {{ .Values.volumes.modelsClaim | quote }}
    mount_path: {{ .Values.volumes.modelsMountPath | quote }}
secrets:
  {{- include "jipfed.secretRefs" . | nindent 2 }}
{{- end -}}


{{/* Airflow Connections for the endpoints, without credentials (`airflow connections import`). */}}
{{- define "jipfed.connections" -}}
{{- $conns := dict -}}
{{- with .Values.endpoints.pacs }}{{ if .url }}
{{- $_ := set $conns "jipfed_pacs_default" (dict "conn_type" "jipfed_pacs" "host" .url "extra" (dict "dicomweb_path" .dicomwebPath)) -}}
{{- end }}{{ end }}
{{- with .Values.endpoints.central }}{{ if .url }}
{{- $_ := set $conns "jipfed_central_default" (dict "conn_type" "http" "host" .url) -}}
{{- end }}{{ end }}
{{- with .Values.endpoints.modelStore }}{{ if .endpointUrl }}
{{- $_ := set $conns "jipfed_model_store_default" (dict "conn_type" "aws" "extra" (dict "endpoint_url" .endpointUrl "bucket" .bucket "region_name" .region)) -}}
{{- end }}{{ end }}
{{- toJson $conns -}}
{{- end -}}
