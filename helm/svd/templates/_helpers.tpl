{{/* The RayJob's name: KubeRay derives the Ray cluster's and its services' names from it (≤ 63). */}}
{{- define "svd.fullname" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "svd.selectorLabels" -}}
app.kubernetes.io/name: svd
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "svd.labels" -}}
{{ include "svd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
svd/job: {{ .Values.job }}
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
{{- else -}}
python jobs/curate.py launcher=ray shards={{ .Values.curate.shards }} input={{ .Values.curate.input }} output={{ .Values.curate.output }}
{{- range $key, $value := .Values.curate.settings }} {{ $key }}={{ $value }}{{ end }}
{{- end -}}
{{- end -}}

{{/* Where the run's settings file appears in the image: the cluster group `release` of jobs/conf/. */}}
{{- define "svd.runConfigPath" -}}
/app/jobs/conf/cluster/release.yaml
{{- end -}}

{{- define "svd.env" -}}
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
  valueFrom: {secretKeyRef: {name: {{ . }}, key: {{ $.Values.s3.accessKeyIdKey }}}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ . }}, key: {{ $.Values.s3.secretAccessKeyKey }}}}
{{- end }}
{{- if .Values.workers.cache.enabled }}
- {name: HF_HOME, value: {{ printf "%s/huggingface" .Values.workers.cache.mountPath | quote }}}
{{- end }}
{{- end -}}

{{- define "svd.volumeMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: dshm, mountPath: /dev/shm}
{{- if eq .Values.job "train" }}
- name: run-config
  mountPath: {{ include "svd.runConfigPath" . }}
  subPath: release.yaml
  readOnly: true
{{- end }}
{{- if .Values.workers.cache.enabled }}
- {name: cache, mountPath: {{ .Values.workers.cache.mountPath }}}
{{- end }}
{{- end -}}

{{/* The pods' volumes; call with (dict "root" $ "shmSize" <quantity>). */}}
{{- define "svd.volumes" -}}
{{- with .root -}}
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir: {medium: Memory, sizeLimit: {{ $.shmSize }}}
{{- if eq .Values.job "train" }}
- name: run-config
  configMap: {name: {{ include "svd.fullname" . }}-run}
{{- end }}
{{- if .Values.workers.cache.enabled }}
- name: cache
  {{- toYaml (.Values.workers.cache.volume | default (dict "emptyDir" dict)) | nindent 2 }}
{{- end }}
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
