{{/* metadata.labels of an object; call with (dict "root" $ "labels" <the object's own extra labels>). */}}
{{- define "svd-monitoring.labels" -}}
{{- $own := dict "app.kubernetes.io/name" "svd-monitoring" "app.kubernetes.io/instance" .root.Release.Name "app.kubernetes.io/managed-by" .root.Release.Service "helm.sh/chart" (printf "%s-%s" .root.Chart.Name .root.Chart.Version) -}}
{{- toYaml (merge $own (deepCopy .root.Values.labels) (deepCopy (.labels | default dict))) -}}
{{- end -}}
