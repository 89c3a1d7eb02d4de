"""The package as a user installs it: a wheel, into a fresh virtual environment holding only
torch, imports and runs an optimizer step; a feature whose extra is missing says which extra in
one line; installing that extra (8bit) makes it work."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ONLY_TORCH = r"""
import torch, galore_ds
from torch import nn

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(16, 16)
        self.mlp = nn.Linear(16, 32)
    def forward(self, x):
        return self.mlp(self.attn(x))

model = Block()
opt = galore_ds.GaLoreAdamW(galore_ds.param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
before = model.attn.weight.detach().clone()
for _ in range(3):
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    opt.zero_grad()
assert not torch.equal(before, model.attn.weight), "no update"
assert 4 in opt.state[model.attn.weight]["proj"].shape  # a rank-4 projector
for feature, extra in (("galore_ds.integrations.hf", "hf"), ("galore_ds.integrations.deepspeed", None),
                       ("galore_ds.integrations.torchtitan", "torchtitan")):
    try:
        mod = __import__(feature, fromlist=["x"])
        if extra is None:
            mod.register()
        raise SystemExit(f"{feature}: imported without its extra")
    except ImportError as e:
        assert "pip install 'galore_ds[" in str(e) and "\n" not in str(e), e
try:
    galore_ds.GaLoreAdamW8bit(galore_ds.param_groups(model, rank=4), lr=1e-2)
    raise SystemExit("GaLoreAdamW8bit built without bitsandbytes")
except ImportError as e:
    assert "pip install 'galore_ds[8bit]'" in str(e), e
print("only-torch ok")
"""

EIGHT_BIT = r"""
import torch, galore_ds
from torch import nn
model = nn.Sequential()
model.add_module("mlp", nn.Linear(64, 512))
opt = galore_ds.GaLoreAdamW8bit(galore_ds.param_groups(model, rank=8), lr=1e-2, min_8bit_size=16)
model(torch.randn(4, 64)).square().mean().backward()
opt.step()
assert opt.state[model.mlp.weight]["state1"].dtype == torch.uint8
print("8bit ok")
"""


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_with_only_torch_then_the_8bit_extra(tmp_path):
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", ROOT])
    wheel = next((tmp_path / "dist").glob("galore_ds-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    torch_version = __import__("torch").__version__.split("+")[0]
    run([py, "-m", "pip", "install", "-q", f"torch=={torch_version}"])
    run([py, "-m", "pip", "install", "-q", wheel])   # install_requires: torch only, already there
    listed = run([py, "-m", "pip", "list", "--format=freeze"]).stdout.lower()
    for heavy in ("deepspeed", "transformers", "bitsandbytes", "mpi4py", "accelerate"):
        assert f"{heavy}==" not in listed, f"{heavy} installed with the bare wheel"
    assert "only-torch ok" in run([py, "-c", ONLY_TORCH], cwd=tmp_path).stdout
    run([py, "-m", "pip", "install", "-q", f"{wheel}[8bit]"])
    assert "8bit ok" in run([py, "-c", EIGHT_BIT], cwd=tmp_path).stdout
