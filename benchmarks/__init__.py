"""fastflow benchmarks: the fused step against naive torch, torch.compile and diffusers (``python -m benchmarks``)."""
