"""Tests that need no root and no kernel: config, token, rules, decode,
presentation, exporter rendering, the CLI's kernel-free verbs.

They run with the rest under `make test`, and alone as any user with
`make test-unit` (as nobody).  Nothing here may load libbpf: each test
fails if it did (meaningful when tests/unit runs on its own, before any
kernel test has loaded it).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _no_libbpf() -> Iterator[None]:
    loaded = "netoken.libbpf" in sys.modules
    yield
    assert loaded or "netoken.libbpf" not in sys.modules, "a unit test loaded libbpf"
