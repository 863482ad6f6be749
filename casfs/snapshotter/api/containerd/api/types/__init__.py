"""Generated containerd API stubs (api/containerd/api/types)."""
