"""The training-only confidence guard: taps, floor hinge, re-initialisation (both head types)."""

from __future__ import annotations

import pytest
import torch

from streamrecon.models import Cut3r
from streamrecon.train.conf_guard import ConfidenceTaps, confidence_layers, floor_penalty, output_layer, reinit_confidence
from streamrecon.types import FrameInput

from .conftest import tiny_config


def _frame(b=1, hw=(64, 64)):
    g = torch.Generator().manual_seed(0)
    return FrameInput(img=torch.rand(b, 3, *hw, generator=g) * 2 - 1)


def _collapse(model):
    """Drive every raw confidence logit to about -40 (what training from scratch ends up with)."""
    with torch.no_grad():
        for module, sl, _ in confidence_layers(model):
            last = output_layer(module)
            rows = range(last.weight.shape[0])[sl]
            last.weight[rows.start:rows.stop] = 0.0
            last.bias[rows.start:rows.stop] = -40.0


@pytest.mark.parametrize("head", ["linear", "dpt"])
def test_taps_read_the_logits_that_make_the_confidence(head):
    torch.manual_seed(0)
    model = Cut3r(tiny_config(head)).eval()
    taps = ConfidenceTaps(model)
    with torch.no_grad():  # validation-style passes are not captured
        model.step(_frame(), model.init_state(1))
    assert taps.pop() == []
    out, _ = model.step(_frame(), model.init_state(1))
    logits = [x.detach() for x in taps.pop()]
    assert len(logits) == 2 and taps.pop() == []
    out = type(out)(**{k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in vars(out).items()})
    if head == "dpt":  # (B, H, W, 1) maps: conf = 1 + exp(logit) exactly
        torch.testing.assert_close(out.conf_cam, 1 + logits[0][..., 0].exp())
        torch.testing.assert_close(out.conf_world, 1 + logits[1][..., 0].exp())
    else:  # token-level (B, N, p^2): same values after the pixel shuffle
        assert logits[0].shape[-1] == 16 * 16
        assert torch.allclose(torch.sort((out.conf_cam - 1).log().flatten()).values,
                              torch.sort(logits[0].flatten()).values, atol=1e-4)
    taps.remove()
    model.step(_frame(), model.init_state(1))
    assert taps.pop() == []


@pytest.mark.parametrize("head", ["linear", "dpt"])
def test_collapsed_confidence_is_revived_and_the_floor_has_gradient(head):
    torch.manual_seed(0)
    model = Cut3r(tiny_config(head))
    _collapse(model)
    with torch.no_grad():
        out, _ = model.step(_frame(), model.init_state(1))
    assert torch.all(out.conf_cam == 1.0)  # dead: exp(-40) underflows next to 1
    reinit_confidence(model)
    with torch.no_grad():
        out, _ = model.step(_frame(), model.init_state(1))
    assert torch.allclose(out.conf_cam, torch.full_like(out.conf_cam, 2.0), atol=0.1)
    assert torch.allclose(out.conf_world, torch.full_like(out.conf_world, 2.0), atol=0.1)

    _collapse(model)  # the hinge pushes collapsed logits back up, with a gradient that does not vanish
    taps = ConfidenceTaps(model)
    model.step(_frame(), model.init_state(1))
    pen = floor_penalty(taps.pop(), -3.0)
    assert pen.item() == pytest.approx(37.0, rel=1e-4)
    pen.backward()
    module, sl, _ = confidence_layers(model)[0]
    last = output_layer(module)
    assert torch.all(last.bias.grad[sl] < 0)  # gradient descent raises the bias
    assert floor_penalty([torch.zeros(3)], -3.0).item() == 0.0
