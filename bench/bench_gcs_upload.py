"""Upload and download throughput of GcsStore against fake-gcs-server on loopback.

Compares, on the same bytes and the same server in one run, GcsStore.put_file (parallel
parts + compose) with a single-stream ``blob.upload_from_filename``. Also measures what the
emulator's compose costs by itself (it copies the bytes; real GCS does not) and the
emulator's CPU per GB uploaded, which together explain the emulator figures.

    python bench/bench_gcs_upload.py --size-mb 256
    python bench/bench_gcs_upload.py --size-mb 1024 --repeats 1

Prints ``name=value`` lines; throughputs are medians over ``--repeats`` in MB/s (1e6 bytes).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, List

from raytrain_spot.storage.gcs import GcsStore
from tests.servers.fake_gcs import FakeGcsServer

MIB = 1 << 20


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (the emulator is a separate process)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_random_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        for offset in range(0, size, 64 * MIB):
            f.write(os.urandom(min(64 * MIB, size - offset)))


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def report(name: str, seconds: List[float], size: int) -> float:
    rates = [size / 1e6 / s for s in seconds]
    print(f"{name}_mb_s={statistics.median(rates):.0f}")
    print(f"{name}_runs_mb_s={','.join(f'{r:.0f}' for r in rates)}")
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=256, help="file size in MiB (default 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8, help="GcsStore upload threads (its default: 8)")
    parser.add_argument("--min-part-mb", type=int, default=16, help="GcsStore minimum part size (its default: 16)")
    args = parser.parse_args()
    size = args.size_mb * MIB

    print(f"machine={platform.machine()} cpus={os.cpu_count()} python={platform.python_version()}")
    # Other work on the same cores skews every figure: record it at both ends.
    print(f"loadavg_1min_start={os.getloadavg()[0]:.2f}")
    print(f"size_mib={args.size_mb} repeats={args.repeats} workers={args.workers} min_part_mib={args.min_part_mb}")
    with tempfile.TemporaryDirectory(prefix="bench-gcs-") as scratch, FakeGcsServer() as server:
        source = os.path.join(scratch, "source.bin")
        write_random_file(source, size)
        bucket = server.create_bucket("bench")
        store = GcsStore("gs://bench/run", client=server.client(), emulator_host=server.endpoint,
                         workers=args.workers, min_part_bytes=args.min_part_mb * MIB)
        single, parallel, compose, download = [], [], [], []
        server_cpu = {"single": 0.0, "parallel": 0.0}

        for _ in range(args.repeats):
            # Same bytes, same server, back to back; each object is deleted so the in-memory
            # emulator does not grow across repeats.
            before = cpu_seconds(server.pid)
            single.append(timed(lambda: bucket.blob("single.bin").upload_from_filename(source, checksum="crc32c")))
            server_cpu["single"] += cpu_seconds(server.pid) - before
            bucket.blob("single.bin").delete()

            before = cpu_seconds(server.pid)
            parallel.append(timed(lambda: store.put_file("parallel.bin", source)))
            server_cpu["parallel"] += cpu_seconds(server.pid) - before

            composed = bucket.blob("compose-probe.bin")
            compose.append(timed(lambda: composed.compose([bucket.blob("run/parallel.bin")])))
            composed.delete()

            target = os.path.join(scratch, "download.bin")
            download.append(timed(lambda: store.get_file("parallel.bin", target)))
            os.unlink(target)
            store.delete_prefix("parallel.bin")

        single_rate = report("single_stream_upload", single, size)
        parallel_rate = report("parallel_upload", parallel, size)
        report("download", download, size)
        print(f"parallel_vs_single={parallel_rate / single_rate:.2f}")
        print(f"emulator_compose_copy_s={statistics.median(compose):.2f}")
        gigabytes = size * args.repeats / 1e9
        print(f"emulator_cpu_s_per_gb_single={server_cpu['single'] / gigabytes:.1f}")
        print(f"emulator_cpu_s_per_gb_parallel={server_cpu['parallel'] / gigabytes:.1f}")
    print(f"loadavg_1min_end={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
