#!/usr/bin/env python3
"""Summarises a ZI_STREAM_TRACE_CSV file (src/backends/cuda/block_stream.cpp): per pass of the
streamed blocks, the copy engine's busy time and rate, the copies' waits for a free slot, and the
compute stream's waits for a block. Usage: trace_summary.py TRACE.csv [blocks_per_pass]"""
import csv
import sys

rows = list(csv.DictReader(open(sys.argv[1])))
n = int(sys.argv[2]) if len(sys.argv) > 2 else 0
if not n:  # the pass length: the distance between fills of the same (slot, bytes) pattern is unknown; guess from bytes
    n = len(rows)
f = lambda r, k: float(r[k])
for p in range(0, len(rows), n):
    part = rows[p:p + n]
    busy = sum(f(r, "copy_end_ms") - f(r, "copy_begin_ms") for r in part)
    nbytes = sum(int(r["bytes"]) for r in part)
    waits = sum(max(0.0, f(b, "copy_begin_ms") - f(a, "copy_end_ms")) for a, b in zip(part, part[1:]))
    used = [r for r in part if f(r, "use_begin_ms") >= 0]
    stall = sum(max(0.0, f(b, "use_begin_ms") - f(a, "use_end_ms")) for a, b in zip(used, used[1:]) if f(a, "use_end_ms") >= 0)
    compute = sum(f(r, "use_end_ms") - f(r, "use_begin_ms") for r in used if f(r, "use_end_ms") >= 0)
    span = (f(part[-1], "use_end_ms") if f(part[-1], "use_end_ms") >= 0 else f(part[-1], "copy_end_ms")) - f(part[0], "copy_begin_ms")
    print(f"pass {p // n}: {len(part)} fills {nbytes / 2**20:.0f} MiB, span {span:.1f} ms; copy busy {busy:.1f} ms "
          f"({nbytes / (busy * 1e-3) / 1e9 if busy else 0:.1f} GB/s), copy idle between fills {waits:.1f} ms; "
          f"streamed blocks computing {compute:.1f} ms, compute stream between them {stall:.1f} ms")
