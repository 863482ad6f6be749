"""Generated containerd API stubs (api/containerd/api/services/version/v1)."""
