"""Hooks with one owner: everything registered through a :class:`HookOwner` is removed on exit,
whether the body finished or raised."""

from __future__ import annotations

from contextlib import contextmanager


class HookOwner:
    def __init__(self):
        self._handles = []
        self._restore = []

    def forward_pre(self, module, fn, with_kwargs=False):
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def forward(self, module, fn):
        self._handles.append(module.register_forward_hook(fn))

    def patch(self, obj, attr, value):
        """Set `obj.attr` for the owner's lifetime (instance attribute, removed afterwards)."""
        had = attr in vars(obj)
        old = vars(obj).get(attr)
        setattr(obj, attr, value)
        self._restore.append((obj, attr, had, old))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for obj, attr, had, old in reversed(self._restore):
            if had:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)
        self._restore.clear()


@contextmanager
def owned_hooks():
    owner = HookOwner()
    try:
        yield owner
    finally:
        owner.remove()
