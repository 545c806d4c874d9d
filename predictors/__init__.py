"""KServe predictors for Qwen-Image (text-to-image) and Qwen-Image-Edit."""
