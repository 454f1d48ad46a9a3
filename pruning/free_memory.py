"""Free memory on a device: what the OBS solver may keep between scoring and updating, and what the
pre-run memory check compares a run's needs with."""
from __future__ import annotations

import os

import torch


def available_bytes(device: torch.device, *, on_host: bool = False) -> int | None:
    """Free memory where an allocation would go, or None where it cannot be read. On the host: the
    kernel's MemAvailable, or less where a cgroup (a container's memory limit) leaves less."""
    if device.type == "cuda" and not on_host:
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    host = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except OSError:
        pass
    if host is None:
        try:
            host = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            return None
    limited = cgroup_free_bytes()
    return host if limited is None else min(host, limited)


# (limit, usage) files of cgroup v2, then v1; a v1 limit this high means none
_CGROUP_FILES = (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))


def cgroup_free_bytes(root: str = "/sys/fs/cgroup") -> int | None:
    """The memory limit of this process's cgroup less its usage, or None where no limit is set or readable."""
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            with open(os.path.join(root, limit_file), encoding="ascii") as fh:
                limit = fh.read().strip()
            with open(os.path.join(root, usage_file), encoding="ascii") as fh:
                usage = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None
