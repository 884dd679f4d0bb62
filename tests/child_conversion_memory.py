"""Run by tests/test_conversion.py in a fresh process: convert SOURCE to OUTPUT (bf16, MAX_SHARD_SIZE shards; MODE
`verify` also verifies) and print the peak RSS of this process before and after as JSON. VmHWM, since Linux carries
the parent's RSS into a child's ru_maxrss across fork+exec. With a warm-up checkpoint (WARM_UP) the same conversion
first runs on it, so that the modules the code path imports lazily count in the baseline and the measured growth is
the data's.

usage: child_conversion_memory.py SOURCE OUTPUT MAX_SHARD_SIZE {convert,verify} [WARM_UP]
"""

import json
import sys

from deepseek_moe.conversion import convert_checkpoint


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) * 1024


if __name__ == "__main__":
    source, output, max_shard_size, mode, *warm_up = sys.argv[1:]
    verify = mode == "verify"
    for checkpoint in warm_up:
        convert_checkpoint(checkpoint, checkpoint + "-out", dtype="bf16", verify=verify, progress=False)
    baseline = peak_rss()
    report = convert_checkpoint(
        source, output, dtype="bf16", max_shard_size=max_shard_size, verify=verify, progress=False
    )
    assert (report.logits_error is not None) == verify
    print(json.dumps({"baseline": baseline, "peak": peak_rss()}))
