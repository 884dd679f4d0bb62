"""Run by tests/test_conversion.py in a fresh process: convert SOURCE to OUTPUT (bf16, MAX_SHARD_SIZE shards) and print
the peak RSS of this process before and after as JSON. VmHWM, since Linux carries the parent's RSS into a child's
ru_maxrss across fork+exec."""

import json
import sys

from deepseek_moe.conversion import convert_checkpoint


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) * 1024


if __name__ == "__main__":
    source, output, max_shard_size = sys.argv[1:4]
    baseline = peak_rss()
    convert_checkpoint(source, output, dtype="bf16", max_shard_size=max_shard_size, progress=False)
    print(json.dumps({"baseline": baseline, "peak": peak_rss()}))
