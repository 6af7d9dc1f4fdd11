"""Held-out splits: whole tasks (or whole dialogs) go to train or test, decided by a seeded hash."""

from __future__ import annotations

import hashlib

from .hygiene import normalise_text


def task_key(task_id: str | None, request: str | None, trace_id: int) -> str:
    """What counts as one task: the eval task id, else the request text (normalised), else the trace."""
    if task_id:
        return f"task:{task_id}"
    if request:
        return "request:" + hashlib.blake2b(normalise_text(request).encode(), digest_size=12).hexdigest()
    return f"trace:{trace_id}"


def bucket(seed: int, group: str) -> float:
    """A number in [0, 1) fixed by the seed and the group name alone."""
    h = hashlib.blake2b(f"{seed}\x1f{group}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2 ** 64


class _Components:
    """Union-find over dialog and task nodes, so a task seen in two dialogs joins them."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        parent = self.parent
        parent.setdefault(x, x)
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller name wins, so the root (and the split) does not depend on the order of traces.
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra


class Splitter:
    """Decides train or test for a trace from its task (and dialog), the same way for every format.

    by="task": the group is the task. by="dialog": the group is the dialog, merged with every other
    dialog that shares a task with it, so a task never straddles the split either way. Groups that
    hold a task of an excluded eval run always go to test.
    """

    def __init__(self, *, by: str = "task", test_fraction: float = 0.1, seed: int = 0,
                 forced_tasks: set[str] = frozenset(), links: list[tuple[int | None, str]] = ()):
        self.by, self.test_fraction, self.seed = by, test_fraction, seed
        self.forced_tasks = set(forced_tasks)
        self._components = None
        self._forced_roots: set[str] = set()
        if by == "dialog":
            comps = _Components()
            for dialog_id, task in links:
                comps.union(f"t:{task}", f"d:{dialog_id}" if dialog_id else f"t:{task}")
            self._components = comps
            self._forced_roots = {comps.find(f"t:{t}") for t in self.forced_tasks}
        self.groups: dict[str, set[str]] = {"train": set(), "test": set()}
        self.tasks: dict[str, set[str]] = {"train": set(), "test": set()}  # what a later eval must hold out

    def group(self, dialog_id: int | None, task: str) -> str:
        if self._components is None:
            return task
        node = f"d:{dialog_id}" if dialog_id else f"t:{task}"
        return self._components.find(node)

    def split(self, dialog_id: int | None, task: str) -> str:
        g = self.group(dialog_id, task)
        forced = task in self.forced_tasks if self._components is None else g in self._forced_roots
        name = "test" if forced or bucket(self.seed, g) < self.test_fraction else "train"
        self.groups[name].add(g)
        self.tasks[name].add(task)
        return name
