"""The syscall table itself: one entry per syscall, in two halves.

A syscall runs in the caller's context first and in kernel mode second:

    prepare(kernel, caller, *args)  caller's thread, no kernel lock: decodes the arguments and
                                    does the work that grows with the caller's input (tokenizing
                                    text, rendering a chat, compiling stop strings, loading a
                                    program), so nobody else waits for it. Returns the handler's
                                    arguments as a dict.
    handler(kernel, caller, **a)    kernel mode, under the kernel lock (or taking it itself when
                                    blocking): validates against kernel state and calls the
                                    mechanism. Every refusal is a KvosError raised before anything
                                    changed. It sees token ids and bounded data only.
    finish(result)                  caller's thread again: turns raw results (output bytes) into
                                    what the caller reads (text).

Without prepare the handler receives the call's own arguments. `signature` is what callers
bind against (prepare's when there is one); the Python handle, the daemon's routes, its
OpenAPI and its client are all generated from this table (kernel/syscalls.py).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Syscall:
    name: str
    handler: object
    root_only: bool
    blocking: bool               # the handler may wait (and takes the kernel lock itself)
    locked: bool                 # the handler runs under the kernel lock (False: reads immutable state only)
    new_work: bool               # it may give the loop something to run (the loop is woken after it)
    doc: str
    signature: inspect.Signature   # (kernel, caller, ...): what callers bind against
    binder: object                 # a function of its parameters after (kernel, caller) that does nothing
    prepare: object = None
    finish: object = None


SYSCALLS: dict = {}


def syscall(name: str, *, root_only: bool = False, blocking: bool = False, locked: bool = True,
            new_work: bool = False, prepare=None, finish=None):
    """Register the decorated handler as syscall `name` (see the module docstring for the halves)."""
    def register(handler):
        signature = inspect.signature(prepare if prepare is not None else handler)
        SYSCALLS[name] = Syscall(name, handler, root_only, blocking, locked, new_work,
                                 inspect.getdoc(handler) or "", signature, _binder(name, signature), prepare,
                                 finish)
        return handler
    return register


def _binder(name: str, signature: inspect.Signature):
    """A function with the syscall's parameters and an empty body: calling it checks that arguments
    fit (TypeError otherwise) in C, 10x faster than Signature.bind on every syscall."""
    parts, star = [], False
    for p in list(signature.parameters.values())[2:]:          # what the caller passes: not (kernel, caller)
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        else:
            if p.kind is p.KEYWORD_ONLY and not star:
                parts.append("*")
                star = True
            parts.append(p.name if p.default is p.empty else f"{p.name}=None")
    namespace: dict = {}
    exec(f"def {name}({', '.join(parts)}):\n    pass", namespace)      # noqa: S102 -- names from our own table
    return namespace[name]
