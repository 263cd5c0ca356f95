"""Property-based tests of the math in ddpm.py."""

import torch

import ddpm


def test_linear_schedule_endpoints():
    betas = ddpm.linear_beta_schedule(1000)
    assert betas[0] == 1e-4 and betas[-1] == 0.02
