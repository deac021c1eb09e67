"""Why a session must stop: set by the runner's Ctrl-C handler or when Flower's runtime ends."""

from __future__ import annotations

import threading

from fedmem.errors import FederationError


class Stop:
    """A stop event with its reason; executors poll it while they wait for replies."""

    USER = "user"
    RUNTIME = "runtime"

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        """Ask the session to stop (the first reason given is kept)."""
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        return self._event.is_set()

    def check(self) -> None:
        """Raise if a stop was asked for: KeyboardInterrupt for the user, an error for the runtime."""
        if not self._event.is_set():
            return
        if self.reason == Stop.USER:
            raise KeyboardInterrupt
        raise FederationError(
            "Flower's simulation runtime stopped while waiting for clients (a Ray process died?)"
        )
