{{/* The RayJob's name: KubeRay derives the Ray cluster's and its services' names from it (≤ 63). */}}
{{- define "svd.fullname" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "svd.selectorLabels" -}}
app.kubernetes.io/name: svd
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The labels the chart owns: the user's `labels` and `podLabels` never replace them. */}}
{{- define "svd.ownLabels" -}}
{{ include "svd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
svd/job: {{ .Values.job }}
{{- end -}}

{{/* metadata.labels and, when any, metadata.annotations of an object the chart makes; call with
     (dict "root" $ "labels" <the object's own extra labels, or nil>). The chart's labels win over the user's
     `labels` (selectors depend on them). */}}
{{- define "svd.metadata" -}}
{{- $labels := merge (fromYaml (include "svd.ownLabels" .root)) (deepCopy .root.Values.labels) -}}
labels:
  {{- toYaml (merge $labels (deepCopy (.labels | default dict))) | nindent 2 }}
{{- with .root.Values.annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A pod template's metadata; call with (dict "root" $ "component" "ray-worker"). Pods get podLabels, not
     the objects' `labels`: a queue label on pods would make Kueue's pod integration queue each pod alone. */}}
{{- define "svd.podMetadata" -}}
{{- $own := merge (fromYaml (include "svd.ownLabels" .root)) (dict "app.kubernetes.io/component" .component) -}}
labels:
  {{- toYaml (merge $own (deepCopy .root.Values.podLabels)) | nindent 2 }}
{{- with .root.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "svd.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The run's settings file (the ConfigMap): the user's train.config plus what the chart must decide. */}}
{{- define "svd.runConfig" -}}
{{- $config := deepCopy .Values.train.config -}}
{{- $_ := set $config "job_name" .Release.Name -}}
{{- $metrics := get $config "metrics" | default dict -}}
{{- $_ := set $metrics "port" (int .Values.metrics.port) -}}
{{- $_ := set $config "metrics" $metrics -}}
{{- $cluster := get $config "cluster" | default dict -}}
{{- $_ := set $cluster "name" "release" -}}
{{- $_ := set $cluster "gpus" (gt (int .Values.workers.gpus) 0) -}}
{{- $_ := set $config "cluster" $cluster -}}
{{- $checkpoint := get $config "checkpoint" | default dict -}}
{{- if and .Values.s3.bucket (not (hasKey $checkpoint "run_dir")) -}}
{{- $_ := set $checkpoint "run_dir" (printf "s3://%s/runs/%s" .Values.s3.bucket .Release.Name) -}}
{{- end -}}
{{- if $checkpoint -}}
{{- $_ := set $config "checkpoint" $checkpoint -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The command the Ray head runs (key=value arguments; the schema keeps values free of shell syntax). */}}
{{- define "svd.entrypoint" -}}
{{- if eq .Values.job "train" -}}
python jobs/launch.py launcher=ray stage={{ .Values.train.stage }} model={{ .Values.train.model }} cluster=release nodes={{ .Values.train.nodes }} gpus_per_node={{ .Values.workers.gpus }}
{{- else if eq .Values.job "evaluate" -}}
{{- $ranks := max 1 (int .Values.workers.gpus) -}}
python jobs/evaluate.py launcher=ray run={{ .Values.evaluate.run }} eval={{ .Values.evaluate.protocol }} watch={{ .Values.evaluate.watch }} nodes={{ .Values.evaluate.workers }} ranks_per_node={{ $ranks }} cpus_per_rank={{ max 1 (div (int .Values.workers.cpu) $ranks) }} metrics_port={{ .Values.metrics.port }}
{{- range $key, $value := .Values.evaluate.settings }} {{ $key }}={{ $value }}{{ end }}
{{- else -}}
python jobs/curate.py launcher=ray shards={{ .Values.curate.shards }} input={{ .Values.curate.input }} output={{ .Values.curate.output }}
{{- range $key, $value := .Values.curate.settings }} {{ $key }}={{ $value }}{{ end }}
{{- end -}}
{{- end -}}

{{/* Where the run's settings file appears in the image: the cluster group `release` of jobs/conf/. */}}
{{- define "svd.runConfigPath" -}}
/app/jobs/conf/cluster/release.yaml
{{- end -}}

{{/* rayStartParams of a group; call with (dict "root" $ "group" <head or workers values>). Ray's object store
     and metrics port are set explicitly, so that /dev/shm is sized for the one and the PodMonitor finds the
     other. */}}
{{- define "svd.rayStartParams" -}}
object-store-memory: {{ mul .group.objectStoreGiB 1073741824 | quote }}
metrics-export-port: {{ .root.Values.metrics.rayPort | quote }}
{{- end -}}

{{/* The environment of the Ray containers; call with (dict "root" $ "workers" true|false). */}}
{{- define "svd.env" -}}
{{- with .root -}}
- {name: TMPDIR, value: /tmp}
- {name: HOME, value: /tmp/home}
- {name: PYTHONDONTWRITEBYTECODE, value: "1"}
- {name: RAY_USAGE_STATS_ENABLED, value: "0"}
- {name: AWS_REGION, value: {{ .Values.s3.region | quote }}}
{{- with .Values.s3.endpoint }}
- {name: AWS_ENDPOINT_URL, value: {{ . | quote }}}
{{- end }}
{{- with .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom: {secretKeyRef: {name: {{ . }}, key: {{ $.root.Values.s3.accessKeyIdKey }}}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ . }}, key: {{ $.root.Values.s3.secretAccessKeyKey }}}}
{{- end }}
{{- if and $.workers .Values.workers.cache.enabled }}
- {name: HF_HOME, value: {{ printf "%s/huggingface" .Values.workers.cache.mountPath | quote }}}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A group's volume mounts; call with (dict "root" $ "group" <values> "workers" true|false). */}}
{{- define "svd.volumeMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: dshm, mountPath: /dev/shm}
{{- if eq .root.Values.job "train" }}
- name: run-config
  mountPath: {{ include "svd.runConfigPath" .root }}
  subPath: release.yaml
  readOnly: true
{{- end }}
{{- if and .workers .root.Values.workers.cache.enabled }}
- {name: cache, mountPath: {{ .root.Values.workers.cache.mountPath }}}
{{- end }}
{{- with .group.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A group's volumes, and only its own; call with (dict "root" $ "group" <values> "workers" true|false).
     /dev/shm holds Ray's object store and the rest of the group's shared memory. */}}
{{- define "svd.volumes" -}}
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir: {medium: Memory, sizeLimit: {{ printf "%dGi" (add .group.objectStoreGiB .group.shmExtraGiB) }}}
{{- if eq .root.Values.job "train" }}
- name: run-config
  configMap: {name: {{ include "svd.fullname" .root }}-run}
{{- end }}
{{- if and .workers .root.Values.workers.cache.enabled }}
- name: cache
  {{- toYaml (.root.Values.workers.cache.volume | default (dict "emptyDir" dict)) | nindent 2 }}
{{- end }}
{{- with .group.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by head, workers and the submitter. */}}
{{- define "svd.podSpec" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Where a group's pods may run; call with a group's values (head or workers). */}}
{{- define "svd.placement" -}}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The workers' container securityContext: the chart's, plus IPC_LOCK when workers.ipcLock (RDMA). */}}
{{- define "svd.workerSecurityContext" -}}
{{- $context := deepCopy .Values.securityContext -}}
{{- if .Values.workers.ipcLock -}}
{{- $capabilities := get $context "capabilities" | default dict -}}
{{- $_ := set $capabilities "add" (list "IPC_LOCK") -}}
{{- $_ := set $context "capabilities" $capabilities -}}
{{- end -}}
{{- toYaml $context -}}
{{- end -}}

{{/* The workers' resources, requested and limited alike (extended resources must be). */}}
{{- define "svd.workerResources" -}}
{{- $resources := dict "cpu" (toString .Values.workers.cpu) "memory" .Values.workers.memory -}}
{{- if gt (int .Values.workers.gpus) 0 -}}
{{- $_ := set $resources "nvidia.com/gpu" .Values.workers.gpus -}}
{{- end -}}
{{- $resources = merge $resources (deepCopy .Values.workers.extraResources) -}}
requests:
  {{- toYaml $resources | nindent 2 }}
limits:
  {{- toYaml $resources | nindent 2 }}
{{- end -}}
