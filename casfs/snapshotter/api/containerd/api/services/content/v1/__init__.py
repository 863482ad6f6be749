"""Generated containerd API stubs (api/containerd/api/services/content/v1)."""
