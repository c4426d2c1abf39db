"""Split federated learning on Flower: the device's ClientApp, the ServerApp and its strategies, the runner."""

import os

# Before anything imports Flower or Ray: neither may phone home (Flower reads this once, at import).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # a CPU run: no accelerator variables to touch
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # nor check for updates
