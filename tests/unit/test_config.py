"""netoken.config: the design.md §4 schema, and one-line errors for every bad case."""

from __future__ import annotations

import ipaddress
import os
import pickle
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netoken.config import (
    BIND_SADDR,
    BIND_SPORT,
    AgentConfig,
    Config,
    ConfigError,
    GuardConfig,
    Key,
    OptionConfig,
    Policy,
    PortRange,
    Protect,
    generate_key,
    key_file_bytes,
    load,
    parse,
)

K1_HEX = "000102030405060708090a0b0c0d0e0f"
K2_HEX = "F0E1D2C3B4A5968778695A4B3C2D1E0F"

# The design.md §4 example, with the key path made a placeholder.
EXAMPLE = """
[option]
kind = 253
exid = 0x6E74
make_room = true                    # drop Timestamps when a SYN has no room (§3)

[[key]]
id = 1
file = "{k1}"   # 16 random bytes as 32 hex chars; mode 0600
window = 30                         # seconds per epoch
bind = []                           # extra MAC inputs: "saddr", "sport"

[[policy]]                          # marker: which SYNs get which token
name = "game"
destinations = ["203.0.113.0/24", "2001:db8::/64"]
ports = [443, "7000-7100"]          # omitted or empty = all ports
mode = "mac"                        # or "static"
key = 1                             # mac mode
# token = "0x1122334455667788"      # static mode

[guard]
action = "drop"                     # or "monitor"
skew = 1                            # epochs of tolerance either side
replay_cache = 1048576              # entries
[[guard.protect]]
destinations = ["203.0.113.10/32"]
ports = [7000]
keys = [1]                          # key ids accepted here
"""


def write_key(path: Path, text: str = K1_HEX + "\n", mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    d.mkdir()
    write_key(d / "1.key")
    write_key(d / "2.key", "  " + K2_HEX + "  \n\n")
    return d


def load_text(tmp_path: Path, text: str) -> Config:
    cfg = tmp_path / "netoken.toml"
    cfg.write_text(text)
    return load(cfg)


# --------------------------------------------------------------------------
# Valid configurations


def test_design_example_loads(tmp_path: Path, keydir: Path) -> None:
    k1 = keydir / "1.key"
    cfg = load_text(tmp_path, EXAMPLE.format(k1=k1))
    key = Key(id=1, file=k1, secret=bytes.fromhex(K1_HEX), window=30, bind=())
    assert cfg == Config(
        path=tmp_path / "netoken.toml",
        option=OptionConfig(kind=253, exid=0x6E74),
        keys={1: key},
        policies=(
            Policy(
                name="game",
                destinations=(
                    ipaddress.IPv4Network("203.0.113.0/24"),
                    ipaddress.IPv6Network("2001:db8::/64"),
                ),
                ports=(PortRange(443, 443), PortRange(7000, 7100)),
                mode="mac",
                keys=(1,),
                token=None,
            ),
        ),
        guard=GuardConfig(
            action="drop",
            skew=1,
            replay_cache=1048576,
            protect=(
                Protect(
                    destinations=(ipaddress.IPv4Network("203.0.113.10/32"),),
                    ports=(PortRange(7000, 7000),),
                    keys=(1,),
                    action=None,
                ),
            ),
        ),
    )
    assert cfg.keys[1].secret == bytes(range(16))
    assert cfg.guard is not None
    assert cfg.guard.action_for(cfg.guard.protect[0]) == "drop"


def test_defaults_and_optional_tables(tmp_path: Path, keydir: Path) -> None:
    cfg = load_text(
        tmp_path,
        """
[[key]]
id = 2
file = "keys/2.key"
bind = ["sport", "saddr", "sport"]

[[policy]]
name = "legacy"
destinations = ["198.51.100.7"]
mode = "static"
token = "0x1122334455667788"

[[policy]]
name = "big"
destinations = ["198.51.100.0/24"]
mode = "static"
token = "18446744073709551615"

[[policy]]
name = "dflt"
destinations = ["::/0", "0.0.0.0/0"]
key = 2

[guard]
action = "monitor"
[[guard.protect]]
destinations = ["2001:db8::/48"]
keys = [2, 2]
action = "drop"
""",
    )
    assert cfg.option == OptionConfig(253, 0x6E74)
    k = cfg.keys[2]
    # relative key path resolves against the config file's directory
    assert k.file == keydir / "2.key"
    assert k.secret == bytes.fromhex(K2_HEX)
    assert k.window == 30
    assert k.bind == ("saddr", "sport")
    assert k.bind_mask == BIND_SADDR | BIND_SPORT == 3
    legacy, big, dflt = cfg.policies
    assert legacy.destinations == (ipaddress.ip_network("198.51.100.7/32"),)
    assert legacy.ports == () and legacy.keys == ()
    assert legacy.token == 0x1122334455667788
    assert big.token == 2**64 - 1
    assert dflt.mode == "mac" and dflt.keys == (2,) and dflt.token is None
    assert cfg.guard == GuardConfig(
        action="monitor",
        skew=1,
        replay_cache=1 << 20,
        protect=(Protect((ipaddress.ip_network("2001:db8::/48"),), (), (2,), "drop"),),
    )
    assert cfg.guard.action_for(cfg.guard.protect[0]) == "drop"
    assert cfg.guard.fragments == "drop"


def test_guard_fragments_setting(tmp_path: Path, keydir: Path) -> None:
    for value in ("pass", "drop"):
        text = guard(PROT, f'fragments = "{value}"\n').format(k1=keydir / "1.key")
        cfg = load_text(tmp_path, text)
        assert cfg.guard is not None and cfg.guard.fragments == value


def test_make_room_is_on_unless_turned_off() -> None:
    assert parse("").option.make_room is True
    assert parse("[option]\nmake_room = true\n").option.make_room is True
    assert parse("[option]\nmake_room = false\n").option == OptionConfig(make_room=False)


def test_empty_config_is_valid() -> None:
    cfg = parse("")
    assert cfg.option == OptionConfig()
    assert cfg.keys == {} and cfg.policies == () and cfg.guard is None


def test_parse_base_dir(tmp_path: Path, keydir: Path) -> None:
    text = 'option = {kind = 254, exid = 0}\n[[key]]\nid = 0\nfile = "1.key"\n'
    cfg = parse(text, path="x.toml", base_dir=keydir)
    assert cfg.option == OptionConfig(254, 0)
    assert cfg.keys[0].file == keydir / "1.key"
    assert cfg.path == Path("x.toml")


def test_bind_mask_values(keydir: Path) -> None:
    def mk(*bind: str) -> Key:
        return Key(1, keydir / "1.key", bytes(16), bind=bind)

    assert mk().bind_mask == 0
    assert mk("saddr").bind_mask == BIND_SADDR == 1
    assert mk("sport").bind_mask == BIND_SPORT == 2


def test_static_token_forms(tmp_path: Path) -> None:
    base = '[[policy]]\nname = "s"\ndestinations = ["10.0.0.0/8"]\nmode = "static"\n'
    for token, want in [
        ("1", 1),
        ('"0xAbCd"', 0xABCD),
        ('"4_096"', 4096),
        ('"0xffff_ffff_ffff_ffff"', 2**64 - 1),
        ("0", 0),
    ]:
        cfg = parse(base + f"token = {token}\n")
        assert cfg.policies[0].token == want


def test_key_repr_hides_secret(tmp_path: Path, keydir: Path) -> None:
    cfg = load_text(tmp_path, EXAMPLE.format(k1=keydir / "1.key"))
    for text in (repr(cfg.keys[1]), str(cfg.keys[1]), repr(cfg)):
        assert K1_HEX not in text.lower()
        assert repr(bytes(range(16))) not in text
        assert "<16 bytes>" in text


def test_non_identical_prefixes_may_overlap(tmp_path: Path) -> None:
    # LPM picks the most specific prefix: nested prefixes are not a conflict,
    # and neither are identical prefixes with disjoint (non-empty) port sets.
    cfg = parse(
        """
[[policy]]
name = "a"
destinations = ["10.0.0.0/8"]
mode = "static"
token = 1
[[policy]]
name = "b"
destinations = ["10.1.0.0/16"]
mode = "static"
token = 2
"""
    )
    assert len(cfg.policies) == 2
    cfg = parse(
        """
[[policy]]
name = "a"
destinations = ["10.0.0.0/8"]
ports = [80, "100-200"]
mode = "static"
token = 1
[[policy]]
name = "b"
destinations = ["10.0.0.0/8"]
ports = [81, "201-300"]
mode = "static"
token = 2
"""
    )
    assert [p.name for p in cfg.policies] == ["a", "b"]


# --------------------------------------------------------------------------
# Bad configurations: exact ENTRY, a fragment of PROBLEM, one line, file named.

KEY = '[[key]]\nid = 1\nfile = "{k1}"\n'
KEY2 = '[[key]]\nid = 2\nfile = "{k2}"\n'


def pol(body: str, name: str | None = "game") -> str:
    head = "[[policy]]\n" + (f'name = "{name}"\n' if name is not None else "")
    return KEY + head + body


MAC = 'destinations = ["10.0.0.0/24"]\nkey = 1\n'
STATIC = 'destinations = ["10.0.0.0/24"]\nmode = "static"\n'


def guard(protect: str, head: str = "") -> str:
    return KEY + "[guard]\n" + head + "[[guard.protect]]\n" + protect


PROT = 'destinations = ["10.0.0.1/32"]\nkeys = [1]\n'

Setup = Callable[[Path, pytest.MonkeyPatch], None]


def key_setup(text: str | None = None, mode: int = 0o600) -> Setup:
    """Replace keys/1.key with the given contents/mode (None: delete it)."""

    def setup(keydir: Path, _mp: pytest.MonkeyPatch) -> None:
        p = keydir / "1.key"
        p.unlink()
        if text is not None:
            write_key(p, text, mode)

    return setup


def unreadable(keydir: Path, mp: pytest.MonkeyPatch) -> None:
    p = keydir / "1.key"
    p.chmod(0o200)  # owner write-only: passes the group/other check, fails read
    if os.geteuid() == 0:  # root reads anything; simulate the EACCES
        real_open = os.open

        def fake_open(path, flags, *args, **kw):  # type: ignore[no-untyped-def]
            if os.fspath(path) == str(p):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args, **kw)

        mp.setattr(os, "open", fake_open)


def key_is_dir(keydir: Path, _mp: pytest.MonkeyPatch) -> None:
    (keydir / "1.key").unlink()
    (keydir / "1.key").mkdir()


BAD: list[tuple[str, str, str, str, Setup | None]] = [
    # (id, toml, ENTRY, PROBLEM fragment, setup)
    ("syntax", "[option\nkind = 253\n", "line 1, column 8", "invalid TOML", None),
    ("syntax-eof", "kind = ", "end of document", "invalid TOML", None),
    ("unknown-top", "polcy = 1\n", "top level", 'unknown key "polcy"', None),
    (
        "unknown-top-allowed",
        "x = 1\n",
        "top level",
        "allowed: agent, guard, key, option, policy",
        None,
    ),
    (
        "unknown-option",
        "[option]\nkinds = 253\n",
        "[option]",
        "allowed: exid, kind, make_room",
        None,
    ),
    ("unknown-key", KEY + "windw = 3\n", "key 1", '(did you mean "window"?)', None),
    (
        "unknown-policy",
        pol(MAC + "port = [1]\n"),
        'policy "game"',
        'unknown key "port"',
        None,
    ),
    ("unknown-guard", guard(PROT, "mode = 1\n"), "guard", 'unknown key "mode"', None),
    (
        "unknown-protect",
        guard(PROT + "key = 1\n"),
        "guard.protect #1",
        'unknown key "key"',
        None,
    ),
    ("option-not-table", "option = 5\n", "[option]", "must be a table", None),
    (
        "key-not-array",
        "[key]\nid = 1\n",
        "key",
        "must be an array of tables ([[key]])",
        None,
    ),
    (
        "policy-not-array",
        'policy = "x"\n',
        "policy",
        "must be an array of tables",
        None,
    ),
    (
        "port-abc",
        pol(MAC + 'ports = ["abc"]\n'),
        'policy "game"',
        'port "abc" is not a port number',
        None,
    ),
    (
        "port-float",
        pol(MAC + "ports = [1.5]\n"),
        'policy "game"',
        "got float 1.5",
        None,
    ),
    (
        "port-bool",
        pol(MAC + "ports = [true]\n"),
        'policy "game"',
        "got boolean true",
        None,
    ),
    (
        "ports-not-array",
        pol(MAC + "ports = 443\n"),
        'policy "game"',
        "ports must be an array",
        None,
    ),
    (
        "id-string",
        '[[key]]\nid = "1"\nfile = "{k1}"\n',
        "key #1",
        'id must be an integer, got string "1"',
        None,
    ),
    ("id-missing", '[[key]]\nfile = "{k1}"\n', "key #1", "id is required", None),
    (
        "window-string",
        KEY + 'window = "30"\n',
        "key 1",
        "window must be an integer",
        None,
    ),
    (
        "kind-string",
        '[option]\nkind = "253"\n',
        "[option]",
        "kind must be an integer",
        None,
    ),
    (
        "policy-key-string",
        pol('destinations = ["10.0.0.0/24"]\nkey = "1"\n'),
        'policy "game"',
        "key must be an integer",
        None,
    ),
    (
        "bad-cidr",
        pol('destinations = ["10.0.0.300/24"]\nkey = 1\n'),
        'policy "game"',
        'destination "10.0.0.300/24" is not an IPv4 or IPv6 prefix',
        None,
    ),
    (
        "bad-cidr-len",
        pol('destinations = ["10.0.0.0/33"]\nkey = 1\n'),
        'policy "game"',
        "is not an IPv4 or IPv6 prefix",
        None,
    ),
    (
        "cidr-not-string",
        pol("destinations = [10]\nkey = 1\n"),
        'policy "game"',
        "destination must be a string",
        None,
    ),
    (
        "host-bits",
        pol('destinations = ["10.0.0.1/24"]\nkey = 1\n'),
        'policy "game"',
        'destination "10.0.0.1/24" has host bits set',
        None,
    ),
    (
        "host-bits-v6",
        pol('destinations = ["2001:db8::1/64"]\nkey = 1\n'),
        'policy "game"',
        "has host bits set; did you mean 2001:db8::/64?",
        None,
    ),
    (
        "host-bits-protect",
        guard('destinations = ["10.0.0.1/8"]\nkeys = [1]\n'),
        "guard.protect #1",
        "has host bits set",
        None,
    ),
    (
        "port-0",
        pol(MAC + "ports = [0]\n"),
        'policy "game"',
        "port 0 is out of range 1..65535",
        None,
    ),
    (
        "port-65536",
        pol(MAC + "ports = [65536]\n"),
        'policy "game"',
        "port 65536 is out of range",
        None,
    ),
    (
        "port-range-high",
        pol(MAC + 'ports = ["7000-70000"]\n'),
        'policy "game"',
        'port 70000 in "7000-70000" is out of range',
        None,
    ),
    (
        "port-range-0",
        pol(MAC + 'ports = ["0-10"]\n'),
        'policy "game"',
        "port 0 in",
        None,
    ),
    (
        "port-reversed",
        pol(MAC + 'ports = ["7100-7000"]\n'),
        'policy "game"',
        'port range "7100-7000" is reversed',
        None,
    ),
    (
        "port-protect",
        guard(PROT + "ports = [0]\n"),
        "guard.protect #1",
        "port 0 is out of range",
        None,
    ),
    (
        "dup-policy-name",
        pol(MAC) + '[[policy]]\nname = "game"\n' + 'destinations = ["10.9.0.0/24"]\nkey = 1\n',
        'policy "game"',
        "duplicate policy name (policies #1 and #2)",
        None,
    ),
    (
        "dup-key-id",
        KEY + '[[key]]\nid = 1\nfile = "{k2}"\n',
        "key 1",
        "duplicate key id 1 (key entries #1 and #2)",
        None,
    ),
    (
        "overlap-all-ports",
        pol(MAC) + '[[policy]]\nname = "b"\n' + MAC,
        'policy "b"',
        'destination 10.0.0.0/24 overlaps policy "game" (same prefix, both cover all ports)',
        None,
    ),
    (
        "overlap-ranges",
        pol(MAC + 'ports = [22, "7000-7100"]\n')
        + '[[policy]]\nname = "b"\n'
        + MAC
        + 'ports = ["7050-8000"]\n',
        'policy "b"',
        'overlaps policy "game" (same prefix, both cover port 7050-7100)',
        None,
    ),
    (
        "overlap-one-empty",
        pol(MAC + "ports = [443]\n") + '[[policy]]\nname = "b"\n' + MAC,
        'policy "b"',
        'overlaps policy "game" (same prefix, both cover port 443)',
        None,
    ),
    (
        "overlap-v6-spelling",
        pol('destinations = ["2001:db8::/64"]\nkey = 1\n')
        + '[[policy]]\nname = "b"\ndestinations = ["2001:0DB8:0::/64"]\nkey = 1\n',
        'policy "b"',
        'destination 2001:db8::/64 overlaps policy "game"',
        None,
    ),
    (
        "overlap-protect",
        guard(PROT) + "[[guard.protect]]\n" + PROT,
        "guard.protect #2",
        "overlaps guard.protect #1",
        None,
    ),
    ("key-missing", KEY, "key 1", "1.key does not exist", key_setup(None)),
    ("key-unreadable", KEY, "key 1", "cannot be read: Permission denied", unreadable),
    ("key-is-dir", KEY, "key 1", "is not a regular file", key_is_dir),
    (
        "key-short",
        KEY,
        "key 1",
        "has 30 hex characters, expected 32",
        key_setup(K1_HEX[:30]),
    ),
    (
        "key-long",
        KEY,
        "key 1",
        "has 34 hex characters, expected 32",
        key_setup(K1_HEX + "00"),
    ),
    ("key-empty", KEY, "key 1", "has 0 hex characters", key_setup("")),
    ("key-not-hex", KEY, "key 1", "is not hex", key_setup("zz" + K1_HEX[2:])),
    (
        "key-inner-space",
        KEY,
        "key 1",
        "is not hex",
        key_setup(K1_HEX[:16] + " " + K1_HEX[16:]),
    ),
    ("key-binary", KEY, "key 1", "is not hex", key_setup("\xff" * 32)),
    (
        "key-mode-0644",
        KEY,
        "key 1",
        "is readable by group/others (mode 0644); chmod 600 it",
        key_setup(K1_HEX, 0o644),
    ),
    (
        "key-mode-0640",
        KEY,
        "key 1",
        "(mode 0640); chmod 600 it",
        key_setup(K1_HEX, 0o640),
    ),
    (
        "key-mode-0604",
        KEY,
        "key 1",
        "is readable by group/others (mode 0604)",
        key_setup(K1_HEX, 0o604),
    ),
    (
        "key-mode-0620",
        KEY,
        "key 1",
        "is accessible by group/others (mode 0620); chmod 600 it",
        key_setup(K1_HEX, 0o620),
    ),
    ("key-file-missing-field", "[[key]]\nid = 1\n", "key 1", "file is required", None),
    (
        "key-file-not-string",
        "[[key]]\nid = 1\nfile = 1\n",
        "key 1",
        "file must be a non-empty string",
        None,
    ),
    (
        "key-id-256",
        '[[key]]\nid = 256\nfile = "{k1}"\n',
        "key #1",
        "id = 256 is out of range 0..255",
        None,
    ),
    (
        "key-id-neg",
        '[[key]]\nid = -1\nfile = "{k1}"\n',
        "key #1",
        "id = -1 is out of range 0..255",
        None,
    ),
    (
        "window-0",
        KEY + "window = 0\n",
        "key 1",
        "window = 0 is out of range 1..86400",
        None,
    ),
    (
        "window-big",
        KEY + "window = 86401\n",
        "key 1",
        "window = 86401 is out of range 1..86400",
        None,
    ),
    (
        "bind-bad",
        KEY + 'bind = ["daddr"]\n',
        "key 1",
        'bind value "daddr" is not "saddr" or "sport"',
        None,
    ),
    (
        "bind-not-string",
        KEY + "bind = [1]\n",
        "key 1",
        'bind value 1 is not "saddr"',
        None,
    ),
    (
        "policy-unknown-key",
        pol('destinations = ["10.0.0.0/24"]\nkey = 9\n'),
        'policy "game"',
        "key 9, which is not defined (defined keys: 1)",
        None,
    ),
    (
        "protect-unknown-key",
        guard('destinations = ["10.0.0.1/32"]\nkeys = [1, 7]\n'),
        "guard.protect #1",
        "keys refers to key 7, which is not defined",
        None,
    ),
    (
        "protect-key-string",
        guard('destinations = ["10.0.0.1/32"]\nkeys = ["1"]\n'),
        "guard.protect #1",
        "keys must hold integer key ids",
        None,
    ),
    (
        "protect-keys-empty",
        guard('destinations = ["10.0.0.1/32"]\nkeys = []\n'),
        "guard.protect #1",
        "keys must not be empty",
        None,
    ),
    (
        "protect-keys-missing",
        guard('destinations = ["10.0.0.1/32"]\n'),
        "guard.protect #1",
        "keys is required",
        None,
    ),
    (
        "mac-without-key",
        pol('destinations = ["10.0.0.0/24"]\nmode = "mac"\n'),
        'policy "game"',
        'mode "mac" requires key',
        None,
    ),
    (
        "default-mac-without-key",
        pol('destinations = ["10.0.0.0/24"]\n'),
        'policy "game"',
        'mode "mac" requires key',
        None,
    ),
    (
        "mac-with-token",
        pol(MAC + "token = 5\n"),
        'policy "game"',
        'token is only for mode = "static"',
        None,
    ),
    (
        "static-without-token",
        pol(STATIC),
        'policy "game"',
        'mode "static" requires token',
        None,
    ),
    (
        "static-with-key",
        pol(STATIC + "token = 1\nkey = 1\n"),
        'policy "game"',
        'key is only for mode = "mac"',
        None,
    ),
    (
        "token-too-big-int",
        pol(STATIC + "token = 18446744073709551616\n"),
        'policy "game"',
        "does not fit in 64 bits",
        None,
    ),
    (
        "token-too-big-hex",
        pol(STATIC + 'token = "0x1_0000_0000_0000_0000"\n'),
        'policy "game"',
        "does not fit in 64 bits",
        None,
    ),
    (
        "token-negative",
        pol(STATIC + "token = -1\n"),
        'policy "game"',
        "token -1 does not fit in 64 bits",
        None,
    ),
    (
        "token-not-number",
        pol(STATIC + 'token = "0xZZ"\n'),
        'policy "game"',
        'token "0xZZ" is not a number',
        None,
    ),
    (
        "token-signed-string",
        pol(STATIC + 'token = "-5"\n'),
        'policy "game"',
        "is not a number",
        None,
    ),
    (
        "token-float",
        pol(STATIC + "token = 1.0\n"),
        'policy "game"',
        "token must be an integer or a",
        None,
    ),
    (
        "mode-bad",
        pol(STATIC.replace('"static"', '"hmac"') + "token = 1\n"),
        'policy "game"',
        'mode must be "mac" or "static", got string "hmac"',
        None,
    ),
    (
        "kind-252",
        "[option]\nkind = 252\n",
        "[option]",
        "kind = 252 is not an experimental option kind; use 253 or 254",
        None,
    ),
    (
        "kind-300",
        "[option]\nkind = 300\n",
        "[option]",
        "kind = 300 is out of range",
        None,
    ),
    (
        "exid-big",
        "[option]\nexid = 0x10000\n",
        "[option]",
        "exid = 65536 is out of range 0..65535",
        None,
    ),
    (
        "make-room-string",
        '[option]\nmake_room = "yes"\n',
        "[option]",
        'make_room must be true or false, got string "yes"',
        None,
    ),
    (
        "make-room-integer",
        "[option]\nmake_room = 1\n",
        "[option]",
        "make_room must be true or false, got integer 1",
        None,
    ),
    (
        "exid-neg",
        "[option]\nexid = -1\n",
        "[option]",
        "exid = -1 is out of range",
        None,
    ),
    (
        "guard-action",
        guard(PROT, 'action = "reject"\n'),
        "guard",
        'action must be "drop" or "monitor", got string "reject"',
        None,
    ),
    (
        "guard-fragments",
        guard(PROT, 'fragments = "reassemble"\n'),
        "guard",
        'fragments must be "drop" or "pass", got string "reassemble"',
        None,
    ),
    (
        "guard-fragments-bool",
        guard(PROT, "fragments = false\n"),
        "guard",
        'fragments must be "drop" or "pass", got boolean false',
        None,
    ),
    (
        "protect-fragments",
        guard(PROT + 'fragments = "pass"\n'),
        "guard.protect #1",
        'unknown key "fragments"',
        None,
    ),
    (
        "protect-action",
        guard(PROT + 'action = "allow"\n'),
        "guard.protect #1",
        'action must be "drop" or "monitor"',
        None,
    ),
    (
        "skew-neg",
        guard(PROT, "skew = -1\n"),
        "guard",
        "skew = -1 is out of range 0..16",
        None,
    ),
    (
        "skew-17",
        guard(PROT, "skew = 17\n"),
        "guard",
        "skew = 17 is out of range 0..16",
        None,
    ),
    (
        "replay-small",
        guard(PROT, "replay_cache = 1023\n"),
        "guard",
        "replay_cache = 1023 is out of range 1024..67108864",
        None,
    ),
    (
        "replay-big",
        guard(PROT, f"replay_cache = {2**26 + 1}\n"),
        "guard",
        "replay_cache = 67108865 is out of range",
        None,
    ),
    (
        "guard-no-protect",
        KEY + '[guard]\naction = "drop"\n',
        "guard",
        "no [[guard.protect]] entries",
        None,
    ),
    ("guard-not-table", "guard = 1\n", "guard", "must be a table ([guard])", None),
    (
        "empty-destinations",
        pol("destinations = []\nkey = 1\n"),
        'policy "game"',
        "destinations must not be empty",
        None,
    ),
    (
        "missing-destinations",
        pol("key = 1\n"),
        'policy "game"',
        "destinations is required",
        None,
    ),
    (
        "empty-destinations-protect",
        guard("destinations = []\nkeys = [1]\n"),
        "guard.protect #1",
        "destinations must not be empty",
        None,
    ),
    ("policy-name-missing", pol(MAC, name=None), "policy #1", "name is required", None),
    ("policy-name-empty", pol(MAC, name=""), "policy #1", "must be non-empty", None),
    (
        "policy-name-newline",
        pol(MAC, name="a\\nb"),
        "policy #1",
        'name "a\\nb" must be non-empty and free of control characters',
        None,
    ),
    (
        "policy-name-int",
        KEY + "[[policy]]\nname = 3\n" + MAC,
        "policy #1",
        "name must be a string, got integer 3",
        None,
    ),
    (
        "policy-second-unnamed",
        pol(MAC) + "[[policy]]\n" + 'destinations = ["10.1.0.0/24"]\nkey = 1\n',
        "policy #2",
        "name is required",
        None,
    ),
    (
        "policy-key-and-keys",
        pol(MAC + "keys = [1]\n"),
        'policy "game"',
        "key and keys are alternatives",
        None,
    ),
    (
        "policy-keys-empty",
        pol('destinations = ["10.0.0.0/24"]\nkeys = []\n'),
        'policy "game"',
        "keys must not be empty",
        None,
    ),
    (
        "policy-keys-undefined",
        pol('destinations = ["10.0.0.0/24"]\nkeys = [1, 7]\n'),
        'policy "game"',
        "keys refers to key 7, which is not defined",
        None,
    ),
    (
        "policy-keys-string",
        pol('destinations = ["10.0.0.0/24"]\nkeys = ["1"]\n'),
        'policy "game"',
        'keys must hold integer key ids, got string "1"',
        None,
    ),
    (
        "policy-keys-static",
        pol(STATIC + "token = 1\nkeys = [1]\n"),
        'policy "game"',
        'keys is only for mode = "mac"',
        None,
    ),
    (
        "policy-keys-none-started",
        KEY.replace("\n", "\nmark_from = 2999-01-01T00:00:00Z\n", 1)
        + '[[policy]]\nname = "game"\n'
        + MAC,
        'policy "game"',
        "none of its keys is in use yet (key 1 starts first, at 2999-01-01T00:00:00Z)",
        None,
    ),
    (
        "mark-from-local",
        KEY + "mark_from = 2026-01-01T00:00:00\n",
        "key 1",
        "mark_from 2026-01-01T00:00:00 has no UTC offset",
        None,
    ),
    (
        "mark-from-local-string",
        KEY + 'mark_from = "2026-01-01 00:00"\n',
        "key 1",
        "has no UTC offset",
        None,
    ),
    (
        "mark-from-date",
        KEY + "mark_from = 2026-01-01\n",
        "key 1",
        "mark_from must be a date-time with a UTC offset (e.g. 2026-12-02T00:00:00Z), got datetime",
        None,
    ),
    (
        "mark-from-garbage",
        KEY + 'mark_from = "tomorrow"\n',
        "key 1",
        'mark_from "tomorrow" is not an RFC 3339 date-time',
        None,
    ),
    ("mark-from-int", KEY + "mark_from = 1700000000\n", "key 1", "got integer 1700000000", None),
    ("agent-unknown", "[agent]\nmarks = []\n", "[agent]", '(did you mean "mark"?)', None),
    ("agent-not-list", '[agent]\nmark = "eth0"\n', "[agent]", "mark must be an array", None),
    (
        "agent-int",
        "[agent]\nguard = [1]\n",
        "[agent]",
        "guard must hold interface names or patterns, got integer 1",
        None,
    ),
    (
        "agent-slash",
        '[agent]\nmark = ["a/b"]\n',
        "[agent]",
        'mark: "a/b" is not an interface name or pattern',
        None,
    ),
    (
        "agent-guard-without-guard",
        '[agent]\nguard = ["eth*"]\n',
        "[agent]",
        "guard names interfaces but there is no [guard] section",
        None,
    ),
    (
        "agent-metrics-port",
        '[agent]\nmetrics = "127.0.0.1"\n',
        "[agent]",
        "metrics: '127.0.0.1': expected ADDR:PORT",
        None,
    ),
    (
        "agent-metrics-int",
        "[agent]\nmetrics = 9917\n",
        "[agent]",
        'metrics must be a string "ADDR:PORT"',
        None,
    ),
]


@pytest.mark.parametrize(
    ("text", "entry", "fragment", "setup"),
    [pytest.param(t, e, f, s, id=i) for i, t, e, f, s in BAD],
)
def test_bad_config(
    tmp_path: Path,
    keydir: Path,
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    entry: str,
    fragment: str,
    setup: Setup | None,
) -> None:
    if setup is not None:
        setup(keydir, monkeypatch)
    cfg = tmp_path / "netoken.toml"
    cfg.write_text(text.format(k1=keydir / "1.key", k2=keydir / "2.key"))
    with pytest.raises(ConfigError) as info:
        load(cfg)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg
    assert msg.startswith(f"{cfg}: {entry}: "), msg
    assert fragment in msg, msg
    assert info.value.file == str(cfg)
    assert info.value.entry == entry
    assert msg == f"{cfg}: {entry}: {info.value.problem}"


def test_bad_ids_are_unique() -> None:
    ids = [case[0] for case in BAD]
    assert len(ids) == len(set(ids))


def test_parse_uses_given_name() -> None:
    with pytest.raises(ConfigError) as info:
        parse("[option]\nkind = 1\n", path="/etc/netoken/netoken.toml")
    assert str(info.value).startswith("/etc/netoken/netoken.toml: [option]: kind = 1 ")
    with pytest.raises(ConfigError) as info:
        parse("[option]\nkind = 1\n")
    assert str(info.value).startswith("<string>: [option]: ")


def test_key_file_path_in_problem(tmp_path: Path, keydir: Path) -> None:
    (keydir / "1.key").chmod(0o644)
    cfg = tmp_path / "netoken.toml"
    cfg.write_text(KEY.format(k1=keydir / "1.key"))
    with pytest.raises(ConfigError) as info:
        load(cfg)
    assert str(info.value) == (
        f"{cfg}: key 1: file {keydir / '1.key'} is readable by group/others "
        "(mode 0644); chmod 600 it"
    )


def test_key_contents_never_echoed(tmp_path: Path, keydir: Path) -> None:
    secretish = "s3cr3t-passphrase-not-hex-at-all"
    write_key(keydir / "1.key", secretish)
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, KEY.format(k1=keydir / "1.key"))
    assert secretish not in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.toml")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'nope.toml'}: cannot read config: ")
    assert "\n" not in msg


def test_config_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "netoken.toml"
    p.write_bytes(b"# \xff\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load(p)


def test_error_is_one_line_even_with_newlines_in_problem() -> None:
    e = ConfigError("f.toml", "guard", "a\nb\rc")
    assert str(e) == "f.toml: guard: a\\nb\\rc"
    assert str(pickle.loads(pickle.dumps(e))) == str(e)
    assert str(ConfigError("k.key", None, "exists")) == "k.key: exists"


# --------------------------------------------------------------------------
# key_file_bytes / generate_key


def test_key_file_bytes(keydir: Path) -> None:
    assert key_file_bytes(keydir / "1.key") == bytes(range(16))
    assert key_file_bytes(str(keydir / "2.key")) == bytes.fromhex(K2_HEX)
    (keydir / "1.key").chmod(0o640)
    with pytest.raises(ConfigError) as info:
        key_file_bytes(keydir / "1.key")
    assert str(info.value) == (
        f"{keydir / '1.key'}: is readable by group/others (mode 0640); chmod 600 it"
    )


def test_key_file_via_symlink(keydir: Path) -> None:
    link = keydir / "current.key"
    link.symlink_to(keydir / "1.key")
    assert key_file_bytes(link) == bytes(range(16))


def test_generate_key(tmp_path: Path) -> None:
    p = tmp_path / "new.key"
    generate_key(p)
    st_ = p.stat()
    assert stat.S_IMODE(st_.st_mode) == 0o600
    text = p.read_text()
    assert len(text) == 33 and text.endswith("\n")
    assert int(text, 16) >= 0
    assert len(key_file_bytes(p)) == 16
    generate_key(tmp_path / "other.key")
    assert key_file_bytes(tmp_path / "other.key") != key_file_bytes(p)


def test_generate_key_refuses_overwrite(tmp_path: Path) -> None:
    p = tmp_path / "k.key"
    generate_key(p)
    before = p.read_bytes()
    with pytest.raises(ConfigError) as info:
        generate_key(p)
    assert str(info.value) == f"{p}: exists; refusing to overwrite"
    assert p.read_bytes() == before


def test_generate_key_refuses_dangling_symlink(tmp_path: Path) -> None:
    # O_EXCL must not follow a planted link to create a file elsewhere.
    p = tmp_path / "k.key"
    p.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="exists; refusing to overwrite"):
        generate_key(p)
    assert not (tmp_path / "elsewhere").exists()


def test_generate_key_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create"):
        generate_key(tmp_path / "no" / "k.key")


def test_generate_key_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        generate_key(tmp_path / "k.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600


# --------------------------------------------------------------------------
# Properties


@given(lo=st.integers(1, 65535), hi=st.integers(1, 65535))
def test_port_range_strings(lo: int, hi: int) -> None:
    text = (
        f'[[policy]]\nname = "p"\ndestinations = ["10.0.0.0/8"]\n'
        f'ports = ["{lo}-{hi}", {lo}]\nmode = "static"\ntoken = 1\n'
    )
    if lo <= hi:
        assert parse(text).policies[0].ports == (PortRange(lo, hi), PortRange(lo, lo))
    else:
        with pytest.raises(ConfigError, match="is reversed"):
            parse(text)


@given(token=st.integers(0, 2**64 - 1), as_hex=st.booleans())
def test_token_roundtrip(token: int, as_hex: bool) -> None:
    shown = f'"{token:#x}"' if as_hex else f'"{token}"'
    text = (
        f'[[policy]]\nname = "s"\ndestinations = ["10.0.0.0/8"]\nmode = "static"\ntoken = {shown}\n'
    )
    assert parse(text).policies[0].token == token


def test_port_range_helpers() -> None:
    r = PortRange(7000, 7100)
    assert 7000 in r and 7100 in r and 6999 not in r
    assert r.overlaps(PortRange(7100, 8000)) and not r.overlaps(PortRange(7101, 8000))
    assert str(r) == "7000-7100" and str(PortRange(443, 443)) == "443"


# --------------------------------------------------------------------------
# Key schedule and [agent]

SCHEDULE = """
[[key]]
id = 1
file = "{k1}"

[[key]]
id = 2
file = "{k2}"
mark_from = {t2}

[[key]]
id = 3
file = "{k1}"
mark_from = "{t3}"

[[policy]]
name = "a"
destinations = ["10.0.0.0/24"]
keys = [1, 2, 3, 2]

[[policy]]
name = "b"
destinations = ["10.1.0.0/24"]
keys = [2, 1]

[[policy]]
name = "c"
destinations = ["10.2.0.0/24"]
key = 1

[agent]
mark = ["eth0", "lxc*"]
guard = []
metrics = "[::1]:9917"
"""


def test_key_schedule(tmp_path: Path, keydir: Path) -> None:
    import datetime as dt

    cfg = load_text(
        tmp_path,
        SCHEDULE.format(
            k1=keydir / "1.key",
            k2=keydir / "2.key",
            t2="2020-01-01T01:00:00+01:00",
            t3="2999-06-01T12:00:00Z",
        ),
    )
    k2, k3 = cfg.keys[2], cfg.keys[3]
    assert k2.mark_from == dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    assert str(k2.mark_from.tzinfo) == "UTC"
    assert k3.mark_from == dt.datetime(2999, 6, 1, 12, tzinfo=dt.UTC)
    assert cfg.keys[1].mark_from is None and cfg.keys[1].starts == float("-inf")
    a, b, c = cfg.policies
    assert a.keys == (1, 2, 3) and b.keys == (2, 1) and c.keys == (1,)
    t2, t3 = k2.starts, k3.starts
    # before key 2 starts: only key 1 has started
    assert cfg.marking_keys(t2 - 1) == {"a": 1, "b": 1, "c": 1}
    # key 2 started later than key 1 (always): it wins wherever it is listed
    assert cfg.marking_keys(t2) == {"a": 2, "b": 2, "c": 1}
    assert cfg.marking_keys(t3) == {"a": 3, "b": 2, "c": 1}
    assert cfg.next_switch(t2 - 1) == t2
    assert cfg.next_switch(t2) == t3
    assert cfg.next_switch(t3) is None
    assert cfg.agent is not None
    assert cfg.agent.mark == ("eth0", "lxc*") and cfg.agent.guard == ()
    assert cfg.agent.metrics == "[::1]:9917"
    assert "mark_from=" in repr(k2)


def test_schedule_ties_go_to_the_key_listed_last() -> None:
    from netoken.schedule import next_switch, scheduled_key

    inf = float("-inf")
    assert scheduled_key([1, 2], {1: inf, 2: inf}, 0) == 2
    assert scheduled_key([2, 1], {1: inf, 2: inf}, 0) == 1
    assert scheduled_key([1, 2], {1: 10, 2: 10}, 10) == 2
    assert scheduled_key([1, 2], {1: 10, 2: 5}, 10) == 1
    # the clock went back behind every start: the key that starts first
    assert scheduled_key([1, 2], {1: 10, 2: 5}, 0) == 2
    # a start that changes nothing is no switch: key 3 starts at 20 but key 2
    # started later (30) and keeps marking after 30
    assert next_switch([[2, 3]], {2: 30, 3: 20}, 25) == 30
    assert next_switch([[2, 3]], {2: 30, 3: 20}, 31) is None
    assert next_switch([[1], [2, 3]], {1: inf, 2: 30, 3: 40}, 35) == 40


def test_no_agent_section_is_none(tmp_path: Path, keydir: Path) -> None:
    assert load_text(tmp_path, KEY.format(k1=keydir / "1.key")).agent is None
    assert parse("[agent]\n").agent == AgentConfig()
