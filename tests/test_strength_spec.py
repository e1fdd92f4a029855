"""One strength spec: its fields are declared once and nested as-is by the tracker and the reward term."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest

from callbacks.inversion import InversionTracker
from corrpo.inversion.strength_config import REWARD_STRENGTH_DEFAULTS, StrengthConfig
from corrpo.training.config import RLConfig
from corrpo.training.corrpo_term import CorrPOTermConfig

STRENGTH_FIELDS = {f.name for f in fields(StrengthConfig)}


def test_no_strength_field_is_declared_outside_the_spec():
    reward_fields = {f.name: f for f in fields(CorrPOTermConfig)}
    assert not STRENGTH_FIELDS & set(reward_fields)
    assert reward_fields["strength"].type in (StrengthConfig, "StrengthConfig")
    assert not STRENGTH_FIELDS & {f.name for f in fields(RLConfig)}
    tracker_args = inspect.signature(InversionTracker.__init__).parameters
    assert not STRENGTH_FIELDS & set(tracker_args)
    assert tracker_args["strength"].annotation in (StrengthConfig, "StrengthConfig")


def test_the_tracker_and_the_reward_differ_only_in_the_documented_defaults():
    tracker = InversionTracker().strength
    reward = CorrPOTermConfig().strength
    differing = {f.name for f in fields(StrengthConfig) if getattr(tracker, f.name) != getattr(reward, f.name)}
    assert differing == set(REWARD_STRENGTH_DEFAULTS) == {"projections"}
    assert tracker.projections == ("q", "k", "v", "o") and reward.projections == ("q", "v", "o")


def test_one_validation_names_the_owner_key():
    with pytest.raises(ValueError, match=r"InversionTracker\.strength: unknown measure"):
        InversionTracker(strength={"measure": "spectral"})
    with pytest.raises(ValueError, match=r"rl\.inversion\.strength: unknown measure"):
        CorrPOTermConfig(strength={"measure": "spectral"})
    with pytest.raises(ValueError, match=r"rl\.inversion\.strength: unknown field\(s\) \['measures'\]"):
        RLConfig(inversion={"strength": {"measures": "l1"}})
