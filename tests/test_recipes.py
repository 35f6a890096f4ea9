"""build_config: the 8-bit first/last layer convention."""
from __future__ import annotations

import pytest

from diffquant.recipes import build_config


def test_first_last_bits_raise_narrow_schemes_only():
    cfg = build_config(4, 8, weight_estimator="lp", act_estimator="lp", first_last_bits=8)
    for name in ("conv_in", "conv_out"):
        w, a = cfg.schemes_for(name)
        assert w.bits == 8 and w.estimator == "lp" and w.granularity == "per_channel"
        assert a.bits == 8  # already 8: kept
    w, a = cfg.schemes_for("down_blocks.0.resnets.0.conv1")
    assert w.bits == 4 and a.bits == 8


def test_first_last_bits_weights_only_and_no_op_cases():
    cfg = build_config(4, 32, first_last_bits=8)
    w, a = cfg.schemes_for("conv_out")
    assert w.bits == 8 and a is None  # no activation quantization is introduced
    assert build_config(8, 8, first_last_bits=8).overrides == ()
    assert build_config(4, 8).overrides == ()  # library default: no exception


def test_explicit_override_wins_and_bad_bits_refused():
    cfg = build_config(4, 8, overrides=["conv_out=skip"], first_last_bits=8)
    assert cfg.schemes_for("conv_out") is None
    assert cfg.schemes_for("conv_in")[0].bits == 8
    with pytest.raises(ValueError, match="first_last_bits"):
        build_config(4, 8, first_last_bits=12)
