"""The Mistral spec in PyTorch (CUDA, MPS, CPU)."""
