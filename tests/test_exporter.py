"""Address parsing of the metrics program and the message age it reports."""

from __future__ import annotations

import json

import pytest

from ksi_worker.exporter import parse_addr
from ksi_worker.settings import SettingsError
from ksi_worker.state_collector import message_ready_at


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1:9870", ("127.0.0.1", 9870)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:9870", ("::1", 9870)),
    ],
)
def test_parse_addr_accepts_host_port(addr, expected):
    assert parse_addr(addr) == expected


@pytest.mark.parametrize("addr", ["9870", "127.0.0.1", ":9870", "h:0", "h:70000"])
def test_parse_addr_rejects_invalid(addr):
    with pytest.raises(SettingsError, match="KSI_METRICS_ADDR"):
        parse_addr(addr)


def test_message_ready_at_uses_message_timestamp():
    raw = json.dumps({"message_timestamp": 1_700_000_000_500, "options": {}})
    assert message_ready_at(raw.encode()) == 1_700_000_000.5


def test_message_ready_at_prefers_eta():
    raw = json.dumps(
        {"message_timestamp": 1_700_000_000_000, "options": {"eta": 1_700_000_060_000}}
    )
    assert message_ready_at(raw.encode()) == 1_700_000_060.0


@pytest.mark.parametrize("raw", [None, b"", b"not json", b"{}"])
def test_message_ready_at_unreadable_is_none(raw):
    assert message_ready_at(raw) is None
