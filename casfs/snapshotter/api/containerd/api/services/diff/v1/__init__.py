"""Generated containerd API stubs (api/containerd/api/services/diff/v1)."""
