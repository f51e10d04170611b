"""`python -m tests.e2e.crashing_tokens serve tokens …`: the real CLI, with a fault hook in the
token service that ends the process with exit code 137 (as SIGKILL would) right after the saga
step named by LT_TEST_CRASH_AFTER commits (e.g. "PaymentReserved", "TokensAllocated"). The hook
lives here, in test code; the service only offers the observer it is installed on."""

from __future__ import annotations

import logging
import os
import uuid

from fastapi import FastAPI

from leaky_tokens import cli
from leaky_tokens.runtime import compose
from leaky_tokens.settings import Settings
from leaky_tokens.tokens.purchase_saga import StepObserver

CRASH_AFTER = "LT_TEST_CRASH_AFTER"


def _crash_after(event: str) -> StepObserver:
    def observe(event_type: str, saga_id: uuid.UUID) -> None:
        if event_type == event:
            logging.getLogger("tests.crash").error("exiting after %s of %s", event_type, saga_id)
            os._exit(137)

    return observe


def install() -> None:
    event = os.environ.get(CRASH_AFTER, "")
    if not event:
        return

    def tokens(settings: Settings) -> FastAPI:
        from leaky_tokens.tokens.app import create_tokens_app

        return create_tokens_app(
            settings,
            authenticator=compose.remote_authenticator(settings),
            saga_step_committed=_crash_after(event),
        )

    compose.FACTORIES["tokens"] = tokens


if __name__ == "__main__":
    install()
    cli.main()
