"""Core AI target (iOS 27 / macOS 27): ``.aimodel`` through coreai-torch, run on Linux by coreai-core."""
