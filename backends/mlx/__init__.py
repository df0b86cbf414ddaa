"""The Mistral spec in MLX (Metal on Apple silicon; CPU and CUDA on Linux)."""
