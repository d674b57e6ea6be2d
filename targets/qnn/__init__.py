"""ExecuTorch QNN target (Snapdragon HTP): lowering, QNN library resolution, HTP emulation."""
