"""The README's example runs as written (on the CPU, with a stand-in model)."""

import re
from pathlib import Path

import torch


def test_readme_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Example\n\n```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('device="cuda"', 'device="cpu"').replace('timesteps_on("cuda")', 'timesteps_on("cpu")')
    scope = {"unet": lambda z, t, c: torch.tanh(z) * c, "text": 0.9, "empty": 1.0}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["latents"].shape == (1, 4, 64, 64) and torch.isfinite(scope["latents"]).all()
    assert scope["z"].shape == (1, 4, 64, 64) and scope["z_in"].dtype == torch.bfloat16
