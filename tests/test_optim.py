"""model.py's optimizer side: Newton-Schulz precision, the fused log-prob path, gradient
sync and sharded Muon on 1 vs 2 processes."""

import os

import torch

import model
from conftest import REPO, run_python, run_torchrun
from model import GPT, GPTConfig


def test_newton_schulz_runs_in_float32_off_cuda():
    # bf16 matmuls are emulated (10-35x slower) on CPUs without bf16 units; float32 is exact enough
    G = torch.randn(40, 24)
    X = model.newton_schulz5(G)
    assert X.dtype == torch.float32 and X.shape == G.shape
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.5 and s.max() < 1.3
