"""Generated containerd API stubs (api/containerd)."""
