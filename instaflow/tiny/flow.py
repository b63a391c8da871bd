"""Rectified-flow training and sampling, in InstaFlow's convention.

Flow time t runs from 0 (noise z) to 1 (data x1): x_t = t * x1 + (1 - t) * z. The UNet is
called at timestep 1000 * (1 - t) and predicts the velocity v = x1 - z; Euler sampling is
x += dt * v. Classifier-free guidance: v = v_u + g * (v_c - v_u), with the empty prompt
as the unconditional one (as the engine does).
"""

from __future__ import annotations

import torch


def unet_timestep(t: torch.Tensor) -> torch.Tensor:
    return 1000.0 * (1.0 - t)


def rf_loss(unet, x1: torch.Tensor, z: torch.Tensor, embeds: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss on the straight path between z and x1 at times t."""
    tt = t.view(-1, 1, 1, 1)
    xt = tt * x1 + (1.0 - tt) * z
    v = unet(xt, unet_timestep(t), encoder_hidden_states=embeds).sample
    return (v - (x1 - z)).pow(2).mean()


def one_step_loss(unet, x1: torch.Tensor, z: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """Distillation: one Euler step from t=0 (timestep 1000) must land on the target x1."""
    t0 = torch.zeros(z.shape[0], device=z.device)
    v = unet(z, unet_timestep(t0), encoder_hidden_states=embeds).sample
    return (z + v - x1).pow(2).mean()


@torch.no_grad()
def sample(
    unet, z: torch.Tensor, embeds: torch.Tensor, uncond: torch.Tensor | None,
    steps: int, guidance: float = 1.0,
) -> torch.Tensor:
    """Euler integration from t=0 to t=1; guidance applies when `uncond` is given and g > 1."""
    x = z.clone()
    guided = uncond is not None and guidance > 1.0
    cond = torch.cat([uncond.expand_as(embeds), embeds]) if guided else embeds
    for i in range(steps):
        t = torch.full((x.shape[0],), i / steps, device=x.device)
        inp = torch.cat([x, x]) if guided else x
        v = unet(inp, unet_timestep(torch.cat([t, t]) if guided else t), encoder_hidden_states=cond).sample
        if guided:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        x = x + v / steps
    return x


class EMA:
    """Exponential moving average of a module's parameters (the weights that get saved)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in module.parameters()]
        self.steps = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in module.parameters()], 1 - d)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for s, p in zip(self.shadow, module.parameters()):
            p.copy_(s)
