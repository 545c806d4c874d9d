{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "qwen-image-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every object name, at most 40 characters (the InferenceServices' names are cut
further: see isvcName).
*/}}
{{- define "qwen-image-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Value of the helm.sh/chart label.
*/}}
{{- define "qwen-image-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the release's pods (stable across upgrades).
*/}}
{{- define "qwen-image-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qwen-image-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Recommended labels of every object.
*/}}
{{- define "qwen-image-serve.labels" -}}
helm.sh/chart: {{ include "qwen-image-serve.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "qwen-image-serve.releaseLabels" . }}
{{- end }}

{{/*
The labels that do not change from one chart version to the next. The InferenceServices carry
only these: KServe copies them onto the predictor pods, and a changed pod label restarts a
predictor (minutes of loading weights, and a spare GPU for the rollout).
*/}}
{{- define "qwen-image-serve.releaseLabels" -}}
{{ include "qwen-image-serve.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: qwen-image-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Adapter names and labels.
*/}}
{{- define "qwen-image-serve.adapter.fullname" -}}
{{- printf "%s-adapter" (include "qwen-image-serve.fullname" .) }}
{{- end }}

{{- define "qwen-image-serve.adapter.selectorLabels" -}}
{{ include "qwen-image-serve.selectorLabels" . }}
app.kubernetes.io/component: adapter
{{- end }}

{{- define "qwen-image-serve.adapter.labels" -}}
{{ include "qwen-image-serve.labels" . }}
app.kubernetes.io/component: adapter
{{- end }}

{{- define "qwen-image-serve.adapter.serviceAccountName" -}}
{{- if .Values.adapter.serviceAccount.create }}
{{- default (include "qwen-image-serve.adapter.fullname" .) .Values.adapter.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.adapter.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Secret and key holding the adapter's API key; empty when no key is configured.
*/}}
{{- define "qwen-image-serve.adapter.apiKeySecretName" -}}
{{- if .Values.adapter.apiKey.existingSecret }}
{{- .Values.adapter.apiKey.existingSecret }}
{{- else if .Values.adapter.apiKey.value }}
{{- printf "%s-api-key" (include "qwen-image-serve.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Image reference from an image block; call with (dict "image" <block> "root" $).
*/}}
{{- define "qwen-image-serve.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/*
"true" when the InferenceServices run in Knative mode (also under its legacy name).
*/}}
{{- define "qwen-image-serve.knative" -}}
{{- if has .Values.deploymentMode (list "Knative" "Serverless") }}true{{ end }}
{{- end }}

{{/*
The predictor components the release deploys, in a fixed order.
*/}}
{{- define "qwen-image-serve.components" -}}
{{- $enabled := list }}
{{- range $component := list "generation" "edit" }}
{{- if (index $.Values $component).enabled }}
{{- $enabled = append $enabled $component }}
{{- end }}
{{- end }}
{{- join " " $enabled }}
{{- end }}

{{/*
The models the adapter serves, in a fixed order: each enabled component, and each component
whose predictor runs elsewhere (adapter.predictorUrls names it).
*/}}
{{- define "qwen-image-serve.servedComponents" -}}
{{- $served := list }}
{{- range $component := list "generation" "edit" }}
{{- if or (index $.Values $component).enabled (index $.Values.adapter.predictorUrls $component) }}
{{- $served = append $served $component }}
{{- end }}
{{- end }}
{{- join " " $served }}
{{- end }}

{{/*
A predictor's settings as YAML: `predictor`, then each top-level key of the component's
`overrides` replacing the shared one whole. Call with (dict "root" $ "component" "edit")
and read it back with fromYaml.
*/}}
{{- define "qwen-image-serve.predictorValues" -}}
{{- $values := deepCopy .root.Values.predictor }}
{{- range $key, $value := (index .root.Values .component).overrides }}
{{- $_ := set $values $key $value }}
{{- end }}
{{- toYaml $values }}
{{- end }}

{{/*
The speed modes a predictor runs with that are not the defaults, as one line ("" for none).
Call with (dict "root" $ "component" "edit").
*/}}
{{- define "qwen-image-serve.speedModes" -}}
{{- $p := fromYaml (include "qwen-image-serve.predictorValues" .) }}
{{- $speed := $p.performance }}
{{- $lora := (index .root.Values .component).lora }}
{{- $modes := list }}
{{- if gt (int $speed.maxBatchSize) 1 }}
{{- $modes = append $modes (printf "batches of up to %d images" (int $speed.maxBatchSize)) }}
{{- end }}
{{- if ne $speed.compile "auto" }}
{{- $modes = append $modes (printf "compile %s" $speed.compile) }}
{{- end }}
{{- if ne $speed.quantization "none" }}
{{- $modes = append $modes $speed.quantization }}
{{- end }}
{{- if ne $speed.cache "none" }}
{{- $modes = append $modes (printf "cache %s" $speed.cache) }}
{{- end }}
{{- if and $lora $lora.source }}
{{- $modes = append $modes (printf "LoRA %s" $lora.source) }}
{{- end }}
{{- join ", " $modes }}
{{- end }}

{{/*
Name of a predictor's InferenceService; call with (dict "root" $ "component" "generation").
At most 48 characters (also the schema's limit on generation.name / edit.name): KServe labels
its pods app=isvc.<name>-predictor, and a label value is at most 63.
*/}}
{{- define "qwen-image-serve.isvcName" -}}
{{- $spec := index .root.Values .component }}
{{- $default := printf "%s-%s" (include "qwen-image-serve.fullname" .root) .component | trunc 48 | trimSuffix "-" }}
{{- default $default $spec.name }}
{{- end }}

{{/*
"true" when a predictor downloads its weights into an emptyDir on the node, else empty; call
with (dict "root" $ "component" "edit"). Storage kind huggingFace without a cache claim
downloads into /cache; kind storageUri through KServe's storage initializer, into KServe's
own emptyDir at /mnt/models, except a pvc:// claim (mounted), an oci:// image (a modelcar)
and a URI of the chart's LocalModelCache (KServe mounts the node's copy).
*/}}
{{- define "qwen-image-serve.downloadsToNode" -}}
{{- $storage := (index .root.Values .component).storage }}
{{- if eq $storage.kind "huggingFace" }}
{{- if not $storage.huggingFace.cacheClaim.claimName }}true{{ end }}
{{- else if eq $storage.kind "storageUri" }}
{{- $mounted := or (hasPrefix "pvc://" $storage.storageUri.uri) (hasPrefix "oci://" $storage.storageUri.uri) }}
{{- if not (or $mounted (include "qwen-image-serve.localModelCache" .)) }}true{{ end }}
{{- end }}
{{- end }}

{{/*
Fails unless a WxH size is one a predictor serves: each side a multiple of 16 from 256 (the
predictors' least size, QWEN_MIN_SIZE) to maxSize. The predictor refuses to start with
another default size, and would warm up at a size no request may ask for. Call with
(dict "size" "1024x768" "what" "predictor.settings.defaultSize" "component" "generation"
"maxSize" 2048).
*/}}
{{- define "qwen-image-serve.checkSize" -}}
{{- range $side := splitList "x" (lower $.size) }}
{{- if or (mod (int $side) 16) (lt (int $side) 256) (gt (int $side) (int $.maxSize)) }}
{{- fail (printf "%s (%s) for %s is not a size the predictor serves: each side must be a multiple of 16 from 256 to predictor.settings.maxSize (%d)" $.what $.size $.component (int $.maxSize)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A container's env as YAML: `env`, less the variables that `extraEnv` names, then `extraEnv`
(an env is a list keyed by name, where a name may appear once: an extraEnv entry replaces
the chart's variable). Call with (dict "env" <list> "extraEnv" <list>); read it back with
fromYamlArray.
*/}}
{{- define "qwen-image-serve.mergeEnv" -}}
{{- $extraNames := list }}
{{- range .extraEnv }}
{{- $extraNames = append $extraNames .name }}
{{- end }}
{{- $env := list }}
{{- range .env }}
{{- if not (has .name $extraNames) }}
{{- $env = append $env . }}
{{- end }}
{{- end }}
{{- toYaml (concat $env (.extraEnv | default list)) }}
{{- end }}

{{/*
Base URL of a predictor as the adapter reaches it: the override, or the in-cluster service
KServe creates for the InferenceService (<name>-predictor, port 80, in both modes).
*/}}
{{- define "qwen-image-serve.predictorUrl" -}}
{{- $override := index .root.Values.adapter.predictorUrls .component }}
{{- if $override }}
{{- $override }}
{{- else }}
{{- printf "http://%s-predictor.%s.svc.%s" (include "qwen-image-serve.isvcName" .) .root.Release.Namespace .root.Values.clusterDomain }}
{{- end }}
{{- end }}

{{/*
"true" when a component asks for a LocalModelCache of its storage URI, else empty; call with
(dict "root" $ "component" "edit").
*/}}
{{- define "qwen-image-serve.localModelCache" -}}
{{- $storage := (index .root.Values .component).storage }}
{{- $cache := $storage.storageUri.localModelCache }}
{{- if and (eq $storage.kind "storageUri") $cache $cache.enabled }}true{{ end }}
{{- end }}

{{/*
Name of the LocalModelCache of a component's storage URI; call with (dict "root" $ "component"
"edit"). Cluster-scoped and immutable in its URI, so the name carries a hash of the URI: a new
URI makes a new cache. At most 33 characters: KServe names each node's download Job
<cache>-<node>.
*/}}
{{- define "qwen-image-serve.localModelCacheName" -}}
{{- $uri := (index .root.Values .component).storage.storageUri.uri }}
{{- $prefix := printf "%s-%s" (include "qwen-image-serve.fullname" .root) .component | trunc 24 | trimSuffix "-" }}
{{- printf "%s-%s" $prefix (sha256sum $uri | trunc 8) }}
{{- end }}

{{/*
Milliseconds of a Gateway API duration ("1h30m", "630s", "500ms": values.schema.json checks
its form).
*/}}
{{- define "qwen-image-serve.durationMilliseconds" -}}
{{- $milliseconds := dict "h" 3600000 "m" 60000 "s" 1000 "ms" 1 -}}
{{- $total := 0 -}}
{{- range regexFindAll "[0-9]+(ms|h|m|s)" . -1 -}}
{{- $number := regexFind "^[0-9]+" . -}}
{{- $total = add $total (mul (int $number) (get $milliseconds (trimPrefix $number .))) -}}
{{- end -}}
{{- $total -}}
{{- end }}
