"""The local team services (SeaweedFS S3, MLflow server, Prefect server) and their process supervisor.

:mod:`~pipeline.services.processes` runs and stops named processes by pid;
:mod:`~pipeline.services.team` defines the three services, their order, credentials and client
settings. The public API is re-exported here (``from pipeline import services as svc``); the CLI
(``lerenet services ...``, ``lerenet serve``) only parses and prints.
"""

from pipeline.services.processes import (ServiceError, ServiceStatus, log_path, registered_names,  # noqa: F401
                                         running_process, start_process, state_dir, stop_process)
from pipeline.services.team import (REQUIRES, SERVICE_ORDER, START_STAGES, Credentials, ServiceSpec,  # noqa: F401
                                    buckets, client_env, configure_dvc_remote, down, ensure_credentials, local_store,
                                    mlflow_tracking_uri, prefect_api_url, s3_endpoint, service_specs, status, up)
