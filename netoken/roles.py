"""The roles netoken attaches, in one static table.

Like xdp-tools' command tables: the CLI's generic verbs (`status`, `stats`,
`monitor`, `apply`), the agent and the exporter find a role here by the
name its state directory carries, and every role implements all of
program.ProgramRole, so nobody asks a role what it can do.  Importing this
module loads libbpf (through the roles' modules): the verbs that need no
kernel never import it.
"""

from __future__ import annotations

from . import guard, marker
from .program import ProgramRole

ROLES: dict[str, ProgramRole] = {r.name: r for r in (marker.ROLE, guard.ROLE)}


def role(name: str) -> ProgramRole | None:
    """The role whose state directories are called NAME, or None (state
    of a netoken that knew more roles than this one)."""
    return ROLES.get(name)
