"""The one named-registry mechanism behind divergences and loss shapes: refusals, lookups, listeners."""

import pytest

from dppo_verl.ops.registry import NamedRegistry
from dppo_verl.ops.shapes import add_shape_listener, get_loss_shape, loss_shape_names, register_loss_shape


class _Entry:
    def __init__(self, name):
        self.name, self.fn = name, lambda: None


def test_refuses_a_taken_name_and_lists_names_on_a_bad_lookup():
    reg = NamedRegistry("widget")
    reg.add("b", _Entry("b"))
    reg.add("a", _Entry("a"))
    with pytest.raises(ValueError, match=r"widget 'a' is already registered \(by .*<lambda>\)"):
        reg.add("a", _Entry("a"))
    with pytest.raises(KeyError, match=r"unknown widget 'c'; registered: \['a', 'b'\]"):
        reg.get("c")
    assert reg.names() == ["a", "b"] and reg.get("b").name == "b"


def test_listener_sees_past_and_future_entries_once():
    reg, seen = NamedRegistry("widget"), []
    reg.add("a", _Entry("a"))
    reg.listen(lambda e: seen.append(e.name))
    reg.add("b", _Entry("b"))
    assert seen == ["a", "b"]


def test_loss_shape_registry_uses_it():
    assert {"dppo", "cppo", "drpo"} <= set(loss_shape_names())
    with pytest.raises(ValueError, match="loss shape 'dppo' is already registered"):
        register_loss_shape("dppo")(lambda view, knobs: None)
    with pytest.raises(KeyError, match=r"unknown loss shape 'ppo'; registered: \[.*'dppo'"):
        get_loss_shape("ppo")
    seen = []
    add_shape_listener(lambda s: seen.append(s.name))
    assert set(loss_shape_names()) <= set(seen)
