"""Deterministic weights and inputs for the concept-grouping parity test (shared with the fixture's maker).
torch's CPU generator draws the same numbers for the same seed on every machine; nothing is stored but the output."""

import torch


def make_weights(state_dict, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sorted(state_dict.items()):
        w = torch.randn(t.shape, generator=g)
        if t.ndim == 1 and "norm" in name and name.endswith("weight"):
            w = 1 + 0.1 * w  # LayerNorm gains near 1
        elif t.ndim >= 2:
            w = w / t.shape[-1] ** 0.5  # unit-variance activations
        else:
            w = 0.1 * w
        out[name] = w
    return out


def make_input(seed=1):
    return torch.randn(2, 256, 24, generator=torch.Generator().manual_seed(seed))
