"""Process-wide settings: the environment as the op's launch path reads it."""

import os

from flashfx import config


def test_getenv_follows_os_environ(monkeypatch):
    monkeypatch.delenv("FLASHFX_TEST_VAR", raising=False)
    assert config.getenv("FLASHFX_TEST_VAR") is None
    monkeypatch.setenv("FLASHFX_TEST_VAR", "0")  # a change made through os.environ shows at once
    assert config.getenv("FLASHFX_TEST_VAR") == "0"
    os.environ["FLASHFX_TEST_VAR"] = "é"
    assert config.getenv("FLASHFX_TEST_VAR") == "é"
    monkeypatch.delenv("FLASHFX_TEST_VAR")
    assert config.getenv("FLASHFX_TEST_VAR") is None


def test_getenv_without_the_underlying_mapping(monkeypatch):
    monkeypatch.setattr(config, "_ENV_DATA", None)  # not CPython on POSIX: os.environ.get
    monkeypatch.setenv("FLASHFX_TEST_VAR", "1")
    assert config.getenv("FLASHFX_TEST_VAR") == "1"
    assert config.getenv("FLASHFX_TEST_ABSENT_VAR") is None
