"""Plain torch.nn twins of fastdl.models: same architectures and parameter names, no fastdl."""
