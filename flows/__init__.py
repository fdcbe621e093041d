"""Prefect flows: orchestration only; every task calls a step function of :mod:`pipeline`.

Prefect's temporary local API server (used when no ``PREFECT_API_URL`` is set) gets 20 s to start
by default, which a loaded 2-core machine has exceeded; allow more unless the user chose a value.
That server also sends anonymous usage telemetry by default: off here unless the user chose otherwise
(``PREFECT_SERVER_ANALYTICS_ENABLED``; ``make`` and ``lerenet services`` set it off for their servers too).
MLflow's artifact download progress bars (drawn when a logged model is validated or a registered version's
files are checked) would interleave with the flow's log lines: off too, unless the user chose
(``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``).
"""

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
