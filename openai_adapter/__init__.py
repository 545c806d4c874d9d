"""An OpenAI Images API in front of the Qwen-Image KServe v2 predictors."""
