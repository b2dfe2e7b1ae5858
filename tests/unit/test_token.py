"""Tests for netoken.token, the Python reference of the wire format (design.md §2)."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netoken import token as nt

# vectors_sip64 from the SipHash reference implementation (veorq/SipHash vectors.h):
# key = 00 01 .. 0f, message i = 00 01 .. (i-1), output as serialized little-endian.
SIP64_VECTORS = [
    "310e0edd47db6f72", "fd67dc93c539f874", "5a4fa9d909806c0d", "2d7efbd796666785",
    "b7877127e09427cf", "8da699cd64557618", "cee3fe586e46c9cb", "37d1018bf50002ab",
    "6224939a79f5f593", "b0e4a90bdf82009e", "f3b9dd94c5bb5d7a", "a7ad6b22462fb3f4",
    "fbe50e86bc8f1e75", "903d84c02756ea14", "eef27a8e90ca23f7", "e545be4961ca29a1",
    "db9bc2577fcc2a3f", "9447be2cf5e99a69", "9cd38d96f0b3c14b", "bd6179a71dc96dbb",
    "98eea21af25cd6be", "c7673b2eb0cbf2d0", "883ea3e395675393", "c8ce5ccd8c030ca8",
    "94af49f6c650adb8", "eab8858ade92e1bc", "f315bb5bb835d817", "adcf6b0763612e2f",
    "a5c91da7acaa4dde", "716595876650a2a6", "28ef495c53a387ad", "42c341d8fa92d832",
    "ce7cf2722f512771", "e37859f94623f3a7", "381205bb1ab0e012", "ae97a10fd434e015",
    "b4a31508beff4d31", "81396229f0907902", "4d0cf49ee5d4dcca", "5c73336a76d8bf9a",
    "d0a704536ba93e0e", "925958fcd6420cad", "a915c29bc8067318", "952b79f3bc0aa6d4",
    "f21df2e41d4535f9", "87577519048f53a9", "10a56cf5dfcd9adb", "eb75095ccd986cd0",
    "51a9cb9ecba312e6", "96afadfc2ce666c7", "72fe52975a4364ee", "5a1645b276d592a1",
    "b274cb8ebf87870a", "6f9bb4203de7b381", "eaecb2a30b22a87f", "9924a43cc1315724",
    "bd838d3aafbf8db7", "0b1a2a3265d51aea", "135079a3231ce660", "932b2846e4d70666",
    "e1915f5cb1eca46c", "f325965ca16d629f", "575ff28e60381be5", "724506eb4c328a95",
]  # fmt: skip

REF_KEY = bytes(range(16))
KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
OTHER_KEY = bytes.fromhex("f0e1d2c3b4a5968778695a4b3c2d1e0f")

WINDOW = 30
EPOCH = 57_000_123  # an epoch in the 2024 range for a 30 s window
NOW = EPOCH * WINDOW + 7.5  # mid-window, so the test never straddles a boundary
NONCE = bytes.fromhex("deadbeefcafe")
DADDR = "203.0.113.10"
SADDR = "198.51.100.7"
DPORT = 7000
SPORT = 40000

# Options a Linux SYN typically carries, to surround ours with.
MSS = bytes([2, 4, 0x05, 0xB4])
SACK_OK = bytes([4, 2])
TIMESTAMPS = bytes([8, 10]) + (0x01020304).to_bytes(4, "big") + bytes(4)
WSCALE = bytes([3, 3, 7])
NOP = bytes([1])
EOL = bytes([0])


def mac_opt(epoch: int = EPOCH, *, key: bytes = KEY, **fields: Any) -> bytes:
    """The option build_mac_option makes of FIELDS, by default key 1 of KEY for
    DADDR:DPORT with the fixed NONCE."""
    return nt.build_mac_option(
        key, epoch=epoch, **{"key_id": 1, "daddr": DADDR, "dport": DPORT, "nonce": NONCE} | fields
    )


def linux_syn_options(ours: bytes) -> bytes:
    """MSS, SACK-permitted, timestamps, NOP, window scale, then ours, padded to 4."""
    opts = MSS + SACK_OK + TIMESTAMPS + NOP + WSCALE + ours
    return opts + EOL * (-len(opts) % 4)


# ----------------------------------------------------------------------- SipHash


def test_siphash_known_values_from_the_brief() -> None:
    assert nt.siphash24(REF_KEY, b"") == bytes.fromhex("310e0edd47db6f72")
    assert nt.siphash24(REF_KEY, bytes(range(15))) == bytes.fromhex("e545be4961ca29a1")


@pytest.mark.parametrize("length", range(64))
def test_siphash_matches_reference_vectors(length: int) -> None:
    assert nt.siphash24(REF_KEY, bytes(range(length))).hex() == SIP64_VECTORS[length]


def test_siphash_int_is_the_little_endian_reading_of_the_bytes() -> None:
    k0 = int.from_bytes(REF_KEY[:8], "little")
    k1 = int.from_bytes(REF_KEY[8:], "little")
    for length in (0, 7, 8, 9, 63):
        msg = bytes(range(length))
        out = nt.siphash24_int(k0, k1, msg)
        assert out.to_bytes(8, "little") == nt.siphash24(REF_KEY, msg)
    assert nt.siphash24_int(k0, k1, b"") == 0x726FDB47DD0E0E31


def test_siphash_rejects_wrong_key_length() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        nt.siphash24(bytes(15), b"")
    with pytest.raises(ValueError, match="64-bit"):
        nt.siphash24_int(1 << 64, 0, b"")


# --------------------------------------------------------------------- constants


def test_constants_shared_with_bpf_keep_their_values() -> None:
    assert nt.DEFAULT_KIND == 253
    assert nt.DEFAULT_EXID == 0x6E74
    assert (nt.MAC_LEN, nt.STATIC_LEN, nt.NONCE_LEN, nt.TAG_LEN) == (16, 12, 6, 4)
    assert (nt.BIND_SADDR, nt.BIND_SPORT) == (1, 2)


# ------------------------------------------------------------------------ epochs


def test_epoch_now_is_floor_of_unix_time_over_window() -> None:
    assert nt.epoch_now(30, 0.0) == 0
    assert nt.epoch_now(30, 29.999) == 0
    assert nt.epoch_now(30, 30.0) == 1
    assert nt.epoch_now(WINDOW, NOW) == EPOCH
    assert nt.epoch_now(1, 1_700_000_000.9) == 1_700_000_000


def test_epoch_now_defaults_to_the_realtime_clock() -> None:
    before = int(time.time()) // 30
    got = nt.epoch_now(30)
    after = int(time.time()) // 30
    assert before <= got <= after


def test_epoch_now_rejects_nonpositive_window() -> None:
    with pytest.raises(ValueError, match="window"):
        nt.epoch_now(0, 1.0)


@pytest.mark.parametrize(
    ("low8", "current", "expected"),
    [
        (0x00, 0x1FF, 0x200),  # marker already wrapped into the next 256-block
        (0xFF, 0x200, 0x1FF),  # marker still in the previous block
        (0x01, 0x1FE, 0x201),
        (0xFE, 0x201, 0x1FE),
        (0x05, 0x205, 0x205),
        (0x00, 0x17F, 0x100),  # -127 beats +129 ...
        (0x00, 0x181, 0x200),  # ... +127 beats -129 ...
        (0x00, 0x180, 0x100),  # ... tie at 128: resolved towards the past
        (0x80, 0x100, 0x080),  # tie again, from the other side
        (0x7F, 0x100, 0x17F),  # +127 wins over -129
        (0xFF, 0x0, 0xFFFFFFFF),  # u32 wrap backwards
        (0x00, 0xFFFFFFFF, 0x0),  # u32 wrap forwards
    ],
)
def test_expand_epoch_picks_the_closest_epoch(low8: int, current: int, expected: int) -> None:
    assert nt.expand_epoch(low8, current) == expected


@given(
    current=st.integers(min_value=0, max_value=2**32 - 1),
    delta=st.integers(min_value=-128, max_value=127),
)
def test_expand_epoch_recovers_any_epoch_within_half_a_wrap(current: int, delta: int) -> None:
    epoch = (current + delta) % 2**32
    assert nt.expand_epoch(epoch & 0xFF, current) == epoch


# --------------------------------------------------------------------- MAC input


def test_mac_message_layout_ipv4() -> None:
    msg = nt.mac_message(0x6E74, 1, 0x01020304, NONCE, DADDR, 443)
    assert msg == bytes.fromhex("6e740101020304deadbeefcafecb00710a01bb")


def test_mac_message_layout_ipv6_with_both_binds() -> None:
    msg = nt.mac_message(
        0x1234,
        255,
        0xFFFFFFFF,
        b"\x00\x00\x00\x00\x00\x01",
        "2001:db8::1",
        80,
        saddr="2001:db8::2",
        sport=0xABCD,
        bind=nt.BIND_SADDR | nt.BIND_SPORT,
    )
    assert msg == (
        bytes.fromhex("1234ffffffffff000000000001")
        + ipaddress.IPv6Address("2001:db8::1").packed
        + bytes.fromhex("0050")
        + ipaddress.IPv6Address("2001:db8::2").packed
        + bytes.fromhex("abcd")
    )


def test_mac_message_accepts_packed_and_object_addresses() -> None:
    as_str = nt.mac_message(1, 2, 3, NONCE, DADDR, 4)
    as_bytes = nt.mac_message(1, 2, 3, NONCE, ipaddress.ip_address(DADDR).packed, 4)
    as_obj = nt.mac_message(1, 2, 3, NONCE, ipaddress.ip_address(DADDR), 4)
    assert as_str == as_bytes == as_obj


def test_mac_message_sport_only_bind_appends_just_the_port() -> None:
    msg = nt.mac_message(1, 2, 3, NONCE, DADDR, 4, saddr=SADDR, sport=5, bind=nt.BIND_SPORT)
    assert msg == nt.mac_message(1, 2, 3, NONCE, DADDR, 4) + b"\x00\x05"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bind": nt.BIND_SADDR}, "no saddr"),
        ({"bind": nt.BIND_SPORT}, "no sport"),
        ({"bind": nt.BIND_SADDR, "saddr": "2001:db8::2"}, "address families"),
        ({"bind": 4}, "bind bits"),
    ],
)
def test_mac_message_rejects_unusable_bind_inputs(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nt.mac_message(1, 2, 3, NONCE, DADDR, 4, **kwargs)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0x10000, 1, 1, NONCE, DADDR, 1), "exid"),
        ((1, 256, 1, NONCE, DADDR, 1), "key_id"),
        ((1, 1, 2**32, NONCE, DADDR, 1), "epoch"),
        ((1, 1, 1, b"abc", DADDR, 1), "nonce"),
        ((1, 1, 1, bytes(4), DADDR, 1), "nonce"),  # format 1's nonce
        ((1, 1, 1, NONCE, b"\x01\x02\x03", 1), "daddr"),
        ((1, 1, 1, NONCE, DADDR, 65536), "dport"),
    ],
)
def test_mac_message_rejects_out_of_range_fields(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nt.mac_message(*args)


def test_compute_tag_is_truncated_siphash_of_the_message() -> None:
    msg = nt.mac_message(nt.DEFAULT_EXID, 1, EPOCH, NONCE, DADDR, DPORT)
    tag = nt.compute_tag(KEY, nt.DEFAULT_EXID, 1, EPOCH, NONCE, DADDR, DPORT)
    assert len(tag) == nt.TAG_LEN
    assert tag == nt.siphash24(KEY, msg)[:4]


def test_compute_tag_known_answer() -> None:
    # Frozen so that the BPF cross-check and any rewrite have a fixed target; the
    # SipHash underneath is pinned by the reference vectors above.
    tag = nt.compute_tag(REF_KEY, 0x6E74, 1, 0x01020304, NONCE, "203.0.113.10", 443)
    msg = bytes.fromhex("6e740101020304deadbeefcafecb00710a01bb")
    assert tag == nt.siphash24(REF_KEY, msg)[:4]
    assert tag.hex() == "4bd6c19e"


# Wire format 2 vectors: whole options, frozen.  They pin the message layout
# (nonce of 6 bytes, tag = first 4 bytes of the little-endian SipHash output)
# for other implementations; format 1 (4-byte nonce, 6-byte tag) is gone.
FORMAT2_VECTORS = [
    # key, kind, exid, key id, epoch, nonce, daddr, dport, saddr, sport, bind, option
    (REF_KEY, 253, 0x6E74, 1, 0x01020304, "000000000001", "203.0.113.10", 443, None, None, 0,
     "fd106e740104000000000001dbac07a5"),
    (REF_KEY, 253, 0x6E74, 1, 57_000_123, "deadbeefcafe", "203.0.113.10", 7000,
     "198.51.100.7", 40000, nt.BIND_SADDR, "fd106e7401bbdeadbeefcafe7c6188ef"),
    (REF_KEY, 253, 0x6E74, 2, 57_000_123, "ffffffffffff", "203.0.113.10", 7000,
     "198.51.100.7", 40000, nt.BIND_SPORT, "fd106e7402bbffffffffffff3f1c3451"),
    (OTHER_KEY, 254, 0xBEEF, 255, 0xFFFFFFFF, "0123456789ab", "203.0.113.10", 65535,
     "198.51.100.7", 1, nt.BIND_SADDR | nt.BIND_SPORT, "fe10beefffff0123456789abd60c6caa"),
    (REF_KEY, 253, 0x6E74, 1, 59_854_624, "a5a5a5a5a5a5", "2001:db8::10", 443, None, None, 0,
     "fd106e740120a5a5a5a5a5a5d91010db"),
    (OTHER_KEY, 253, 0x6E74, 7, 0, "000000000000", "2001:db8:100::2", 8080, "2001:db8:1::1",
     35512, nt.BIND_SADDR | nt.BIND_SPORT, "fd106e7407000000000000004b57549a"),
]  # fmt: skip


@pytest.mark.parametrize("vector", FORMAT2_VECTORS, ids=range(len(FORMAT2_VECTORS)))
def test_format2_vectors(vector: tuple) -> None:
    key, kind, exid, key_id, epoch, nonce, daddr, dport, saddr, sport, bind, want = vector
    opt = nt.build_mac_option(
        key, key_id=key_id, epoch=epoch, daddr=daddr, dport=dport, saddr=saddr,
        sport=sport, bind=bind, nonce=bytes.fromhex(nonce), kind=kind, exid=exid,
    )  # fmt: skip
    assert opt.hex() == want
    tok = nt.decode(opt)
    assert (tok.nonce.hex(), len(tok.tag)) == (nonce, 4)
    msg = nt.mac_message(exid, key_id, epoch, bytes.fromhex(nonce), daddr, dport,
                         saddr, sport, bind)  # fmt: skip
    assert tok.tag == nt.siphash24(key, msg)[:4]


def test_binding_saddr_makes_the_tag_depend_on_the_source_address() -> None:
    def tag(saddr: str, bind: int) -> bytes:
        return nt.compute_tag(KEY, 1, 1, EPOCH, NONCE, DADDR, DPORT, saddr, SPORT, bind)

    assert tag(SADDR, 0) == tag("198.51.100.8", 0)
    assert tag(SADDR, nt.BIND_SADDR) != tag("198.51.100.8", nt.BIND_SADDR)
    assert tag(SADDR, nt.BIND_SADDR) != tag(SADDR, 0)


def test_binding_sport_makes_the_tag_depend_on_the_source_port() -> None:
    def tag(sport: int, bind: int) -> bytes:
        return nt.compute_tag(KEY, 1, 1, EPOCH, NONCE, DADDR, DPORT, SADDR, sport, bind)

    assert tag(SPORT, 0) == tag(SPORT + 1, 0)
    assert tag(SPORT, nt.BIND_SPORT) != tag(SPORT + 1, nt.BIND_SPORT)
    assert tag(SPORT, nt.BIND_SPORT) != tag(SPORT, 0)
    both = nt.BIND_SADDR | nt.BIND_SPORT
    assert tag(SPORT, both) not in (
        tag(SPORT, nt.BIND_SADDR),
        tag(SPORT, nt.BIND_SPORT),
    )


def test_tag_depends_on_every_always_bound_field() -> None:
    base = (KEY, 1, 1, EPOCH, NONCE, DADDR, DPORT)
    ref = nt.compute_tag(*base)
    variants = [
        (OTHER_KEY, 1, 1, EPOCH, NONCE, DADDR, DPORT),
        (KEY, 2, 1, EPOCH, NONCE, DADDR, DPORT),
        (KEY, 1, 2, EPOCH, NONCE, DADDR, DPORT),
        (KEY, 1, 1, EPOCH + 256, NONCE, DADDR, DPORT),  # same low 8 bits on the wire
        (KEY, 1, 1, EPOCH, bytes.fromhex("deadbeefcaff"), DADDR, DPORT),
        (KEY, 1, 1, EPOCH, NONCE, "203.0.113.11", DPORT),
        (KEY, 1, 1, EPOCH, NONCE, DADDR, DPORT + 1),
    ]
    for v in variants:
        assert nt.compute_tag(*v) != ref, v


# --------------------------------------------------------------- encode / decode


def test_encode_mac_layout() -> None:
    opt = nt.encode_mac(253, 0x6E74, 7, 0x12345678, NONCE, bytes.fromhex("a1a2a3a4"))
    assert opt == bytes.fromhex("fd106e740778deadbeefcafea1a2a3a4")
    assert len(opt) == nt.MAC_LEN


def test_encode_static_layout() -> None:
    opt = nt.encode_static(254, 0xBEEF, 0x1122334455667788)
    assert opt == bytes.fromhex("fe0cbeef1122334455667788")
    assert len(opt) == nt.STATIC_LEN


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: nt.encode_mac(256, 1, 1, 1, NONCE, bytes(4)), "kind"),
        (lambda: nt.encode_mac(1, 1, 1, 1, NONCE, bytes(4)), "NOP"),
        (lambda: nt.encode_mac(253, 0x10000, 1, 1, NONCE, bytes(4)), "exid"),
        (lambda: nt.encode_mac(253, 1, 256, 1, NONCE, bytes(4)), "key_id"),
        (lambda: nt.encode_mac(253, 1, 1, 1, bytes(3), bytes(4)), "nonce"),
        (lambda: nt.encode_mac(253, 1, 1, 1, bytes(4), bytes(6)), "nonce"),  # format 1
        (lambda: nt.encode_mac(253, 1, 1, 1, NONCE, bytes(6)), "tag"),
        (lambda: nt.encode_mac(253, 1, 1, 1, NONCE, bytes(8)), "tag"),
        (lambda: nt.encode_static(253, 1, 2**64), "token"),
        (lambda: nt.encode_static(253, 1, -1), "token"),
    ],
)
def test_encoders_reject_out_of_range_fields(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


kinds = st.integers(min_value=2, max_value=255)
exids = st.integers(min_value=0, max_value=0xFFFF)


@given(
    kind=kinds,
    exid=exids,
    key_id=st.integers(min_value=0, max_value=255),
    epoch=st.integers(min_value=0, max_value=2**32 - 1),
    nonce=st.binary(min_size=6, max_size=6),
    tag=st.binary(min_size=4, max_size=4),
)
def test_mac_option_round_trips(
    kind: int, exid: int, key_id: int, epoch: int, nonce: bytes, tag: bytes
) -> None:
    raw = nt.encode_mac(kind, exid, key_id, epoch, nonce, tag)
    tok = nt.decode(raw)
    assert tok == nt.Token(
        kind=kind,
        exid=exid,
        mode="mac",
        key_id=key_id,
        epoch_low=epoch & 0xFF,
        nonce=nonce,
        tag=tag,
        token=None,
        raw=raw,
    )
    assert nt.encode_mac(tok.kind, tok.exid, tok.key_id, tok.epoch_low, tok.nonce, tok.tag) == raw


@given(kind=kinds, exid=exids, token=st.integers(min_value=0, max_value=2**64 - 1))
def test_static_option_round_trips(kind: int, exid: int, token: int) -> None:
    raw = nt.encode_static(kind, exid, token)
    tok = nt.decode(raw)
    assert (tok.kind, tok.exid, tok.mode, tok.token, tok.raw) == (
        kind,
        exid,
        "static",
        token,
        raw,
    )
    assert tok.key_id is tok.epoch_low is tok.nonce is tok.tag is None
    assert nt.encode_static(tok.kind, tok.exid, tok.token) == raw


def test_token_is_immutable() -> None:
    tok = nt.decode(nt.encode_static(253, 1, 2))
    with pytest.raises(AttributeError):
        tok.token = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        bytes([253]),
        bytes([253, 3, 0x6E]),
        bytes([253, 4, 0x6E, 0x74]),  # valid framing, no body: neither mode
        bytes([253, 14, 0x6E, 0x74]) + bytes(10),  # between the two modes
        bytes([253, 16, 0x6E, 0x74]) + bytes(11),  # length byte larger than data
        bytes([253, 12, 0x6E, 0x74]) + bytes(12),  # length byte smaller than data
    ],
)
def test_decode_rejects_malformed_options(raw: bytes) -> None:
    with pytest.raises(nt.MalformedOption):
        nt.decode(raw)


def test_malformed_option_is_a_value_error() -> None:
    assert issubclass(nt.MalformedOption, ValueError)


# ------------------------------------------------------------------ find_options


def test_find_options_in_a_realistic_linux_syn() -> None:
    ours = mac_opt()
    opts = linux_syn_options(ours)
    assert len(opts) <= 40
    assert nt.find_options(opts) == [ours]


def test_find_options_with_nops_before_and_between() -> None:
    ours = nt.encode_static(253, nt.DEFAULT_EXID, 42)
    opts = NOP + NOP + TIMESTAMPS + NOP + ours + NOP + SACK_OK
    assert nt.find_options(opts) == [ours]


def test_find_options_stops_at_eol() -> None:
    ours = mac_opt()
    assert nt.find_options(MSS + EOL + ours) == []
    # Garbage after EOL is padding and must not be parsed.
    assert nt.find_options(MSS + ours + EOL + b"\xfd\xff") == [ours]


def test_find_options_ignores_other_kinds_and_other_exids() -> None:
    foreign_exid = nt.encode_static(253, 0x1234, 1)
    other_kind = nt.encode_static(254, nt.DEFAULT_EXID, 1)
    no_exid = bytes([253, 2])  # kind 253 without room for an ExID
    ours = nt.encode_static(253, nt.DEFAULT_EXID, 2)
    opts = foreign_exid + other_kind + no_exid + MSS + ours
    assert nt.find_options(opts) == [ours]
    assert nt.find_options(opts, kind=254) == [other_kind]
    assert nt.find_options(opts, exid=0x1234) == [foreign_exid]


def test_find_options_returns_every_match() -> None:
    a, b = mac_opt(), nt.encode_static(253, nt.DEFAULT_EXID, 9)
    assert nt.find_options(a + NOP + b) == [a, b]


def test_find_options_on_empty_or_padding_only() -> None:
    assert nt.find_options(b"") == []
    assert nt.find_options(NOP * 4) == []
    assert nt.find_options(EOL * 4) == []


@pytest.mark.parametrize(
    "opts",
    [
        MSS + bytes([253]),  # kind with no length byte
        bytes([2, 0, 0, 0]),  # length 0 would loop forever
        bytes([2, 1, 0, 0]),  # length 1 is below the kind+len minimum
        MSS + bytes([8, 10, 0, 0]),  # runs past the end
        mac_opt()[:15],  # our option truncated
    ],
)
def test_find_options_rejects_malformed_lengths(opts: bytes) -> None:
    with pytest.raises(nt.MalformedOption):
        nt.find_options(opts)


_other_options = st.sampled_from([MSS, SACK_OK, TIMESTAMPS, NOP, WSCALE])


@given(
    before=st.lists(_other_options, max_size=4),
    after=st.lists(_other_options, max_size=4),
    token=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_find_options_locates_ours_anywhere_in_the_list(
    before: list[bytes], after: list[bytes], token: int
) -> None:
    ours = nt.encode_static(253, nt.DEFAULT_EXID, token)
    assert nt.find_options(b"".join(before) + ours + b"".join(after)) == [ours]


# ------------------------------------------------------------------------ verify


def test_verify_accepts_a_fresh_token() -> None:
    ok, epoch = nt.verify(mac_opt(), KEY, daddr=DADDR, dport=DPORT, window=WINDOW, now=NOW)
    assert (ok, epoch) == (True, EPOCH)


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_verify_tolerates_skew(offset: int) -> None:
    ok, epoch = nt.verify(
        mac_opt(EPOCH + offset),
        KEY,
        daddr=DADDR,
        dport=DPORT,
        window=WINDOW,
        now=NOW,
        skew=1,
    )
    assert ok
    assert epoch == EPOCH + offset


@pytest.mark.parametrize("offset", [-2, 2, 100, -128])
def test_verify_rejects_epochs_beyond_skew(offset: int) -> None:
    ok, epoch = nt.verify(
        mac_opt(EPOCH + offset),
        KEY,
        daddr=DADDR,
        dport=DPORT,
        window=WINDOW,
        now=NOW,
        skew=1,
    )
    assert not ok
    assert epoch == EPOCH + offset


def test_verify_reconstructs_the_epoch_across_the_8_bit_wrap() -> None:
    marker_epoch = 0x3000FF
    guard_now = (marker_epoch + 1) * WINDOW + 1.0  # guard is already in ...0x100
    opt = mac_opt(marker_epoch)
    assert opt[5] == 0xFF
    ok, epoch = nt.verify(opt, KEY, daddr=DADDR, dport=DPORT, window=WINDOW, now=guard_now)
    assert (ok, epoch) == (True, marker_epoch)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"daddr": "203.0.113.11", "dport": DPORT},
        {"daddr": DADDR, "dport": DPORT + 1},
        {"daddr": DADDR, "dport": DPORT, "exid": 0x6E75},
    ],
)
def test_verify_rejects_tokens_for_another_destination_or_exid(kwargs: dict) -> None:
    ok, _ = nt.verify(mac_opt(), KEY, window=WINDOW, now=NOW, **kwargs)
    assert not ok


def test_verify_rejects_wrong_key_and_tampered_fields() -> None:
    opt = mac_opt()
    common = {"daddr": DADDR, "dport": DPORT, "window": WINDOW, "now": NOW}
    assert not nt.verify(opt, OTHER_KEY, **common)[0]
    for i in range(4, 16):  # key id, epoch, nonce and every tag byte are covered
        tampered = bytearray(opt)
        tampered[i] ^= 0x01
        assert not nt.verify(bytes(tampered), KEY, **common)[0], i


def test_verify_with_bound_source() -> None:
    both = nt.BIND_SADDR | nt.BIND_SPORT
    opt = mac_opt(saddr=SADDR, sport=SPORT, bind=both)
    common = {
        "daddr": DADDR,
        "dport": DPORT,
        "window": WINDOW,
        "now": NOW,
        "bind": both,
    }
    assert nt.verify(opt, KEY, saddr=SADDR, sport=SPORT, **common)[0]
    assert not nt.verify(opt, KEY, saddr="198.51.100.8", sport=SPORT, **common)[0]
    assert not nt.verify(opt, KEY, saddr=SADDR, sport=SPORT + 1, **common)[0]


def test_verify_ipv6() -> None:
    opt = mac_opt(daddr="2001:db8::10", saddr="2001:db8::7", bind=nt.BIND_SADDR)
    ok, _ = nt.verify(
        opt,
        KEY,
        daddr="2001:db8::10",
        dport=DPORT,
        saddr="2001:db8::7",
        bind=nt.BIND_SADDR,
        window=WINDOW,
        now=NOW,
    )
    assert ok


def test_verify_refuses_static_and_malformed_options() -> None:
    with pytest.raises(nt.MalformedOption):
        nt.verify(nt.encode_static(253, nt.DEFAULT_EXID, 1), KEY, daddr=DADDR, dport=DPORT)
    with pytest.raises(nt.MalformedOption):
        nt.verify(mac_opt()[:14], KEY, daddr=DADDR, dport=DPORT)


# ----------------------------------------------------------------------- verdict

KEYS = {1: (KEY, WINDOW, 0), 2: (OTHER_KEY, 60, nt.BIND_SADDR | nt.BIND_SPORT)}


def run_verdict(opts: bytes, **kwargs) -> str:
    args = {"daddr": DADDR, "dport": DPORT, "saddr": SADDR, "sport": SPORT, "now": NOW}
    args.update(kwargs)
    return nt.verdict(opts, KEYS, **args)


def test_verdict_ok() -> None:
    assert run_verdict(linux_syn_options(mac_opt())) == "ok"


def test_verdict_ok_with_a_bound_key_and_its_own_window() -> None:
    epoch = nt.epoch_now(60, NOW)
    opt = mac_opt(
        epoch, key=OTHER_KEY, key_id=2, saddr=SADDR, sport=SPORT,
        bind=nt.BIND_SADDR | nt.BIND_SPORT,
    )  # fmt: skip
    assert run_verdict(linux_syn_options(opt)) == "ok"
    assert run_verdict(linux_syn_options(opt), sport=SPORT + 1) == "bad_tag"


@pytest.mark.parametrize(
    "opts",
    [
        b"",
        MSS + SACK_OK + TIMESTAMPS + NOP + WSCALE,
        MSS + nt.encode_static(253, 0x1234, 1),  # someone else's experiment
        MSS + nt.encode_static(254, nt.DEFAULT_EXID, 1),  # other kind than configured
        EOL + mac_opt(),  # after EOL it is not an option
    ],
)
def test_verdict_missing(opts: bytes) -> None:
    assert run_verdict(opts) == "missing"


@pytest.mark.parametrize(
    "opts",
    [
        mac_opt() + mac_opt(),  # more than one
        mac_opt() + nt.encode_static(253, nt.DEFAULT_EXID, 1),
        MSS + bytes([253, 14, 0x6E, 0x74]) + bytes(10),  # our kind+ExID, bad length
        MSS + mac_opt()[:-1],  # option list runs off the end
        bytes([2, 0]) + mac_opt(),  # option list cannot be walked
    ],
)
def test_verdict_malformed(opts: bytes) -> None:
    assert run_verdict(opts) == "malformed"


def test_verdict_unknown_key() -> None:
    assert run_verdict(linux_syn_options(mac_opt(key_id=9))) == "unknown_key"


def test_verdict_unknown_key_is_decided_before_freshness() -> None:
    assert run_verdict(mac_opt(EPOCH - 50, key_id=9)) == "unknown_key"


@pytest.mark.parametrize("offset", [-2, 2, 64])
def test_verdict_stale(offset: int) -> None:
    assert run_verdict(mac_opt(EPOCH + offset)) == "stale"


def test_verdict_skew_is_configurable() -> None:
    assert run_verdict(mac_opt(EPOCH - 3), skew=3) == "ok"
    assert run_verdict(mac_opt(EPOCH - 1), skew=0) == "stale"


def test_verdict_bad_tag() -> None:
    forged = bytearray(mac_opt())
    forged[-1] ^= 0x80
    assert run_verdict(bytes(forged)) == "bad_tag"
    assert run_verdict(mac_opt(key=OTHER_KEY)) == "bad_tag"
    assert run_verdict(mac_opt(), daddr="203.0.113.99") == "bad_tag"


def test_verdict_static_tokens() -> None:
    opt = nt.encode_static(253, nt.DEFAULT_EXID, 0x1122334455667788)
    assert run_verdict(opt, static_tokens={0x1122334455667788}) == "ok"
    assert run_verdict(opt, static_tokens={1}) == "bad_tag"
    assert run_verdict(opt) == "bad_tag"


def test_verdict_honours_configured_kind_and_exid() -> None:
    opt = mac_opt(kind=254, exid=0xBEEF)
    assert run_verdict(opt) == "missing"
    assert run_verdict(opt, kind=254, exid=0xBEEF) == "ok"


def test_verdict_values_are_the_documented_set() -> None:
    assert set(nt.VERDICTS) == {"ok", "missing", "malformed", "unknown_key", "stale", "bad_tag"}


def test_key_fingerprint_is_stable_and_never_a_tag() -> None:
    key = bytes(range(16))
    # Pinned: a fingerprint printed by one netoken version must match another's.
    assert nt.key_fingerprint(key) == "581598fb373e7d6e"
    assert nt.key_fingerprint(key) == nt.siphash24(key, b"netoken key fingerprint v1").hex()
    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
    assert nt.key_fingerprint_int(k0, k1) == nt.key_fingerprint(key)
    assert nt.key_fingerprint(bytes(16)) != nt.key_fingerprint(key)
    # No MAC message has the label's length, so no fingerprint is a valid tag.
    lengths = {
        len(nt.mac_message(0x6E74, 1, 0, bytes(6), d, 1, s, 1, bind))
        for d, s in (("192.0.2.1", "192.0.2.2"), ("2001:db8::1", "2001:db8::2"))
        for bind in range(4)
    }
    assert len(nt.FINGERPRINT_LABEL) not in lengths
