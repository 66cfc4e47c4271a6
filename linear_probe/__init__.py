"""Linear and kNN probes of frozen students (filled in by the probe stage)."""
