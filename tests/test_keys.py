"""Both presets have exactly the official state-dict keys and shapes (built on the meta device)."""

from __future__ import annotations

import pytest

from streamrecon.checkpoint import alias_groups
from streamrecon.config import preset
from streamrecon.models import Cut3r


def _read_keys(path):
    keys = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, shape, dtype = line.split("\t")
        keys[name] = (tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), dtype)
    return keys


@pytest.mark.parametrize("name", ["cut3r_512_dpt", "cut3r_224_linear"])
def test_official_keys_and_shapes(shared, name):
    official = _read_keys(shared / "golden" / f"keys_{name}.txt")
    model = Cut3r(preset(name), device="meta")
    ours = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}
    missing = sorted(set(official) - set(ours))
    extra = sorted(set(ours) - set(official))
    wrong = sorted(k for k in official.keys() & ours.keys() if official[k] != ours[k])
    assert not missing and not extra and not wrong, f"missing={missing[:5]} extra={extra[:5]} wrong={wrong[:5]}"
    assert list(ours) == list(official), "state-dict order differs from the reference registration order"


def test_parameter_counts_match_the_reference(shared):
    # facts §1.3: 793,307,858 unique parameters (512 DPT), 748,443,655 (224 linear)
    for name, expected in (("cut3r_512_dpt", 793_307_858), ("cut3r_224_linear", 748_443_655)):
        model = Cut3r(preset(name), device="meta")
        assert sum(p.numel() for p in model.parameters()) == expected, name
    dpt = Cut3r(preset("cut3r_512_dpt"), device="meta")
    assert sum(len(g) - 1 for g in alias_groups(dpt)) == 12  # the 12 DPT aliases


@pytest.mark.parametrize("name", ["cut3r_512_dpt", "cut3r_224_linear"])
def test_config_files_equal_the_presets(name):
    from streamrecon.config import ModelConfig

    from .conftest import REPO

    assert ModelConfig.from_file(REPO / "configs" / "model" / f"{name}.yaml") == preset(name)
