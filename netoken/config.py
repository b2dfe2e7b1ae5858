"""TOML configuration -> typed, validated objects (design.md §4).

Everything a config can get wrong is caught here, before any BPF object is loaded
or any map is touched, and reported as a single :class:`ConfigError` whose text is
one line, ``FILE: ENTRY: PROBLEM``, e.g.::

    netoken.toml: policy "game": destination "10.0.0.1/24" has host bits set; did you mean 10.0.0.0/24?
    netoken.toml: key 1: file /etc/netoken/keys/1.key is readable by group/others (mode 0644); chmod 600 it

ENTRY names the table: ``top level``, ``[option]``, ``key 1`` (``key #2`` when the
id itself is unusable), ``policy "game"`` (``policy #2`` when unnamed), ``guard``,
``guard.protect #1``. Syntax errors use ``line L, column C`` as ENTRY. Problems
that concern a whole file (unreadable config, key file read on its own) have no
ENTRY: ``FILE: PROBLEM``. Validation stops at the first problem, in document
order: top level, ``[option]``, every ``[[key]]``, every ``[[policy]]``, ``[guard]``.

Decisions where design.md §4 is silent (they are part of the contract from now on):

- Every top-level table is optional: ``[option]`` defaults to kind 253 /
  ExID 0x6E74; a guard-only host has no ``[[policy]]``, a static-only marker
  needs no ``[[key]]``. An empty file is a valid, empty config.
- Types are strict: TOML booleans are not integers, ``id = "1"`` is rejected, and
  numbers are never accepted as floats. The one exception is the static
  ``token``, which also accepts a string (``"0x1122334455667788"`` or decimal,
  underscores between digits allowed) because TOML integers stop at 2**63-1.
- ``[[policy]]`` requires a non-empty ``name`` without control characters:
  operators refer to policies by name in ``status`` and in events, and names
  are echoed in one-line messages. Names must be unique.
- ``mode`` defaults to ``"mac"`` (the wire format's default mode).
- ``ports``: an omitted or empty array means all ports. Elements are integers or
  strings ``"N"`` / ``"LO-HI"`` (blanks around the dash tolerated). Ranges are
  kept in the order written; overlaps inside one entry are harmless and kept.
- ``destinations`` is required and non-empty everywhere. A bare address is a
  host prefix (/32 or /128). Host bits set is an error, not silently masked:
  a typo in a prefix should not quietly protect or mark a different network.
- Two ``[[guard.protect]]`` entries with an identical prefix and intersecting
  ports are rejected like two such policies: the guard's prefix-then-port
  lookup could not choose between them either.
- ``[guard]`` must contain at least one ``[[guard.protect]]`` with a non-empty
  ``keys`` list: a guard that protects nothing, or a destination that accepts
  no key (every SYN dropped), is almost certainly a mistake. Duplicate ids in
  ``keys`` are dropped, first occurrence wins.
- ``[[guard.protect]]`` may list ``tokens``, the static-mode tokens it accepts
  (same forms as a policy's ``token``; duplicates dropped). An entry with
  tokens may omit ``keys`` (a static-only destination); it may not have
  neither.
- ``bind`` duplicates are dropped and the tuple is stored in canonical order
  (``saddr`` before ``sport``), so equal bindings compare equal.
- Key files: relative paths resolve against the config file's directory
  (``parse``'s ``base_dir``, default the directory of ``path``); no ``~`` or
  variable expansion (TOML is not a shell). Symlinks are followed (secret
  stores commonly mount keys as symlinks), but the target must be a regular
  file with no group/other permission bits at all, checked on the opened
  descriptor so the file checked is the file read. Contents are never echoed
  in errors. ``Key.file`` is stored absolute.
- Key-file problems found while loading a config are reported against the
  config file and the key entry, with the key file's path in PROBLEM.
- Key schedule (§4): ``mark_from`` is a TOML offset date-time or an RFC 3339
  string with an offset (``"2026-12-02T00:00:00Z"``); a local date-time is
  rejected, since "midnight" differs per host.  A mac policy takes ``key = N``
  or ``keys = [...]`` (not both); duplicates in ``keys`` are dropped, first
  occurrence wins.  A mac policy none of whose keys has started yet at load
  time is rejected: it would have nothing to mark with.  Should the clock go
  back behind every start later on, the key that starts first is used.
- ``[agent]`` (read only by ``netoken agent``): ``mark`` and ``guard`` hold
  interface names or fnmatch glob patterns (``*``, ``?``, ``[...]``);
  ``metrics`` is ``ADDR:PORT`` as ``netoken exporter --listen`` takes it.
  ``guard`` entries need a ``[guard]`` section.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import ipaddress
import json
import math
import os
import re
import secrets
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeGuard

from .errors import ExporterError, NetokenError
from .schedule import iso, next_switch, scheduled_key
from .token import BIND_SADDR, BIND_SPORT, DEFAULT_EXID, DEFAULT_KIND, KEY_LEN

__all__ = [
    "BIND_SADDR",
    "BIND_SPORT",
    "AgentConfig",
    "Config",
    "ConfigError",
    "GuardConfig",
    "Key",
    "OptionConfig",
    "Policy",
    "PortRange",
    "Protect",
    "generate_key",
    "key_file_bytes",
    "load",
    "next_switch",
    "parse",
    "scheduled_key",
]

_BIND_BITS = {"saddr": BIND_SADDR, "sport": BIND_SPORT}
Table = Mapping[str, Any]  # a TOML table

_KEY_HEX_LEN = 2 * KEY_LEN
# Generous bound so a key path pointing at a large file fails fast instead of
# being slurped; a valid key file is 32 hex chars plus a little whitespace.
_KEY_FILE_MAX = 4096

OPTION_KINDS = (253, 254)  # RFC 6994 shared experimental option kinds
DEFAULT_WINDOW = 30
MAX_WINDOW = 86400
DEFAULT_SKEW = 1
MAX_SKEW = 16
DEFAULT_REPLAY_CACHE = 1 << 20
MIN_REPLAY_CACHE = 1024
MAX_REPLAY_CACHE = 1 << 26
U64_MAX = (1 << 64) - 1

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(NetokenError):
    """A rejected configuration or key file.

    ``str()`` is always exactly one line, ``FILE: ENTRY: PROBLEM`` (or
    ``FILE: PROBLEM`` when no entry applies), so the CLI can print it as is and
    log scrapers can rely on it.
    """

    def __init__(
        self, file: str | os.PathLike[str] | None, entry: str | None, problem: str
    ) -> None:
        self.file = None if file is None else str(file)
        self.entry = entry
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        text = ": ".join(p for p in (self.file, self.entry, self.problem) if p)
        # Values are quoted with escapes already; this is the last line of
        # defence for the one-line promise (e.g. strerror or tomllib text).
        return text.replace("\r", "\\r").replace("\n", "\\n")

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce would call cls(message) and fail with three params.
        return (type(self), (self.file, self.entry, self.problem))


@dataclass(frozen=True, slots=True)
class OptionConfig:
    """TCP option framing: RFC 6994 kind and 16-bit experiment id; whether the
    marker removes a SYN's Timestamps option when the token has no room."""

    kind: int = DEFAULT_KIND
    exid: int = DEFAULT_EXID
    make_room: bool = True


@dataclass(frozen=True, slots=True)
class Key:
    """A MAC key: id carried in the option, its secret, epoch window and binding."""

    id: int
    file: Path
    secret: bytes = field(repr=False)
    window: int = DEFAULT_WINDOW
    bind: tuple[str, ...] = ()
    mark_from: _dt.datetime | None = None  # aware; None: in use since forever

    @property
    def starts(self) -> float:
        """mark_from as a Unix time; -inf for a key without one."""
        return -math.inf if self.mark_from is None else self.mark_from.timestamp()

    @property
    def bind_mask(self) -> int:
        """Extra MAC inputs as the bit mask the BPF programs use."""
        mask = 0
        for name in self.bind:
            mask |= _BIND_BITS[name]
        return mask

    def __repr__(self) -> str:
        # Written out by hand so that no future field change can leak the
        # secret into logs, tracebacks or pytest failure output.
        return (
            f"Key(id={self.id}, file={str(self.file)!r}, secret=<{len(self.secret)} bytes>, "
            f"window={self.window}, bind={self.bind!r}, mark_from={self.mark_from!r})"
        )


@dataclass(frozen=True, slots=True)
class PortRange:
    """Inclusive TCP port range; a single port is ``PortRange(p, p)``."""

    lo: int
    hi: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.lo <= port <= self.hi

    def overlaps(self, other: PortRange) -> bool:
        return self.lo <= other.hi and other.lo <= self.hi

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


@dataclass(frozen=True, slots=True)
class Policy:
    """Marker policy: SYNs to these destinations/ports get this token."""

    name: str
    destinations: tuple[Network, ...]
    ports: tuple[PortRange, ...] = ()  # empty = all ports
    mode: Literal["mac", "static"] = "mac"
    keys: tuple[int, ...] = ()  # mac mode: the key schedule, as listed
    token: int | None = None  # static mode


@dataclass(frozen=True, slots=True)
class Protect:
    """Guard entry: SYNs to these destinations/ports must carry one of ``keys``."""

    destinations: tuple[Network, ...]
    ports: tuple[PortRange, ...] = ()  # empty = all ports
    keys: tuple[int, ...] = ()
    action: Literal["drop", "monitor"] | None = None  # None = GuardConfig.action
    tokens: tuple[int, ...] = ()  # static-mode tokens accepted here


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Guard-wide settings and the protected destinations."""

    action: Literal["drop", "monitor"] = "drop"
    skew: int = DEFAULT_SKEW
    replay_cache: int = DEFAULT_REPLAY_CACHE
    protect: tuple[Protect, ...] = ()
    # TCP fragments to protected addresses (design.md §2 "Fragments").
    fragments: Literal["drop", "pass"] = "drop"

    def action_for(self, entry: Protect) -> str:
        """The action that applies to ``entry`` (its override, else the default)."""
        return entry.action or self.action


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """What `netoken agent` keeps attached, and where it serves metrics."""

    mark: tuple[str, ...] = ()  # interface names or glob patterns
    guard: tuple[str, ...] = ()
    metrics: str | None = None  # ADDR:PORT


@dataclass(frozen=True, slots=True)
class Config:
    """A whole validated configuration file."""

    path: Path
    option: OptionConfig
    keys: dict[int, Key]
    policies: tuple[Policy, ...]
    guard: GuardConfig | None
    agent: AgentConfig | None = None

    @property
    def starts(self) -> dict[int, float]:
        """Key id -> when markers start using it (Unix time, -inf: always)."""
        return {k.id: k.starts for k in self.keys.values()}

    def marking_keys(self, now: float) -> dict[str, int]:
        """Policy name -> the key its SYNs get at Unix time NOW (mac policies)."""
        starts = self.starts
        return {
            p.name: scheduled_key(p.keys, starts, now) for p in self.policies if p.mode == "mac"
        }

    def next_switch(self, now: float) -> float | None:
        """The first Unix time after NOW at which a policy changes keys."""
        return next_switch([p.keys for p in self.policies if p.mode == "mac"], self.starts, now)


# --------------------------------------------------------------------------
# Public entry points


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path``."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read config: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not valid UTF-8 (byte {e.start})") from None
    return parse(text, path=str(path))


def parse(
    text: str,
    path: str | os.PathLike[str] = "<string>",
    base_dir: str | os.PathLike[str] | None = None,
) -> Config:
    """Validate TOML ``text``; ``path`` is used in messages and, unless
    ``base_dir`` is given, to resolve relative key file paths."""
    p = _Parser(str(path), Path(base_dir) if base_dir is not None else Path(path).parent)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        p.syntax(e)
    return p.document(doc)


def key_file_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a key file: exactly 32 hex characters (surrounding whitespace ok),
    a regular file with no group/other permission bits. Returns the 16 bytes.

    Raises ConfigError ``PATH: PROBLEM``; the problem never quotes file contents.
    """
    name = str(path)
    try:
        # O_NONBLOCK: a FIFO must not hang the loader; it is rejected below.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(name, None, "does not exist") from None
    except OSError as e:
        raise ConfigError(name, None, f"cannot be read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)  # on the descriptor: the file checked is the file read
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(name, None, "is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o044:
            raise ConfigError(
                name,
                None,
                f"is readable by group/others (mode {mode:04o}); chmod 600 it",
            )
        if mode & 0o077:
            raise ConfigError(
                name,
                None,
                f"is accessible by group/others (mode {mode:04o}); chmod 600 it",
            )
        try:
            data = os.read(fd, _KEY_FILE_MAX + 1)
        except OSError as e:
            raise ConfigError(name, None, f"cannot be read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > _KEY_FILE_MAX:
        raise ConfigError(
            name,
            None,
            f"is too large for a key file (expected {_KEY_HEX_LEN} hex characters)",
        )
    try:
        body = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(
            name, None, f"is not hex (expected {_KEY_HEX_LEN} hex characters)"
        ) from None
    if not re.fullmatch(r"[0-9a-fA-F]*", body):
        raise ConfigError(name, None, f"is not hex (expected {_KEY_HEX_LEN} hex characters)")
    if len(body) != _KEY_HEX_LEN:
        raise ConfigError(
            name,
            None,
            f"has {len(body)} hex characters, expected {_KEY_HEX_LEN} ({KEY_LEN} bytes)",
        )
    return bytes.fromhex(body)


def generate_key(path: str | os.PathLike[str]) -> None:
    """Create a new key file: 16 random bytes as 32 hex chars + newline, mode 0600.

    O_CREAT|O_EXCL makes creation atomic and refuses to follow or overwrite an
    existing path, so an existing key (possibly in use on other hosts) is never
    lost. A crash mid-write leaves a short file that key_file_bytes rejects.
    """
    name = str(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ConfigError(name, None, "exists; refusing to overwrite") from None
    except OSError as e:
        raise ConfigError(name, None, f"cannot create: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o600)  # the umask can only narrow 0600, but be explicit
        data = (secrets.token_bytes(KEY_LEN).hex() + "\n").encode("ascii")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise ConfigError(name, None, f"cannot write: {e.strerror or e}") from None
    os.close(fd)


# --------------------------------------------------------------------------
# Validation

_REQUIRED = object()
_PORT_RE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")
_HEX_TOKEN_RE = re.compile(r"0[xX][0-9a-fA-F]+(?:_[0-9a-fA-F]+)*")
_DEC_TOKEN_RE = re.compile(r"[0-9]+(?:_[0-9]+)*")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

_TOP_KEYS = ("option", "key", "policy", "guard", "agent")
_OPTION_KEYS = ("kind", "exid", "make_room")
_KEY_KEYS = ("id", "file", "window", "bind", "mark_from")
_POLICY_KEYS = ("name", "destinations", "ports", "mode", "key", "keys", "token")
_AGENT_KEYS = ("mark", "guard", "metrics")
_GUARD_KEYS = ("action", "skew", "replay_cache", "fragments", "protect")
_PROTECT_KEYS = ("destinations", "ports", "keys", "tokens", "action")
_ACTIONS = ("drop", "monitor")
_FRAGMENTS = ("drop", "pass")


def _show(value: Any) -> str:
    """A value as it would look in TOML, escaped so messages stay one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = json.dumps(value, ensure_ascii=False)
        return shown if len(shown) <= 60 else shown[:56] + '..."'
    if isinstance(value, int | float):
        return str(value)
    return _typename(value)


# TOML's value types by the names its spec gives them, bool before int (a
# bool is an int); anything else is one of its date-times.
_TOML_TYPES = (
    (bool, "boolean"),
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (list, "array"),
    (dict, "table"),
)


def _typename(value: Any) -> str:
    return next((name for kind, name in _TOML_TYPES if isinstance(value, kind)), "datetime")


def _got(value: Any) -> str:
    shown = _show(value)
    kind = _typename(value)
    return kind if shown == kind else f"{kind} {shown}"


def parse_listen(value: str) -> tuple[str, int]:
    """ "ADDR:PORT" or "[V6ADDR]:PORT" -> (host, port); ExporterError if bad."""
    example = "expected ADDR:PORT, e.g. 127.0.0.1:9917 or [::1]:9917"
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ExporterError(f"--listen {value!r}: {example}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ExporterError(f"--listen {value!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ExporterError(
            f"--listen {value!r}: put an IPv6 address in brackets, e.g. [{host}]:{port_s}"
        )
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ExporterError(f"--listen {value!r}: port must be a number 0-65535")
    return host, int(port_s)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _overlap(a: tuple[PortRange, ...], b: tuple[PortRange, ...]) -> str | None:
    """First intersection of two port sets (empty = all), as text, or None."""
    if not a and not b:
        return "all ports"
    if not a or not b:
        r = (b or a)[0]
        return f"port {r}"
    for x in a:
        for y in b:
            if x.overlaps(y):
                return f"port {PortRange(max(x.lo, y.lo), min(x.hi, y.hi))}"
    return None


class _Parser:
    """Walks the parsed TOML document; every error goes through ``fail``."""

    def __init__(self, file: str, base_dir: Path) -> None:
        self.file = file
        self.base_dir = base_dir

    def fail(self, entry: str | None, problem: str) -> NoReturn:
        raise ConfigError(self.file, entry, problem)

    def syntax(self, e: tomllib.TOMLDecodeError) -> NoReturn:
        msg = str(e)
        m = re.search(r"\s*\(at (line \d+, column \d+|end of document)\)$", msg)
        if m:
            self.fail(m.group(1), f"invalid TOML: {msg[: m.start()]}")
        self.fail("TOML", f"invalid TOML: {msg}")

    # -- generic field helpers ---------------------------------------------

    def known(self, entry: str, table: Mapping[str, Any], allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        for k in table:
            if k not in allowed:
                hint = difflib.get_close_matches(k, allowed, n=1)
                mean = f" (did you mean {_show(hint[0])}?)" if hint else ""
                self.fail(
                    entry,
                    f"unknown key {_show(k)}{mean}; allowed: {', '.join(sorted(allowed))}",
                )

    def table(self, entry: str, value: Any, form: str) -> dict[str, Any]:
        return self._of(entry, value, dict, f"a table ({form})")

    def tables(self, entry: str, value: Any, form: str) -> list[Any]:
        return self._of(entry, value, list, f"an array of tables ({form})")

    def _of(self, entry: str, value: Any, kind: type, what: str) -> Any:
        if not isinstance(value, kind):
            self.fail(entry, f"must be {what}, got {_got(value)}")
        return value

    def integer(
        self, entry: str, t: Table, name: str, default: Any, lo: int, hi: int, what: str = ""
    ) -> int:
        value = t.get(name, default)
        if value is _REQUIRED:
            self.fail(entry, f"{name} is required")
        if not _is_int(value):
            self.fail(entry, f"{name} must be an integer{what}, got {_got(value)}")
        if not lo <= value <= hi:
            self.fail(entry, f"{name} = {value} is out of range {lo}..{hi}")
        return value

    def choice(
        self, entry: str, t: Table, name: str, default: Any, choices: tuple[str, ...]
    ) -> Any:
        value = t.get(name, default)
        if value is None:
            return None
        if not isinstance(value, str) or value not in choices:
            alts = " or ".join(_show(c) for c in choices)
            self.fail(entry, f"{name} must be {alts}, got {_got(value)}")
        return value

    def array(self, entry: str, t: Mapping[str, Any], name: str, required: bool) -> list[Any]:
        if name not in t:
            if required:
                self.fail(entry, f"{name} is required")
            return []
        value = t[name]
        if not isinstance(value, list):
            self.fail(entry, f"{name} must be an array, got {_got(value)}")
        return value

    def destinations(self, entry: str, t: Mapping[str, Any]) -> tuple[Network, ...]:
        items = self.array(entry, t, "destinations", required=True)
        if not items:
            self.fail(entry, "destinations must not be empty")
        nets: list[Network] = []
        for item in items:
            if not isinstance(item, str):
                self.fail(
                    entry,
                    f'destination must be a string prefix like "192.0.2.0/24", got {_got(item)}',
                )
            try:
                net = ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                self.fail(entry, f"destination {_show(item)} is not an IPv4 or IPv6 prefix")
            if net.network_address != ipaddress.ip_interface(item.strip()).ip:
                self.fail(
                    entry,
                    f"destination {_show(item)} has host bits set; did you mean {net}?",
                )
            nets.append(net)
        return tuple(nets)

    def ports(self, entry: str, t: Mapping[str, Any]) -> tuple[PortRange, ...]:
        ranges: list[PortRange] = []
        for item in self.array(entry, t, "ports", required=False):
            if _is_int(item):
                lo = hi = item
            elif isinstance(item, str):
                m = _PORT_RE.fullmatch(item)
                if not m:
                    self.fail(
                        entry,
                        f'port {_show(item)} is not a port number or "LO-HI" range',
                    )
                lo = int(m.group(1))
                hi = int(m.group(2)) if m.group(2) is not None else lo
            else:
                self.fail(
                    entry,
                    f'port must be an integer or a "LO-HI" string, got {_got(item)}',
                )
            for port in (lo, hi):
                if not 1 <= port <= 65535:
                    where = "" if _is_int(item) else f" in {_show(item)}"
                    self.fail(entry, f"port {port}{where} is out of range 1..65535")
            if lo > hi:
                self.fail(
                    entry,
                    f'port range {_show(item)} is reversed ({lo} > {hi}); write "{hi}-{lo}"',
                )
            ranges.append(PortRange(lo, hi))
        return tuple(ranges)

    def key_ref(self, entry: str, field_name: str, key_id: int, keys: Mapping[int, Key]) -> None:
        if key_id not in keys:
            known = ", ".join(str(k) for k in sorted(keys)) or "none"
            self.fail(
                entry,
                f"{field_name} refers to key {key_id}, which is not defined (defined keys: {known})",
            )

    def no_conflicts(
        self, items: list[tuple[str, tuple[Network, ...], tuple[PortRange, ...]]]
    ) -> None:
        """Identical prefix + intersecting ports: the prefix-then-port lookup
        would have two answers, so whichever is written last would silently win."""
        seen: dict[Network, list[tuple[str, tuple[PortRange, ...]]]] = {}
        for entry, nets, ports in items:
            for net in dict.fromkeys(nets):  # repeats inside one entry are harmless
                for other, other_ports in seen.get(net, ()):
                    where = _overlap(other_ports, ports)
                    if where:
                        self.fail(
                            entry,
                            f"destination {net} overlaps {other} (same prefix, both cover {where})",
                        )
                seen.setdefault(net, []).append((entry, ports))

    # -- sections ------------------------------------------------------------

    def document(self, doc: dict[str, Any]) -> Config:
        self.known("top level", doc, _TOP_KEYS)
        option = self.option(doc["option"]) if "option" in doc else OptionConfig()
        keys = self.keys(doc.get("key", []))
        policies = self.policies(doc.get("policy", []), keys)
        guard = self.guard(doc["guard"], keys) if "guard" in doc else None
        agent = self.agent(doc["agent"], guard) if "agent" in doc else None
        return Config(Path(self.file), option, keys, policies, guard, agent)

    def option(self, value: Any) -> OptionConfig:
        entry = "[option]"
        t = self.table(entry, value, "[option]")
        self.known(entry, t, _OPTION_KEYS)
        kind = self.integer(entry, t, "kind", DEFAULT_KIND, 0, 255)
        if kind not in OPTION_KINDS:
            self.fail(
                entry,
                f"kind = {kind} is not an experimental option kind; use 253 or 254",
            )
        exid = self.integer(entry, t, "exid", DEFAULT_EXID, 0, 0xFFFF)
        make_room = t.get("make_room", True)
        if not isinstance(make_room, bool):
            self.fail(entry, f"make_room must be true or false, got {_got(make_room)}")
        return OptionConfig(kind=kind, exid=exid, make_room=make_room)

    def keys(self, value: Any) -> dict[int, Key]:
        keys: dict[int, Key] = {}
        first_index: dict[int, int] = {}
        for i, item in enumerate(self.tables("key", value, "[[key]]"), 1):
            kid = item.get("id") if isinstance(item, dict) else None
            entry = f"key {kid}" if _is_int(kid) and 0 <= kid <= 255 else f"key #{i}"
            t = self.table(entry, item, "[[key]]")
            self.known(entry, t, _KEY_KEYS)
            kid = self.integer(entry, t, "id", _REQUIRED, 0, 255)
            if kid in keys:
                self.fail(
                    entry,
                    f"duplicate key id {kid} (key entries #{first_index[kid]} and #{i})",
                )
            file = t.get("file", _REQUIRED)
            if file is _REQUIRED:
                self.fail(entry, "file is required")
            if not isinstance(file, str) or not file.strip():
                self.fail(entry, f"file must be a non-empty string path, got {_got(file)}")
            path = Path(file)
            if not path.is_absolute():
                path = self.base_dir / path
            path = Path(os.path.abspath(path))
            window = self.integer(entry, t, "window", DEFAULT_WINDOW, 1, MAX_WINDOW, " (seconds)")
            bind: set[str] = set()
            for b in self.array(entry, t, "bind", required=False):
                if not isinstance(b, str) or b not in _BIND_BITS:
                    self.fail(entry, f'bind value {_show(b)} is not "saddr" or "sport"')
                bind.add(b)
            mark_from = self.instant(entry, t, "mark_from")
            try:
                secret = key_file_bytes(path)
            except ConfigError as e:
                self.fail(entry, f"file {path} {e.problem}")
            keys[kid] = Key(
                id=kid,
                file=path,
                secret=secret,
                window=window,
                bind=tuple(b for b in _BIND_BITS if b in bind),
                mark_from=mark_from,
            )
            first_index[kid] = i
        return keys

    def policies(self, value: Any, keys: Mapping[int, Key]) -> tuple[Policy, ...]:
        policies: list[Policy] = []
        entries: list[str] = []
        names: dict[str, int] = {}
        for i, item in enumerate(self.tables("policy", value, "[[policy]]"), 1):
            name = item.get("name") if isinstance(item, dict) else None
            ok_name = isinstance(name, str) and name.strip() != "" and not _CONTROL_RE.search(name)
            entry = f"policy {_show(name)}" if ok_name else f"policy #{i}"
            t = self.table(entry, item, "[[policy]]")
            self.known(entry, t, _POLICY_KEYS)
            if "name" not in t:
                self.fail(
                    entry,
                    "name is required (status and events refer to policies by name)",
                )
            if not isinstance(name, str):
                self.fail(entry, f"name must be a string, got {_got(name)}")
            if not ok_name:
                self.fail(
                    entry,
                    f"name {_show(name)} must be non-empty and free of control characters",
                )
            if name in names:
                self.fail(entry, f"duplicate policy name (policies #{names[name]} and #{i})")
            names[name] = i
            dests = self.destinations(entry, t)
            ports = self.ports(entry, t)
            mode = self.choice(entry, t, "mode", "mac", ("mac", "static"))
            key_ids: tuple[int, ...] = ()
            token: int | None = None
            if mode == "mac":
                if "token" in t:
                    self.fail(entry, 'token is only for mode = "static"; mode "mac" uses key')
                key_ids = self.schedule(entry, t, keys)
            else:
                for ref in ("key", "keys"):
                    if ref in t:
                        self.fail(
                            entry, f'{ref} is only for mode = "mac"; mode "static" uses token'
                        )
                if "token" not in t:
                    self.fail(entry, 'mode "static" requires token = "0x<16 hex digits>"')
                token = self.token(entry, t["token"])
            policies.append(
                Policy(
                    name=name,
                    destinations=dests,
                    ports=ports,
                    mode=mode,
                    keys=key_ids,
                    token=token,
                )
            )
            entries.append(entry)
        self.no_conflicts(
            [(e, p.destinations, p.ports) for e, p in zip(entries, policies, strict=True)]
        )
        return tuple(policies)

    def schedule(
        self, entry: str, t: Mapping[str, Any], keys: Mapping[int, Key]
    ) -> tuple[int, ...]:
        """A mac policy's keys: ``key = N`` or ``keys = [...]``, each defined,
        one of them already started."""
        if "key" in t and "keys" in t:
            self.fail(entry, "key and keys are alternatives; list every key in keys = [...]")
        if "key" in t:
            kid = self.integer(entry, t, "key", _REQUIRED, 0, 255, " key id")
            self.key_ref(entry, "key", kid, keys)
            ids = (kid,)
        elif "keys" in t:
            items = self.array(entry, t, "keys", required=True)
            if not items:
                self.fail(entry, "keys must not be empty")
            for k in items:
                if not _is_int(k):
                    self.fail(entry, f"keys must hold integer key ids, got {_got(k)}")
                self.key_ref(entry, "keys", k, keys)
            ids = tuple(dict.fromkeys(items))
        else:
            self.fail(entry, 'mode "mac" requires key = <key id> (or keys = [...])')
        now = _dt.datetime.now(_dt.UTC).timestamp()
        if all(keys[k].starts > now for k in ids):
            first = min(ids, key=lambda k: keys[k].starts)
            self.fail(
                entry,
                f"none of its keys is in use yet (key {first} starts first, at "
                f"{iso(keys[first].starts)}); list a key without mark_from too",
            )
        return ids

    def instant(self, entry: str, t: Mapping[str, Any], name: str) -> _dt.datetime | None:
        """An optional date-time with a UTC offset (TOML or an RFC 3339 string)."""
        if name not in t:
            return None
        value = t[name]
        example = "e.g. 2026-12-02T00:00:00Z"
        if isinstance(value, str):
            try:
                value = _dt.datetime.fromisoformat(value.strip())
            except ValueError:
                self.fail(
                    entry, f"{name} {_show(t[name])} is not an RFC 3339 date-time ({example})"
                )
        if not isinstance(value, _dt.datetime):
            self.fail(
                entry,
                f"{name} must be a date-time with a UTC offset ({example}), got {_got(value)}",
            )
        if value.tzinfo is None or value.utcoffset() is None:
            self.fail(
                entry, f"{name} {value.isoformat()} has no UTC offset; add Z or +HH:MM ({example})"
            )
        return value.astimezone(_dt.UTC)

    def agent(self, value: Any, guard: GuardConfig | None) -> AgentConfig:
        entry = "[agent]"
        t = self.table(entry, value, "[agent]")
        self.known(entry, t, _AGENT_KEYS)
        roles = {}
        for name in ("mark", "guard"):
            patterns = []
            for item in self.array(entry, t, name, required=False):
                if not isinstance(item, str):
                    self.fail(
                        entry, f"{name} must hold interface names or patterns, got {_got(item)}"
                    )
                if (
                    not item
                    or item in (".", "..")
                    or any(c == "/" or c.isspace() or c in "\x00" for c in item)
                ):
                    self.fail(entry, f"{name}: {_show(item)} is not an interface name or pattern")
                patterns.append(item)
            roles[name] = tuple(dict.fromkeys(patterns))
        if roles["guard"] and guard is None:
            self.fail(entry, "guard names interfaces but there is no [guard] section")
        metrics = t.get("metrics")
        if metrics is not None:
            if not isinstance(metrics, str):
                self.fail(entry, f'metrics must be a string "ADDR:PORT", got {_got(metrics)}')
            try:
                parse_listen(metrics)
            except ExporterError as e:
                self.fail(entry, f"metrics: {str(e).removeprefix('--listen ')}")
        return AgentConfig(mark=roles["mark"], guard=roles["guard"], metrics=metrics)

    def token(self, entry: str, value: Any) -> int:
        if _is_int(value):
            token = value
        elif isinstance(value, str):
            s = value.strip()
            if _HEX_TOKEN_RE.fullmatch(s):
                token = int(s[2:].replace("_", ""), 16)
            elif _DEC_TOKEN_RE.fullmatch(s):
                token = int(s.replace("_", ""), 10)
            else:
                self.fail(
                    entry,
                    f'token {_show(value)} is not a number ("0x…" hex or decimal)',
                )
        else:
            self.fail(entry, f'token must be an integer or a "0x…" string, got {_got(value)}')
        if not 0 <= token <= U64_MAX:
            self.fail(
                entry,
                f"token {_show(value)} does not fit in 64 bits (0..0xFFFFFFFFFFFFFFFF)",
            )
        return token

    def guard(self, value: Any, keys: Mapping[int, Key]) -> GuardConfig:
        entry = "guard"
        t = self.table(entry, value, "[guard]")
        self.known(entry, t, _GUARD_KEYS)
        action = self.choice(entry, t, "action", "drop", _ACTIONS)
        skew = self.integer(entry, t, "skew", DEFAULT_SKEW, 0, MAX_SKEW, " (epochs)")
        cache = self.integer(
            entry,
            t,
            "replay_cache",
            DEFAULT_REPLAY_CACHE,
            MIN_REPLAY_CACHE,
            MAX_REPLAY_CACHE,
        )
        fragments = self.choice(entry, t, "fragments", "drop", _FRAGMENTS)
        protects: list[Protect] = []
        entries: list[str] = []
        items = self.tables("guard.protect", t.get("protect", []), "[[guard.protect]]")
        if not items:
            self.fail(entry, "no [[guard.protect]] entries; the guard would protect nothing")
        for i, item in enumerate(items, 1):
            pentry = f"guard.protect #{i}"
            pt = self.table(pentry, item, "[[guard.protect]]")
            self.known(pentry, pt, _PROTECT_KEYS)
            dests = self.destinations(pentry, pt)
            ports = self.ports(pentry, pt)
            tokens = [
                self.token(pentry, v) for v in self.array(pentry, pt, "tokens", required=False)
            ]
            ids: list[int] = []
            for k in self.array(pentry, pt, "keys", required=not tokens):
                if not _is_int(k):
                    self.fail(pentry, f"keys must hold integer key ids, got {_got(k)}")
                self.key_ref(pentry, "keys", k, keys)
                ids.append(k)
            if not ids and not tokens:
                self.fail(pentry, "keys must not be empty (no SYN could verify)")
            paction = self.choice(pentry, pt, "action", None, _ACTIONS)
            protects.append(
                Protect(
                    destinations=dests,
                    ports=ports,
                    keys=tuple(dict.fromkeys(ids)),
                    action=paction,
                    tokens=tuple(dict.fromkeys(tokens)),
                )
            )
            entries.append(pentry)
        self.no_conflicts(
            [(e, p.destinations, p.ports) for e, p in zip(entries, protects, strict=True)]
        )
        return GuardConfig(
            action=action,
            skew=skew,
            replay_cache=cache,
            protect=tuple(protects),
            fragments=fragments,
        )
