"""Prefect flows: orchestration only; every task calls a step function of :mod:`pipeline`.

Prefect's temporary local API server (used when no ``PREFECT_API_URL`` is set) gets 20 s to start
by default, which a loaded 2-core machine has exceeded; allow more unless the user chose a value.
"""

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
