"""Flower's Ray backend, except that a dead actor is replaced instead of kept.

In Flower 1.41 the Ray backend hands every client message to an idle actor from its
``BasicActorPool`` and, when the message fails, puts that actor back into the pool. An
actor whose process died (segfault, out-of-memory kill, ``SIGKILL``) is put back too, and
every later message it is given fails at once with Ray's ``ActorDiedError``: one dead
worker ends the run. Here the pool remembers a message that failed because its actor
died and, when the backend returns that actor, starts a new one in its place: the dying
client's message (and only it) fails, the failure is recorded for that round, and the
next messages find a full pool.

Installed by :func:`replacing_dead_actors` around ``run_simulation``: Flower's simulation
runtime imports ``RayBackend`` from its module each time it builds the backend, so the
subclass stands in for it while the context is open. Everything Flower-version-specific
about the backend lives in this file; other Flower versions get Flower's own backend
(a dead actor then fails its later messages, and the failure-fraction check stops the run
with a sentence saying so).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import flwr
import ray
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

logger = logging.getLogger(__name__)

#: Flower versions whose backend internals this module was written against (read in 1.41.0).
FLOWER_VERSIONS: tuple[str, ...] = ("1.41.",)


class ReplacingActorPool(BasicActorPool):
    """Flower's actor pool, with an actor that died replaced by a new one when it is returned.

    Attributes
    ----------
    replaced:
        How many dead actors were replaced so far.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._died: set[Any] = set()  # futures whose actor died while running them
        self.replaced = 0

    def fetch_result_and_return_actor_to_pool(self, future: Any) -> Any:
        """The message's reply and updated context; a dead actor's future is remembered, then re-raised.

        The backend answers any exception here by returning the future's actor with
        :meth:`add_actor_back_to_pool`, which is where the dead one is swapped out.
        """
        try:
            return super().fetch_result_and_return_actor_to_pool(future)
        except ray.exceptions.RayActorError:
            # Actors are created without restarts, so an actor error means the process is gone.
            self._died.add(future)
            raise

    def add_actor_back_to_pool(self, future: Any) -> None:
        """Return the actor that ran ``future`` to the pool, or a new actor if it died."""
        if future not in self._died:
            super().add_actor_back_to_pool(future)
            return
        self._died.discard(future)
        dead = self._future_to_actor.pop(future)
        with contextlib.suppress(Exception):  # usually gone already; make sure Ray never restarts it
            ray.kill(dead, no_restart=True)  # type: ignore[arg-type]
        self.pool.append(self.create_actor_fn())
        self.replaced += 1
        logger.info("a Ray actor died; replaced it (%d replaced in this session)", self.replaced)


class ReplacingRayBackend(raybackend.RayBackend):
    """Flower's Ray backend over a :class:`ReplacingActorPool`."""

    pool: ReplacingActorPool | None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        """Create the actor pool, one actor per ``client_resources`` that fit, and keep ``app_fn``."""
        self.pool = ReplacingActorPool(
            actor_type=ClientAppActor,
            client_resources=self.client_resources,
            actor_kwargs=self.actor_kwargs,
        )
        self.pool.add_actors_to_pool(self.pool.actors_capacity)
        self.app_fn = app_fn


def supported(version: str | None = None) -> bool:
    """Whether the installed Flower (or ``version``) is one this module knows the backend of."""
    return (version or flwr.__version__).startswith(FLOWER_VERSIONS)


@contextlib.contextmanager
def replacing_dead_actors() -> Iterator[bool]:
    """While inside, Flower's simulation runtime builds :class:`ReplacingRayBackend`.

    Yields whether the replacement is installed (only for :data:`FLOWER_VERSIONS`; other
    versions run Flower's own backend, with a warning).
    """
    if not supported():
        logger.warning(
            "flwr %s is not one of %s: a Ray worker that dies will not be replaced",
            flwr.__version__,
            ", ".join(FLOWER_VERSIONS),
        )
        yield False
        return
    original = raybackend.RayBackend
    raybackend.RayBackend = ReplacingRayBackend  # type: ignore[misc]
    try:
        yield True
    finally:
        raybackend.RayBackend = original  # type: ignore[misc]
