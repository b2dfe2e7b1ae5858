"""Library API of the guard: load the XDP or TC program, fill its maps, attach it.

Everything the CLI's `guard` verbs do goes through here, so tests and other
programs get the same behaviour as operators.  The package, by concern:

- ``program``: the guard as a loaded program (Guard), its maps and events;
- ``hooks``: where it runs, XDP or TC ingress, and whose program is there;
- ``pinned``: attach, apply and detach of pinned guards, one transaction each;
- ``role``: its status, counters and events for the generic views;
- what a config compiles to is netoken/entries.py, shared with the marker.

Map design (bpf/guard.bpf.c, structs in bpf/netoken.h):

- ``nt_dst_v4`` / ``nt_dst_v6``: LPM tries, destination prefix -> port rules,
  compiled by netoken/rules.py exactly as for the marker; a rule's target is
  an index into ``nt_protect``.
- ``nt_protect``: one ``struct nt_protect`` per ``[[guard.protect]]`` entry:
  its action and the key ids it accepts as a 256-bit bitmap.  Used in two
  halves like the marker's policies (see netoken/entries.py).
- ``nt_keys``: the key slots, shared layout with the marker.
- ``nt_static``: hash set of accepted static tokens, keyed by (protect
  index, token as on the wire), so each entry accepts its own tokens.
- ``nt_replay``: the replay cache, direct-mapped 8-byte slots (nonce and
  part of the tag of an accepted mac token, at a hash of the same; see
  NT_REPLAY_ENTRY in bpf/netoken.h), ``[guard] replay_cache`` rounded up to
  a power of two of them, sized before load.
- ``nt_guard_stats``: per-CPU counters by enum nt_guard_reason;
  ``nt_key_stats``: per-CPU ok/bad counters per key id.
- ``nt_guard_events``: ring buffer of rejected SYNs, rate-limited per CPU
  by a token bucket (``nt_ev_bucket``, rate and burst in the config map).

The guard runs at XDP or at TC ingress (see hooks.py); every object has
the same maps, so the hook changes nothing of what the guard shares or counts.

Every guard of a network namespace shares one set of these maps (SHARED_MAPS,
pinned once in the namespace's state directory); only the counters
(``nt_guard_stats``, ``nt_key_stats``) and the program are per interface.

Decisions where docs/design.md is silent:

- The guard config is per network namespace, not per interface: attaching
  or applying a config on one interface applies it to every guard of the
  namespace (the command says so), and ``--mode`` is one override for all of
  them.  A node's interfaces protect the node's destinations, and one
  replay cache only means something under one set of keys and skew; two
  configs would need two caches, the memory this sharing saves.
- The replay cache is sized by the namespace's first guard.  A later
  attach with another ``replay_cache`` resizes it only if it is the
  namespace's only guard (as before); with others it keeps the live size and
  says how to resize.
- Events of all guards come through one ring, each naming its interface;
  ``monitor IFACE`` filters.  The event rate limit is per namespace (per CPU).

- Static tokens come from ``tokens = [...]`` in ``[[guard.protect]]`` and are
  accepted only by that entry; they skip the replay cache (every SYN of a
  static client carries the same token).
- Only tokens whose tag verified are looked up in or added to the replay
  cache, so forged floods cannot evict real entries.  A token stays known
  until another accepted token takes its slot: size ``replay_cache`` well
  above the legitimate SYN rate times (2 * skew + 1) * window (an accepted
  token survives N later ones with probability about e^(-N/slots)).  An
  8-byte slot instead of an LRU hash entry (~90 bytes with its node) and an
  array look-up plus one compare-and-swap instead of an LRU insert keep the
  first sight of a valid SYN about as cheap as a bare MAC check.
- Events cover every rejected SYN, dropped or passed by monitor mode (that is
  what monitor mode is for); ``events + events_suppressed + events_lost ==
  dropped + monitored``.  The rate and burst are per CPU.
- The global ``action`` argument of configure() overrides every entry (the
  CLI's ``--mode``); without it each entry's own action, else ``[guard]
  action``, applies.
- IPv6 Hop-by-Hop, Routing and Destination Options headers and AH (up to
  layout.MAX_IP6_EXT of them, bpf/parsing.h) are walked to reach TCP, so they
  cannot carry a SYN past the guard.
- Packets whose TCP header the guard cannot check (design.md §2 "Fragments",
  "Fail closed"): TCP fragments (``fragment``), IPv6 chains longer than the
  walk or with a header it cannot walk (``ipv6_ext``), chains or TCP headers
  cut short (``bad_header``).  They have no port the guard can trust, so the
  destination address decides: if any protect entry covers it they are
  verdicts, dropped or monitored like rejected SYNs under the first covering
  entry that drops (else the first, all monitoring; ``--mode`` overrides as
  for SYNs), with an event whose ports are 0.  Otherwise, and for fragments
  with ``[guard] fragments = "pass"``, they pass as ``*_passed``.  Non-TCP
  fragments and ESP pass (``fragment_passed``, ``not_tcp``); so does a frame
  without a readable IP header, which the kernel drops itself.
- A SYN to a protected destination whose TCP header is broken (doff < 5,
  options past the IP length or the frame) is ``malformed``.
"""

from ..errors import GuardError
from .hooks import attached, choose_hook, detach
from .pinned import apply, attach_pinned, detach_pinned, side_doors
from .program import (
    OWN_MAPS,
    RETVALS,
    SHARED_MAPS,
    Guard,
    GuardEvent,
    check,
    replay_slots,
)
from .role import ROLE, GuardRole

__all__ = [
    "OWN_MAPS",
    "RETVALS",
    "ROLE",
    "SHARED_MAPS",
    "Guard",
    "GuardError",
    "GuardEvent",
    "GuardRole",
    "apply",
    "attach_pinned",
    "attached",
    "check",
    "choose_hook",
    "detach",
    "detach_pinned",
    "replay_slots",
    "side_doors",
]
