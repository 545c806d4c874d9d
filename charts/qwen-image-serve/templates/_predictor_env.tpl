{{/*
The environment the chart gives a predictor container, as a YAML list: the model's location,
the caches, and every predictor setting and speed mode. Call with (dict "root" $ "component"
"edit" "p" <the component's predictor values> "drainSeconds" N) and read it back with
fromYamlArray; drainSeconds is how long the server lets accepted requests finish after SIGTERM.
*/}}
{{- define "qwen-image-serve.predictorEnv" -}}
{{- $component := .component }}
{{- $p := .p }}
{{- $spec := index .root.Values $component }}
{{- $storage := $spec.storage }}
{{- $locationEnv := ternary "QWEN_IMAGE_LOCATION" "QWEN_IMAGE_EDIT_LOCATION" (eq $component "generation") }}
{{- $drainSeconds := .drainSeconds }}
{{- if eq $storage.kind "pvc" }}
- name: {{ $locationEnv }}
  value: {{ $storage.pvc.mountPath | quote }}
{{- else if eq $storage.kind "storageUri" }}
{{- /* KServe's storage initializer fetches STORAGE_URI to /mnt/models. */}}
- name: STORAGE_URI
  value: {{ $storage.storageUri.uri | quote }}
- name: {{ $locationEnv }}
  value: /mnt/models
{{- else if eq $storage.kind "hostPath" }}
- name: {{ $locationEnv }}
  value: {{ $storage.hostPath.mountPath | quote }}
{{- else if eq $storage.kind "huggingFace" }}
- name: {{ $locationEnv }}
  value: {{ $storage.huggingFace.repoId | quote }}
{{- with $storage.huggingFace.tokenSecret.name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $storage.huggingFace.tokenSecret.key }}
{{- end }}
{{- end }}
- name: HF_HOME
  value: /cache/huggingface
- name: QWEN_TINY_CACHE_DIR
  value: /cache/qwen-image-serve
{{- /* Compiler caches (--compile) on the writable cache volume (the root is read-only),
or on predictor.compileCache's claim, which outlives the pod. */}}
{{- $compileCache := ternary "/cache/compile" "/cache" (not (empty $p.compileCache.claimName)) }}
- name: TRITON_CACHE_DIR
  value: {{ $compileCache }}/triton
- name: TORCHINDUCTOR_CACHE_DIR
  value: {{ $compileCache }}/torchinductor
- name: QWEN_DEVICE
  value: {{ $p.settings.device | quote }}
- name: QWEN_DTYPE
  value: {{ $p.settings.dtype | quote }}
- name: QWEN_MAX_QUEUE_SIZE
  value: {{ int $p.settings.maxQueueSize | quote }}
- name: QWEN_SHUTDOWN_GRACE_SECONDS
  value: {{ $drainSeconds | int | quote }}
- name: QWEN_MAX_SIZE
  value: {{ int $p.settings.maxSize | quote }}
{{- if and (eq $component "generation") $p.settings.defaultSize }}
- name: QWEN_DEFAULT_SIZE
  value: {{ $p.settings.defaultSize | quote }}
{{- end }}
{{- if and (eq $component "edit") $p.settings.maxInputImages }}
- name: QWEN_MAX_INPUT_IMAGES
  value: {{ int $p.settings.maxInputImages | quote }}
{{- end }}
{{- with $p.performance }}
- name: QWEN_MAX_BATCH_SIZE
  value: {{ int .maxBatchSize | quote }}
- name: QWEN_BATCH_WAIT_MS
  value: {{ .batchWaitMs | toString | quote }}
- name: QWEN_COMPILE
  value: {{ .compile | quote }}
- name: QWEN_WARMUP_SIZES
  value: {{ .warmupSizes | quote }}
- name: QWEN_ATTENTION_BACKEND
  value: {{ .attentionBackend | quote }}
- name: QWEN_TEXT_PADDING
  value: {{ .textPadding | quote }}
- name: QWEN_MASKED_ATTENTION_BACKEND
  value: {{ .maskedAttentionBackend | quote }}
- name: QWEN_QUANTIZATION
  value: {{ .quantization | quote }}
- name: QWEN_CACHE
  value: {{ .cache | quote }}
- name: QWEN_CACHE_THRESHOLD
  value: {{ .cacheThreshold | toString | quote }}
{{- end }}
{{- with $spec.lora }}
{{- if .source }}
- name: QWEN_LORA
  value: {{ .source | quote }}
{{- with .weightName }}
- name: QWEN_LORA_WEIGHT_NAME
  value: {{ . | quote }}
{{- end }}
- name: QWEN_LORA_STEPS
  value: {{ int .steps | quote }}
{{- end }}
{{- end }}
{{- end }}
