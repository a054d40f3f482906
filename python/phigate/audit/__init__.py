"""Evidence: the events sink (to become the signed audit trail)."""
