"""queue-runtime: ordered per-session message processing on trio."""
