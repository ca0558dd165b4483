"""Server optimizer (FedOpt, Reddi et al. 2021) on FedDST's sparse pseudo-gradient: the step
after the re-prune (Algorithm 1, step 6, with a server learning rate)."""

from __future__ import annotations

import torch

from .masks import Masks, apply_masks

SERVER_OPTIMIZERS = ("none", "momentum", "adam")


class ServerOptimizer:
    """FedOpt on FedDST's sparse pseudo-gradient (Reddi et al. 2021): delta = the re-pruned
    aggregate minus the previous global model; `momentum` steps by lr * v with
    v = beta1 v + delta (FedAvgM), `adam` by lr * m / (sqrt(v) + tau) (FedAdam); `none`
    takes the aggregate as is. A weight that enters the mask takes its aggregate as is with
    zero moments (as RigL resets a new connection's optimizer slots): its previous value, 0,
    is no step. Pruned weights and their moments are zero. Moments are float64, so that a
    finite float32 reply cannot overflow them."""

    def __init__(self, kind: str, lr: float, beta1: float, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer '{kind}' not in {SERVER_OPTIMIZERS}")
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(
        self, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], masks: Masks, old_masks: Masks
    ) -> dict[str, torch.Tensor]:
        """The next global state.

        Parameters
        ----------
        old : dict[str, torch.Tensor]
            The previous global model (the one sent this round).
        new : dict[str, torch.Tensor]
            The re-pruned aggregate.
        masks, old_masks : Masks
            The new global mask and the previous one: positions in `masks` but not in
            `old_masks` enter.

        Returns
        -------
        dict[str, torch.Tensor]
            Per tensor: the aggregate at entering positions, a step elsewhere, zero where pruned.
        """
        if self.kind == "none":
            return new
        state = {}
        for name, target in new.items():
            delta = target.double() - old[name].double()
            m = self.beta1 * self.m.get(name, torch.zeros_like(delta))
            if self.kind == "momentum":
                self.m[name] = m + delta
                step = self.m[name]
            else:
                self.m[name] = m + (1 - self.beta1) * delta
                self.v[name] = self.beta2 * self.v.get(name, torch.zeros_like(delta)) + (1 - self.beta2) * delta**2
                step = self.m[name] / (self.v[name].sqrt() + self.tau)
            state[name] = (old[name].double() + self.lr * step).to(target.dtype)
            if name in masks:
                entering = masks[name] & ~old_masks[name]
                state[name] = torch.where(entering, target, state[name])
                for moments in (self.m, self.v):
                    if name in moments:
                        moments[name] = torch.where(entering, 0.0, moments[name])
        apply_masks(state, masks)
        apply_masks(self.m, masks)
        apply_masks(self.v, {name: mask for name, mask in masks.items() if name in self.v})
        return state
