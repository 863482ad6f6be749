"""Helpers for tests that mount casfs for real (casfs.testing.mounting, shared with the
benchmarks), and the pytest side: FUSE and kernel-mode tests skip, with the reason, only
when the machine cannot do them, and fail instead when the environment variable CI is
true (CI must exercise every serving mode)."""

from __future__ import annotations

import pytest

from casfs.testing.mounting import (  # noqa: F401 - re-exported for the tests
    CASFS,
    CLI_TIMEOUT,
    FUSECTL,
    STATS_XATTR,
    Mount,
    abort_fuse,
    build_and_index,
    clear_leftovers,
    cli,
    drop_file_cache,
    errno_name,
    force_cleanup,
    fuse_unavailable_reason,
    in_ci,
    index_layout,
    is_mounted,
    kernel_mode_unavailable_reason,
    mount_entry,
    mounted,
    mounts_under,
    process_alive,
    process_state,
    read_in_subprocess,
    start_mount,
    unmount_checked,
    wait_gone,
    wait_stats,
)

MODES = ("fuse", "kernel")


def require_fuse() -> None:
    """Skip the calling test with the reason when FUSE is unusable (fail when CI=true)."""
    reason = fuse_unavailable_reason()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"FUSE unavailable in CI: {reason}")
    pytest.skip(f"FUSE unavailable: {reason}")


def require_mode(mode: str) -> None:
    """Skip (fail when CI=true) a test of serving mode `mode` this machine cannot run."""
    require_fuse()
    if mode != "kernel":
        return
    reason = kernel_mode_unavailable_reason()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"kernel mode unavailable in CI: {reason}")
    pytest.skip(f"kernel mode unavailable: {reason}")
