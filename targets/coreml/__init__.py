"""Core ML target (iPhone Neural Engine): conversion, Linux reference executor."""
