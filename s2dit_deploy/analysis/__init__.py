"""Graph analysis of compiled programs (e.g. Neural Engine residency)."""
