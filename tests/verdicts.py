"""What the guard's datapath tests and the decoder's tests share: three keys,
the [guard] section they are checked against, SYNs carrying reference tokens,
and the guard program's verdict on one frame (so both judge the very same
frames the very same way)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from netoken import config as nconfig
from netoken import layout, token

from .conftest import TEST_KEY, write_key
from .pkt import LINUX_SYN_OPTS, rebuild_with_option, syn

if TYPE_CHECKING:  # the decoder's unit tests use these helpers without libbpf
    from netoken.guard import Guard

WINDOW = 30
KEY2 = bytes(range(100, 116))  # bound to saddr
KEY3 = bytes(range(200, 216))  # defined, accepted nowhere
STATIC = 0x1122334455667788

V4, V6, MON = "198.51.100.7", "2001:db8:100::7", "203.0.113.9"

# Entry 1 (index 0) protects V4's and V6's prefixes with keys 1 and 2 and the
# STATIC token and drops; entry 2 covers MON's prefix with key 1, monitoring.
GUARD_SECTION = """
[guard]
action = "drop"
skew = 1
replay_cache = 65536

[[guard.protect]]
destinations = ["198.51.100.0/24", "2001:db8:100::/64"]
ports = [443, "7000-7100"]
keys = [1, 2]
tokens = ["0x1122334455667788"]

[[guard.protect]]
destinations = ["203.0.113.0/24"]
keys = [1]
action = "monitor"
"""


def write_config(
    directory: Path, body: str, keys: dict[int, tuple[bytes, tuple[str, ...]]] | None = None
) -> nconfig.Config:
    """BODY after [[key]] tables for KEYS, by default key 1 (TEST_KEY), key 2
    (KEY2, bound to saddr) and key 3 (KEY3), all with a WINDOW-second window."""
    keys = keys if keys is not None else {1: (TEST_KEY, ()), 2: (KEY2, ("saddr",)), 3: (KEY3, ())}
    text = ""
    for kid, (secret, bind) in keys.items():
        path = write_key(directory, f"{kid}.key", secret)
        binds = ", ".join(f'"{b}"' for b in bind)
        text += f'[[key]]\nid = {kid}\nfile = "{path}"\nwindow = {WINDOW}\nbind = [{binds}]\n\n'
    path = directory / "netoken.toml"
    path.write_text(text + body)
    return nconfig.load(path)


def steady_epoch() -> int:
    """The current epoch, at least 2 s before the next boundary, so frames
    stamped now and the guard's clock agree on it for the whole test."""
    left = WINDOW - (time.time() % WINDOW)
    if left < 2.0:
        time.sleep(left + 0.05)
    return token.epoch_now(WINDOW)


def src_of(dst: str) -> str:
    return "2001:db8:1::1" if ":" in dst else "192.0.2.1"


def mac_option(
    dst=V4,
    dport=443,
    *,
    key=TEST_KEY,
    key_id=1,
    epoch=None,
    src=None,
    sport=40000,
    bind=0,
    nonce=None,
) -> bytes:
    """A reference mac option for a SYN from SRC (default: syn()'s source) to DST:DPORT."""
    epoch = steady_epoch() if epoch is None else epoch
    return token.build_mac_option(
        key,
        key_id=key_id,
        epoch=epoch & 0xFFFFFFFF,
        daddr=dst,
        dport=dport,
        saddr=src or src_of(dst),
        sport=sport,
        bind=bind,
        nonce=nonce or os.urandom(token.NONCE_LEN),
    )


def marked(
    dst=V4,
    dport=443,
    *,
    src=None,
    sport=40000,
    vlans=0,
    option=None,
    payload=b"",
    before=LINUX_SYN_OPTS,
    ext=None,
    **kw,
) -> bytes:
    """A Linux-like SYN carrying OPTION (default: a fresh reference token)
    after the options BEFORE (IPv6: behind the extension headers EXT)."""
    opt = option if option is not None else mac_option(dst, dport, src=src, sport=sport, **kw)
    return rebuild_with_option(
        syn(
            dst=dst,
            dport=dport,
            src=src,
            sport=sport,
            vlans=vlans,
            options=before,
            payload=payload,
            ext=ext,
        ),
        opt,
    )


PACKET_REASONS = set(layout.GUARD_VERDICTS + layout.GUARD_PASS_REASONS)


def run(guard: Guard, data: bytes) -> tuple[int, dict[str, int]]:
    """(retval, counter deltas) for one packet; the packet must come out as it went in."""
    before = guard.stats()
    r = guard.prog.test_run(data)
    after = guard.stats()
    assert r.data_out == data, "the guard must never modify a packet"
    counted = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    per_packet = {k: v for k, v in counted.items() if k in PACKET_REASONS}
    assert len(per_packet) == 1 and sum(per_packet.values()) == 1, counted
    return r.retval, counted


def verdict(guard: Guard, data: bytes) -> str:
    """The one verdict or pass reason the guard counted for DATA."""
    _, counted = run(guard, data)
    (reason,) = (k for k in counted if k in PACKET_REASONS)
    return reason
