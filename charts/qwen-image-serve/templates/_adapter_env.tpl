{{/*
The environment the chart gives the adapter container, as a YAML list: each model's
predictor URL, id and aliases, and the adapter's settings. Read it back with fromYamlArray.
*/}}
{{- define "qwen-image-serve.adapterEnv" -}}
{{- /* The adapter tells its two models apart by id: it refuses at start an alias that is a
model id, and two models of one id would share one predictor URL. */}}
{{- if eq .Values.generation.modelName .Values.edit.modelName }}
{{- fail (printf "edit.modelName (%s) is generation.modelName too: give the models different ids" .Values.edit.modelName) }}
{{- end }}
{{- $served := splitList " " (include "qwen-image-serve.servedComponents" .) }}
{{- range $component := list "generation" "edit" }}
{{- $values := index $.Values $component }}
{{- $isServed := has $component $served }}
{{- range $alias := $values.modelAliases }}
{{- if and $isServed (has $alias (list $.Values.generation.modelName $.Values.edit.modelName)) }}
{{- fail (printf "%s.modelAliases names %s, a model id (generation.modelName or edit.modelName): an alias is another name" $component $alias) }}
{{- end }}
{{- end }}
{{- /* An empty URL switches a model off in the adapter (not listed, 404 model_not_found). */}}
- name: QWEN_ADAPTER_{{ upper $component }}_URL
  value: {{ ternary (include "qwen-image-serve.predictorUrl" (dict "root" $ "component" $component)) "" $isServed | quote }}
- name: QWEN_ADAPTER_{{ upper $component }}_MODEL
  value: {{ $values.modelName | quote }}
{{- if and $isServed $values.modelAliases }}
- name: QWEN_ADAPTER_{{ upper $component }}_MODEL_ALIASES
  value: {{ toJson $values.modelAliases | quote }}
{{- end }}
{{- end }}
- name: QWEN_ADAPTER_REQUEST_TIMEOUT_SECONDS
  value: {{ .Values.adapter.requestTimeoutSeconds | quote }}
- name: QWEN_ADAPTER_QUALITY_STEPS
  value: {{ .Values.adapter.qualitySteps | toJson | quote }}
{{- with .Values.adapter.corsOrigins }}
- name: QWEN_ADAPTER_CORS_ORIGINS
  value: {{ toJson . | quote }}
{{- end }}
{{- with .Values.adapter.imageUrlHosts }}
- name: QWEN_ADAPTER_IMAGE_URL_HOSTS
  value: {{ toJson . | quote }}
{{- end }}
{{- /* A step-distilled LoRA is made for its own steps: quality leaves them alone. */}}
{{- $loraModels := dict }}
{{- range $component := list "generation" "edit" }}
{{- $values := index $.Values $component }}
{{- if and $values.enabled $values.lora $values.lora.source }}
{{- $_ := set $loraModels $values.modelName dict }}
{{- end }}
{{- end }}
{{- with $loraModels }}
- name: QWEN_ADAPTER_MODEL_QUALITY_STEPS
  value: {{ toJson . | quote }}
{{- end }}
{{- with include "qwen-image-serve.adapter.apiKeySecretName" . }}
- name: QWEN_ADAPTER_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.adapter.apiKey.secretKey | quote }}
{{- end }}
{{- end }}
