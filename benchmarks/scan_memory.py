"""Peak anonymous memory and time of ``deadunits scan`` on a large saved model, against its largest tensor.

Writes a model of ``--size-mb`` megabytes in ``--tensors`` equal float32 weights (a ``torch.save``-d state_dict, a
safetensors file, or both), then scans each in a fresh subprocess that samples ``RssAnon`` (anonymous resident
memory: what the scan allocates, as opposed to file pages mapped from the page cache, which the kernel can drop) in
``/proc/self/status`` every millisecond. The growth over the subprocess's memory before the scan is compared with
the largest tensor's size. ``VmHWM`` (peak resident memory, file pages included) is reported beside it.

Usage:
    python benchmarks/scan_memory.py                        # 800 MB in 8 tensors, state_dict and safetensors
    python benchmarks/scan_memory.py --size-mb 64 --format safetensors --dtype bfloat16
    PYTHONPATH=/path/to/other/checkout python benchmarks/scan_memory.py   # the same with another version

Linux only (``/proc``).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

_MB = 10**6


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(path: Path) -> dict[str, float]:
    """Scan ``path`` in this process and return its time and memory, in seconds and megabytes."""
    from lightning_deadunits.cli.scan import scan_file

    before = _status_kib("RssAnon")
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _status_kib("RssAnon"))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    _, layers = scan_file(path)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {
        "seconds": seconds,
        "rss_anon_before_mb": before * 1024 / _MB,
        "rss_anon_growth_mb": (peak - before) * 1024 / _MB,
        "vm_hwm_mb": _status_kib("VmHWM") * 1024 / _MB,
        "layers": len(layers),
    }


def _rows(size_mb: int, tensors: int, dtype: torch.dtype) -> int:
    """Rows of 1024 values per weight, so that ``tensors`` weights of ``dtype`` fill ``size_mb``."""
    return size_mb * _MB // (dtype.itemsize * 1024 * tensors)


def _write(directory: Path, file_format: str, size_mb: int, tensors: int, dtype: torch.dtype) -> Path:
    rows = _rows(size_mb, tensors, dtype)
    state = {f"layer{index}.weight": torch.randn(rows, 1024).to(dtype) for index in range(tensors)}
    if file_format == "safetensors":
        from safetensors.torch import save_file

        path = directory / "model.safetensors"
        save_file(state, path)
    else:
        path = directory / "model.pt"
        torch.save(state, path)
    return path


def main() -> None:
    """Write the model(s), scan each in a subprocess and print one JSON line per format."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=800, help="file size in MB (default 800)")
    parser.add_argument("--tensors", type=int, default=8, help="equal weights it is split into (default 8)")
    parser.add_argument("--format", choices=["state_dict", "safetensors", "both"], default="both")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the subprocess's side
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    formats = ["state_dict", "safetensors"] if args.format == "both" else [args.format]
    with tempfile.TemporaryDirectory() as directory:
        for file_format in formats:
            dtype = getattr(torch, args.dtype)
            path = _write(Path(directory), file_format, args.size_mb, args.tensors, dtype)
            result = subprocess.run(
                [sys.executable, __file__, "--measure", str(path)], capture_output=True, text=True, check=True
            )
            row = {
                "format": file_format,
                "dtype": args.dtype,
                "file_mb": path.stat().st_size / _MB,
                "largest_tensor_mb": _rows(args.size_mb, args.tensors, dtype) * 1024 * dtype.itemsize / _MB,
                **json.loads(result.stdout),
            }
            print(
                json.dumps({key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()})
            )
            path.unlink()


if __name__ == "__main__":
    main()
