"""``[optim] name``: Adam's weight decay is L2 (added to the gradient, so it passes through the moments),
AdamW's is decoupled; both decay weights of dimension >= 2 only. Checked against the update equations."""

import pytest
import torch
from torch import nn

from conftest import assert_rel_close
from trainer.config import OptimConfig
from trainer.session import build_optimizer


def adam_reference(w: torch.Tensor, grads: list[torch.Tensor], lr: float, decay: float, decoupled: bool,
                   betas=(0.9, 0.999), eps=1e-8) -> torch.Tensor:
    """Kingma & Ba's Adam, with L2 decay in the gradient (g + λw) or decoupled (w ← w − lr·λ·w first)."""
    w, m, v = w.double().clone(), torch.zeros_like(w, dtype=torch.float64), torch.zeros_like(w, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if decoupled:
            w = w - lr * decay * w
        else:
            g = g + decay * w
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        w = w - lr * m_hat / (v_hat.sqrt() + eps)
    return w


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_decays_as_l2_and_adamw_decoupled_on_weights_only(name):
    torch.manual_seed(0)
    model = nn.Linear(7, 5)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, decay = 0.01, 0.3
    optimizer = build_optimizer(OptimConfig(name=name, lr=lr, weight_decay=decay, schedule="constant"), model)
    grads = {n: [torch.randn_like(p) for _ in range(3)] for n, p in model.named_parameters()}
    for step in range(3):
        for n, p in model.named_parameters():
            p.grad = grads[n][step].clone()
        optimizer.step()
    for n, p in model.named_parameters():
        want = adam_reference(start[n], grads[n], lr, decay if p.dim() >= 2 else 0.0, name == "adamw")
        assert_rel_close(p.detach(), want, 1e-5, f"{name}: {n}")
    other = build_optimizer(OptimConfig(name="adamw" if name == "adam" else "adam", lr=lr, weight_decay=decay), model)
    assert type(other) is not type(optimizer)
