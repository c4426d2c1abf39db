"""An OpenAI-compatible HTTP front for a `DeviceEngine`: the API, Prometheus metrics and a web chat page."""
