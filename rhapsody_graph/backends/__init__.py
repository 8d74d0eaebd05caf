"""Backends run calls and report completions; :mod:`.base` holds the protocol.

The modules: :mod:`.local` (worker processes on pipes), :mod:`.dragon`, :mod:`.dask`,
:mod:`.inference` (model servers), :mod:`.simulated` (no user code: modelled run times),
and what they share (:mod:`.pool`, :mod:`.launch`, :mod:`.wire`, :mod:`.watchdog`).
Nothing is imported here, so that a worker process importing :mod:`.worker` loads only
what it runs.
"""
