"""Running an exported artifact in its real runtime and measuring it (latency, memory, accuracy)."""
