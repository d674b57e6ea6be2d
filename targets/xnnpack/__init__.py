"""ExecuTorch XNNPACK target (CPU): lowering, host runtime."""
