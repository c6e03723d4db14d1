"""A value shown in a one-line error stays on one line, whatever its repr: NumPy arrays and tensors
print over several lines, an object's own repr may hold control characters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import upop
from upop.errors import ConfigError, show


class _Odd:
    def __repr__(self) -> str:
        return "odd\n\x1b[31m  value\r\n"


VALUES = {"numpy matrix": (np.arange(12).reshape(3, 4), "array([[ 0,  1,  2,  3], [ 4,  5,  6,  7], [ 8,  9, 10, 11]])"),
          "tensor": (torch.eye(2), "tensor([[1., 0.], [0., 1.]])"),
          "big numpy array": (np.zeros((500, 500)), "array([[0., 0., 0., ..., 0., 0., 0.], [0., 0., 0.,"),
          "inside a dict": ({"w": np.ones((2, 2))}, "{'w': array([[1., 1.], [1., 1.]])}"),
          "control characters": (_Odd(), "odd \\x1b[31m  value")}


@pytest.mark.parametrize("case", sorted(VALUES))
def test_show_is_one_line(case):
    value, start = VALUES[case]
    text = show(value)
    assert text.isprintable() and text.startswith(start), text
    assert len(text) <= 203


def test_a_config_error_on_an_array_is_one_line():
    with pytest.raises(ConfigError) as info:
        upop.UPopConfig(ratio=np.array([[0.5, 0.6], [0.7, 0.8]]))
    message = str(info.value)
    assert message == ("ratio=array([[0.5, 0.6], [0.7, 0.8]]) is not allowed; ratio must be a number in (0, 1), "
                       "e.g. 0.5 for 2x"), message

