"""Membership changes: CONF entry payloads and how they change a ConfState.

Single-server changes only (Raft thesis §4.1): add a learner, promote a
learner to voter, remove a member.  ``bootstrap`` sets the initial voters.
"""
from __future__ import annotations

from server.raft.types import ConfState

OPS = ("add_learner", "promote", "remove")


def bootstrap_data(voters: dict[str, str]) -> dict:
    return {"op": "bootstrap", "voters": [[n, a] for n, a in sorted(voters.items())]}


def refusal(conf: ConfState, op: str, node: str) -> str | None:
    """Why ``op`` on ``node`` cannot be proposed against ``conf`` (None: it can)."""
    if op not in OPS:
        return f"unknown membership operation {op!r}"
    if not node:
        return "no node given"
    if op == "add_learner":
        return "already a member" if node in conf.members() else None
    if node not in conf.members():
        return "not a member"
    if op == "promote":
        return "already a voter" if node in conf.voters else None
    if conf.voters == frozenset((node,)):
        return "would remove the last voter"
    return None


def apply(conf: ConfState, data: dict) -> ConfState:
    """The conf after a CONF entry; idempotent, tolerant of odd payloads."""
    if not isinstance(data, dict):
        return conf
    op = data.get("op")
    addrs = dict(conf.addrs)
    voters, learners = set(conf.voters), set(conf.learners)
    if op == "bootstrap":
        pairs = [tuple(p) for p in data.get("voters", ())]
        voters, learners = {n for n, _ in pairs}, set()
        addrs = {n: a for n, a in pairs}
    else:
        node = data.get("node", "")
        if not node:
            return conf
        if op == "add_learner":
            if node not in voters:
                learners.add(node)
            addrs[node] = data.get("addr", "") or addrs.get(node, "")
        elif op == "promote":
            if node in learners:
                learners.discard(node)
                voters.add(node)
        elif op == "remove":
            voters.discard(node)
            learners.discard(node)
            addrs.pop(node, None)
        else:
            return conf
    return ConfState(voters=frozenset(voters), learners=frozenset(learners),
                     addrs=tuple(sorted(addrs.items())))


def quorum(n_voters: int) -> int:
    return n_voters // 2 + 1
