"""Caches that live until a named event, in the style of pwndbg's cache_until.

    @cache_until("stop")
    def identity(task): ...

Events:
- "stop": gdb reported the guest stopped (the user's stops, the pauses of
  sampling and parking);
- "probe": the guest ran without a stop gdb reports: a probe hit that lets
  it go on, or gdb resuming it (gdb resumes after every probe hit, so what
  is cached until "stop" alone, like the module list, is not read again
  at each probe);
- "objfile": gdb loaded or dropped an objfile (another vmlinux, DWARF);
- "modules": the kernel's module list changed (a patch module came or went).
"""

import functools

import gdb

EVENTS = ("stop", "probe", "objfile", "modules")
RAN = ("stop", "probe")  # the guest ran since: what it changes is to be read again
_caches: dict[str, list[dict]] = {event: [] for event in EVENTS}


def cache_until(*events: str):
    """Memoize a function on its (hashable) arguments until one of events fires."""
    for event in events:
        if event not in _caches:
            raise ValueError(f"unknown cache event {event!r}")

    def decorate(function):
        cache: dict = {}
        for event in events:
            _caches[event].append(cache)

        @functools.wraps(function)
        def cached(*args):
            try:
                return cache[args]
            except KeyError:
                value = cache[args] = function(*args)
                return value

        cached.cache = cache
        return cached

    return decorate


def fire(event: str) -> None:
    """Forget everything cached until event."""
    for cache in _caches[event]:
        cache.clear()


gdb.events.stop.connect(lambda _event: fire("stop"))
gdb.events.cont.connect(lambda _event: fire("probe"))
gdb.events.new_objfile.connect(lambda _event: (fire("objfile"), fire("modules"), fire("stop")))
gdb.events.clear_objfiles.connect(lambda _event: (fire("objfile"), fire("modules"), fire("stop")))
