"""Two-layer MLP with exact (erf) GELU; attribute names ``fc1``/``fc2`` are checkpoint keys."""

from __future__ import annotations

from torch import Tensor, nn

from .onednn import linear

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))``.

    Args:
        in_features: input width.
        hidden_features: hidden width.
        out_features: output width (defaults to ``in_features``).
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(in_features, hidden_features, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, **dd)

    def forward(self, x: Tensor) -> Tensor:
        if type(self.act) is nn.GELU and self.act.approximate == "none":
            return linear(self.fc2, linear(self.fc1, x, gelu=True))
        return linear(self.fc2, self.act(linear(self.fc1, x)))
