"""A private asyncio event loop in one daemon thread, awaited from trio without worker threads.

``azure-servicebus`` is asyncio-only and trio-asyncio would replace asyncio's loop for the
whole process, so the Service Bus adapter runs the SDK here instead. This is the only module
of the project that touches asyncio.

How a call works (`AsyncioThread.run`):

1. trio schedules ``fn(*args)`` as an asyncio task on the private loop
   (``loop.call_soon_threadsafe``), exactly like ``asyncio.run_coroutine_threadsafe`` but
   keeping the task so it can be cancelled and awaited.
2. The trio task then sleeps on a `trio.Event`. No trio worker thread is occupied: the
   asyncio task's done-callback wakes trio through the trio token
   (``TrioToken.run_sync_soon(event.set)``), which is thread-safe.
3. The result (or exception) of the asyncio task is returned (raised) in trio.

Cancellation guarantees:

* When the trio side is cancelled, the asyncio task is cancelled
  (``loop.call_soon_threadsafe(task.cancel)``) and trio waits, shielded, until the task has
  finished its clean-up or ``cancel_grace`` seconds of *real* time have passed (the grace is
  timed on the asyncio loop, so it also holds when trio runs on ``MockClock``). Then the trio
  ``Cancelled`` propagates as usual.
* If the coroutine finished successfully anyway (the result raced the cancellation), the
  result is handed to the call's ``discard`` coroutine function on the loop (for example: close
  a session receiver accepted just as the caller gave up), so resources are not leaked.
* A task that outlives the grace stays owned by the loop: when it finishes, its result is
  discarded the same way and its exception retrieved; `aclose` cancels and waits for it.

`aclose` cancels every task still on the loop, waits for them (bounded by its deadline),
stops the loop and joins the thread. After `aclose`, `run` raises `BridgeClosed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import trio

__all__ = ["AsyncioThread", "BridgeClosed"]

T = TypeVar("T")

logger = logging.getLogger("queue_runtime.providers.servicebus")


class BridgeClosed(RuntimeError):
    """The asyncio thread was closed (or its loop stopped) before the call could finish."""


class _Call(Generic[T]):
    """State shared between the trio caller and the loop thread for one `run` call.

    ``task`` and ``abandoned`` are only written on the loop thread; trio reads ``task`` after
    the done event has been set, which orders the accesses.
    """

    __slots__ = (
        "abandoned",
        "bridge_calls",
        "callback_ran",
        "discard",
        "done_event",
        "finished",
        "task",
        "timed_out",
        "token",
    )

    def __init__(
        self,
        bridge_calls: set[_Call[Any]],
        token: trio.lowlevel.TrioToken,
        done_event: trio.Event,
        discard: Callable[[T], Awaitable[object]] | None,
    ) -> None:
        self.bridge_calls = bridge_calls
        self.token = token
        self.done_event = done_event
        self.discard = discard
        self.task: asyncio.Task[T] | None = None
        self.finished = False
        self.abandoned = False
        self.callback_ran = False
        self.timed_out = False

    def wake(self) -> None:
        """Wake the trio caller (from the loop thread). Idempotent; never raises."""
        if self.finished:
            return
        self.finished = True
        self.bridge_calls.discard(self)
        try:
            self.token.run_sync_soon(self.done_event.set)
        except trio.RunFinishedError:
            # The trio run is gone: nobody is waiting any more.
            pass


class AsyncioThread:
    """An asyncio loop in a dedicated daemon thread; trio code awaits coroutines on it.

    Started lazily by the first `run` (or explicitly by `start`), closed by `aclose`.
    ``cancel_grace`` bounds (in real seconds) how long a cancelled call waits for the asyncio
    task's clean-up.
    """

    def __init__(self, *, name: str = "queue-runtime-asyncio", cancel_grace: float = 5.0) -> None:
        self._name = name
        self.cancel_grace = cancel_grace
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._on_exit: Callable[[], None] | None = None
        # Calls whose trio side still waits; touched only on the loop thread.
        self._calls: set[_Call[Any]] = set()

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The private loop (starting the thread if needed). Touch it only via the loop's
        thread-safe methods."""
        return self._ensure_started()

    def start(self) -> None:
        """Start the loop thread if it is not running yet. Returns once the loop runs."""
        self._ensure_started()

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise BridgeClosed("the asyncio bridge is closed")
            if self._loop is not None:
                return self._loop
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def main() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                try:
                    loop.run_forever()
                finally:
                    try:
                        loop.run_until_complete(loop.shutdown_asyncgens())
                    finally:
                        asyncio.set_event_loop(None)
                        loop.close()
                        # Tasks that outlived the close deadline will never finish: release
                        # their trio callers (they raise BridgeClosed).
                        for call in list(self._calls):
                            call.wake()
                        self._calls.clear()
                        with self._lock:
                            on_exit = self._on_exit
                        if on_exit is not None:
                            on_exit()

            thread = threading.Thread(target=main, name=self._name, daemon=True)
            thread.start()
            # Starting a thread and a loop takes well under a millisecond; the bound is a
            # safety net, not a wait the caller would notice.
            if not ready.wait(timeout=10.0):  # pragma: no cover - would need a wedged OS
                raise BridgeClosed("the asyncio thread did not start")
            self._loop = loop
            self._thread = thread
            return loop

    async def aclose(self, timeout: float = 5.0) -> None:
        """Cancel every task on the loop, wait for them (at most ``timeout`` real seconds),
        stop the loop and join the thread. Idempotent; shielded from cancellation (bounded)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        token = trio.lowlevel.current_trio_token()
        stopped = trio.Event()

        def notify() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(stopped.set)

        async def shutdown() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=timeout)
                if pending:
                    logger.debug("asyncio bridge: %d task(s) still running at close", len(pending))

        def begin() -> None:
            loop.create_task(shutdown()).add_done_callback(lambda _t: loop.stop())

        with self._lock:
            # The loop thread calls this as its very last step, after closing the loop.
            self._on_exit = notify
        if not thread.is_alive():
            notify()
        else:
            try:
                loop.call_soon_threadsafe(begin)
            except RuntimeError:  # the loop is already closed; the thread is exiting
                pass
        with trio.CancelScope(shield=True):
            await stopped.wait()
        # The thread has returned from its last statement: this join is immediate.
        thread.join(timeout=1.0)

    # -- calls -----------------------------------------------------------------------------
    async def run(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        *args: Any,
        discard: Callable[[T], Awaitable[object]] | None = None,
        timeout: float | None = None,
    ) -> T:
        """Run ``await fn(*args)`` on the loop and return its result in trio.

        ``timeout`` (real seconds, timed on the loop) cancels the task and raises
        `TimeoutError` (a result that beat the cancellation is returned normally).
        ``discard`` receives, on the loop, a result that arrived after the trio caller was
        cancelled. Exceptions of ``fn`` propagate unchanged. See the module docstring for the
        cancellation guarantees.
        """
        # Already cancelled: do not start anything on the loop.
        await trio.lowlevel.checkpoint_if_cancelled()
        loop = self._ensure_started()
        token = trio.lowlevel.current_trio_token()
        done_event = trio.Event()
        call: _Call[T] = _Call(self._calls, token, done_event, discard)

        def start() -> None:
            self._calls.add(call)
            if call.abandoned:  # cancelled before it started: never call fn
                call.wake()
                return
            task = loop.create_task(fn(*args))
            call.task = task
            task.add_done_callback(lambda _t: self._task_done(call))
            if timeout is not None:
                # Not asyncio.wait_for: it drops a result that races the cancellation, and
                # that result may be a resource (a session receiver) that must be discarded.
                def expire() -> None:
                    if not task.done():
                        call.timed_out = True
                        task.cancel()

                timer = loop.call_later(timeout, expire)
                task.add_done_callback(lambda _t: timer.cancel())

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError as exc:  # loop closed between the check and the call
            raise BridgeClosed("the asyncio bridge is closed") from exc
        try:
            await done_event.wait()
        except BaseException:
            # Cancelled (or KeyboardInterrupt): cancel the asyncio side and wait, bounded and
            # shielded, for its clean-up.
            self._request_cancel(loop, call)
            with trio.CancelScope(shield=True):
                await done_event.wait()
            raise
        task = call.task
        if task is None or not task.done():
            raise BridgeClosed("the asyncio bridge closed before the call finished")
        if task.cancelled():
            if call.timed_out:
                raise TimeoutError(f"the call did not finish within {timeout} s")
            raise BridgeClosed("the asyncio task was cancelled (the bridge is closing)")
        return task.result()

    def _request_cancel(self, loop: asyncio.AbstractEventLoop, call: _Call[T]) -> None:
        def cancel() -> None:
            call.abandoned = True
            task = call.task
            if task is None:
                call.wake()
                return
            if task.done():
                if call.callback_ran:
                    # The result reached trio's doorstep just as trio gave up on it.
                    self._discard_late_result(call, task)
                # else: _task_done has yet to run and will see ``abandoned``.
                return
            task.cancel()
            # Bound the wait for the task's clean-up in real time, on the loop: MockClock in
            # trio must not make the grace vanish.
            loop.call_later(self.cancel_grace, call.wake)

        try:
            loop.call_soon_threadsafe(cancel)
        except RuntimeError:  # loop already closed: nothing left to cancel
            call.wake()

    def _task_done(self, call: _Call[T]) -> None:
        """Done-callback on the loop thread: discard late results, then wake trio."""
        call.callback_ran = True
        task = call.task
        assert task is not None
        if call.abandoned:
            self._discard_late_result(call, task)
        call.wake()

    def _discard_late_result(self, call: _Call[T], task: asyncio.Task[T]) -> None:
        """On the loop thread: hand a result nobody will read to ``call.discard``."""
        if task.cancelled() or task.exception() is not None:  # exception() marks it retrieved
            return
        discard = call.discard
        if discard is None:
            return
        result = task.result()

        async def run_discard() -> None:
            try:
                await discard(result)
            except Exception as error:
                logger.debug("asyncio bridge: discarding a late result failed: %s", type(error).__name__)

        # Owned by the loop: aclose cancels and awaits it like any other task.
        asyncio.get_running_loop().create_task(run_discard())

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._loop is not None else "idle")
        return f"<AsyncioThread {self._name!r} {state}>"
