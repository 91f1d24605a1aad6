"""Checkpoints of NewtonCG, Adam and SGD: atomic saves, and a clear ValueError for every bad file."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from conftest import build_net

import hvp
import optimizers

OPTIMIZERS = {"NewtonCG": optimizers.NewtonCG, "Adam": optimizers.Adam, "SGD": optimizers.SGD}


def trained(cls, steps=3):
    rng = np.random.default_rng(0)
    net = build_net(("lin:3:5", "tanh", "lin:5:3"))
    loss = hvp.CrossEntropyLoss()
    X, y = rng.normal(size=(20, 3)), rng.integers(0, 3, size=20)
    opt = cls(net, loss, net.init(seed=1), l2=1e-3)
    for _ in range(steps):
        opt.step(X, y)
    return opt, net, loss, X, y


def arrays_of(path):
    with np.load(path, allow_pickle=False) as f:
        return {key: f[key] for key in f.files}


def rewrite(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_interrupted_save_leaves_the_previous_checkpoint(name, tmp_path, monkeypatch):
    opt, net, loss, X, y = trained(OPTIMIZERS[name])
    path = tmp_path / "ckpt.npz"
    opt.save(path)
    saved = opt.theta.copy()
    opt.step(X, y)

    def savez_then_die(f, **arrays):  # half a file written, then the process is interrupted
        f.write(b"PK\x03\x04" + b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", savez_then_die)
    with pytest.raises(KeyboardInterrupt):
        opt.save(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # no temporary file left behind
    resumed = OPTIMIZERS[name].load(path, net, loss)
    assert np.array_equal(resumed.theta, saved)
    assert len(resumed.history) == len(opt.history) - 1


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_save_writes_exactly_the_path_given(name, tmp_path):
    opt, net, loss, _, _ = trained(OPTIMIZERS[name])
    opt.save(tmp_path / "state")  # no suffix added
    assert os.listdir(tmp_path) == ["state"]
    assert np.array_equal(OPTIMIZERS[name].load(tmp_path / "state", net, loss).theta, opt.theta)


def _truncate(path, arrays):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _set(key, value):
    def edit(path, arrays):
        arrays[key] = value(arrays) if callable(value) else value
        rewrite(path, arrays)
    return edit


def _drop(key):
    def edit(path, arrays):
        del arrays[key]
        rewrite(path, arrays)
    return edit


def _ragged(path, arrays):
    arrays["history_loss"] = arrays["history_loss"][:-1]
    rewrite(path, arrays)


def _npy(path, arrays):
    with open(path, "wb") as f:
        np.save(f, arrays["theta"])


def _pickled(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **{**arrays, "theta": np.array([{"a": 1}], dtype=object)})


# case id -> (optimizers it applies to, how to spoil the file, words the message must hold)
ALL = tuple(OPTIMIZERS)
CASES = {
    "empty": (ALL, lambda p, a: p.write_bytes(b""), "is empty"),
    "truncated": (ALL, _truncate, "truncated or corrupt"),
    "random_bytes": (ALL, lambda p, a: p.write_bytes(np.random.default_rng(0).bytes(500)), "not a zip archive"),
    "npy_file": (ALL, _npy, "is an .npy array file"),
    "npz_without_keys": (ALL, lambda p, a: rewrite(p, {"weights": a["theta"]}), "lacks theta, config"),
    "pickled_object_array": (ALL, _pickled, "pickled object arrays, which are never loaded"),
    "config_not_json": (ALL, _set("config", np.array("{lr: 1")), "config is not valid JSON"),
    "config_not_an_object": (ALL, _set("config", np.array("[1, 2]")), "config must be a JSON object"),
    "config_unknown_setting": (ALL, _set("config", lambda a: np.array(str(a["config"])[:-1] + ', "speed": 2}')),
                               "settings that .* refuses"),
    "ragged_history": (ALL, _ragged, "the history is ragged"),
    "history_column_missing": (ALL, _drop("history_loss"), "lacks its column 'loss'"),
    "theta_wrong_length": (ALL, _set("theta", lambda a: a["theta"][:-1]), "theta must have shape"),
    "theta_nan": (ALL, _set("theta", lambda a: np.full_like(a["theta"], np.nan)), "theta must be finite"),
    "kind_not_text": (ALL, _set("kind", np.array(3)), "kind must be a text scalar"),
    "adam_m_wrong_shape": (("Adam",), _set("state_m", lambda a: a["state_m"][:5]), r"state m must be .* shape"),
    "adam_v_negative": (("Adam",), _set("state_v", lambda a: -np.ones_like(a["state_v"])), "state v must hold"),
    "adam_t_float": (("Adam",), _set("state_t", np.array(2.5)), "state t must be an integer"),
    "adam_m_missing": (("Adam",), _drop("state_m"), "state m is missing"),
    "sgd_buffer_2d": (("SGD",), _set("state_buffer", lambda a: a["state_buffer"][None]), "state buffer must be"),
    "newton_warm_wrong_length": (("NewtonCG",), _set("state_warm", lambda a: a["state_warm"][:-2]),
                                 r"state warm must be .* shape"),
    "newton_negative_damping": (("NewtonCG",), _set("state_damping", np.array(-1.0)), "state damping must be"),
    "newton_nan_damping": (("NewtonCG",), _set("state_damping", np.array(np.nan)), "state damping must be"),
    "newton_offset_negative": (("NewtonCG",), _set("state_offset", np.array(-3)), "state offset must be"),
}
PARAMS = [pytest.param(name, spoil, words, id=f"{name}-{case}")
          for case, (names, spoil, words) in CASES.items() for name in names]


@pytest.mark.parametrize("name, spoil, words", PARAMS)
def test_bad_checkpoint_is_a_clear_value_error(name, spoil, words, tmp_path):
    opt, net, loss, _, _ = trained(OPTIMIZERS[name])
    path = tmp_path / "ckpt.npz"
    opt.save(path)
    spoil(path, arrays_of(path))
    with pytest.raises(ValueError) as info:
        OPTIMIZERS[name].load(path, net, loss)
    message = str(info.value)
    assert type(info.value) is ValueError  # never a subclass such as BadZipFile's or JSONDecodeError
    assert str(path) in message
    assert re.search(words, message), message
    assert "allow_pickle" not in message


def test_missing_file_is_a_file_not_found_error(tmp_path):
    opt, net, loss, _, _ = trained(optimizers.Adam)
    with pytest.raises(FileNotFoundError):
        optimizers.Adam.load(tmp_path / "nothing.npz", net, loss)
