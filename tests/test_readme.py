"""The README's example runs as written (on the CPU, with a stand-in model)."""

import re
from pathlib import Path

import torch


def _example() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Example\n\n```python\n(.*?)```", text, re.S).group(1)
    return code.replace('device="cuda"', 'device="cpu"').replace('timesteps_on("cuda")', 'timesteps_on("cpu")')


def _run(code: str) -> dict:
    scope = {"unet": lambda z, t, c: torch.tanh(z) * c, "text": 0.9, "empty": 1.0}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["latents"].shape == (1, 4, 64, 64) and torch.isfinite(scope["latents"]).all()
    assert scope["z"].shape == (1, 4, 64, 64) and scope["z_in"].dtype == torch.bfloat16
    return scope


def test_readme_example_runs():
    _run(_example())


def test_readme_example_alternative_schedules_run():
    """Each schedule the example's comment offers instead runs it, with the prediction the comment pairs it with."""
    code = _example()
    line = next(line for line in code.splitlines() if line.startswith("schedule = "))
    alternatives = re.findall(r'(\w+\([^()]*\))(?: with prediction="(\w+)")?', line.split("# or ", 1)[1])
    assert len(alternatives) >= 2, line
    for schedule, prediction in alternatives:
        variant = code.replace(line, f"schedule = fastflow.schedules.{schedule}")
        if prediction:
            variant = variant.replace('prediction="eps"', f'prediction="{prediction}"')
        _run(variant)
