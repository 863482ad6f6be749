"""Generated containerd API stubs (api)."""
