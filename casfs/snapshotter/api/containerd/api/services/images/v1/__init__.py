"""Generated containerd API stubs (api/containerd/api/services/images/v1)."""
