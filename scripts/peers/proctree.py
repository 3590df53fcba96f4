#!/usr/bin/env python3
"""Resident memory and CPU time of a process and all its descendants.

Prints one JSON object: {"pids": [...], "rss_bytes": N, "cpu_s": S}. Used by
scripts/bench-peers.sh for servers that run as several processes (Nginx:
a master and workers), where /proc/PID of one process is not the whole server.

    proctree.py PID
"""
import json
import os
import sys

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def children(pid):
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found.extend(int(child) for child in handle.read().split())
        except OSError:
            pass
    return found


def tree(pid):
    pids, stack = [], [pid]
    while stack:
        current = stack.pop()
        pids.append(current)
        stack.extend(children(current))
    return pids


def usage(pid):
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    cpu_ticks = int(fields[11]) + int(fields[12])  # utime, stime
    with open(f"/proc/{pid}/statm") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * PAGE_BYTES, cpu_ticks / CLOCK_TICKS


def main():
    root = int(sys.argv[1])
    rss, cpu = 0, 0.0
    pids = []
    for pid in tree(root):
        try:
            pid_rss, pid_cpu = usage(pid)
        except OSError:
            continue
        pids.append(pid)
        rss += pid_rss
        cpu += pid_cpu
    print(json.dumps({"pids": pids, "rss_bytes": rss, "cpu_s": round(cpu, 3)}))


if __name__ == "__main__":
    main()
