"""Generated containerd API stubs (api/containerd/api/services/tasks)."""
