"""Time PatchCore's coreset selection: anomalens vs the textbook loop vs anomalib's KCenterGreedy.

The inputs are PatchCore's own patch features (lite0 blocks.2 + blocks.4, 152 dims, 1024 patches
per 256 px image) of texture crops, or Gaussian noise (--data random).  Each method runs in a
fresh process, so its peak RSS is its own; coverage radius = the largest distance from any patch
to its nearest selected patch, in the 152-dim feature space (lower is better).

    python benchmarks/coreset_speed.py                       # 60 and 209 images, anomalens + textbook
    python benchmarks/coreset_speed.py --images 60 --anomalib --threads 2
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PEER_PYTHON = Path(__file__).resolve().parents[1] / ".peer-venv" / "bin" / "python"


def make_features(n_images: int, data: str, size: int = 256) -> torch.Tensor:
    """(n_images * (size / 8)^2, 152) float32 patch features."""
    if data == "random":
        return torch.randn(n_images * (size // 8) ** 2, 152, generator=torch.Generator().manual_seed(0))
    import numpy as np
    from skimage import data as skdata

    from anomalens import create_model

    model = create_model("patchcore").eval()  # only its feature extractor is used
    textures = [skdata.brick(), skdata.grass(), skdata.gravel()]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n_images):
        tex = textures[i % 3]
        y, x = rng.integers(0, tex.shape[0] - size), rng.integers(0, tex.shape[1] - size)
        image = torch.from_numpy(tex[y:y + size, x:x + size].astype(np.float32) / 255).expand(1, 3, size, size)
        with torch.no_grad():
            embedding = model._embed(image)
        out.append(embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]))
    return torch.cat(out)


def _rss_mib() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited through exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def textbook_greedy(x: torch.Tensor, size: int, start: int) -> torch.Tensor:
    """The straightforward loop, done well: float32, precomputed norms, one mat-vec per centre."""
    x = (x - x.mean(0)).contiguous()
    sq = (x * x).sum(1)
    min_d = torch.full_like(sq, float("inf"))
    dot, dist = torch.empty_like(sq), torch.empty_like(sq)
    selected = torch.empty(size, dtype=torch.long)
    c = start
    for t in range(size):
        selected[t] = c
        torch.mv(x, x[c], out=dot)
        torch.add(sq, dot, alpha=-2.0, out=dist).add_(sq[c])
        torch.minimum(min_d, dist, out=min_d)
        c = int(min_d.argmax())
    return selected


def _run(method: str, path: str, ratio: float, threads: int, queue) -> None:
    """Child process: load the features, project, select; report seconds, indices and peak RSS."""
    from anomalens.components.coreset import greedy_coreset, random_projection

    torch.set_num_threads(threads)
    features = torch.load(path)
    rss_input = _rss_mib()
    size = max(1, round(ratio * len(features)))
    start = time.perf_counter()
    projected = random_projection(features, 128, seed=0)
    if method == "anomalens":
        selected = greedy_coreset(projected, size, seed=0, progress=False)
    else:  # the same first centre as greedy_coreset(seed=0)
        selected = textbook_greedy(projected, size, int(torch.randint(len(features), (1,),
                                                                      generator=torch.Generator().manual_seed(0))))
    seconds = time.perf_counter() - start
    # A list, not a tensor: torch would share the tensor through a file the exiting child removes.
    queue.put({"seconds": seconds, "selected": selected.tolist(), "rss_input": rss_input, "rss_peak": _rss_mib()})


_ANOMALIB_SNIPPET = """
import json, sys, time, torch
from anomalib.models.components.sampling import KCenterGreedy
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
torch.set_num_threads(int(sys.argv[3]))
features = torch.load(sys.argv[1])
rss_input = rss()
start = time.perf_counter()
selected = KCenterGreedy(features, float(sys.argv[2])).select_coreset_idxs()
seconds = time.perf_counter() - start
torch.save(torch.as_tensor(selected), sys.argv[1] + ".anomalib")
print(json.dumps({"seconds": seconds, "rss_input": rss_input, "rss_peak": rss()}))
"""


def run_anomalib(path: str, ratio: float, threads: int, timeout: float, max_gb: float) -> dict | str:
    """anomalib's KCenterGreedy (with its own sparse projection) in the peer venv; a string when it fails."""
    def limit_memory() -> None:  # its loop has been seen to take 24 GB: keep a shared machine alive
        resource.setrlimit(resource.RLIMIT_AS, (int(max_gb * 2**30),) * 2)

    try:
        done = subprocess.run([str(PEER_PYTHON), "-c", _ANOMALIB_SNIPPET, path, str(ratio), str(threads)],
                              capture_output=True, text=True, timeout=timeout, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        return f"> {timeout:.0f} s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"failed ({last[:60]}; address space limit {max_gb:g} GB)"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["selected"] = torch.load(path + ".anomalib")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[60, 209], help="training images of 256 px")
    parser.add_argument("--data", choices=["features", "random"], default="features")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset ratio")
    parser.add_argument("--methods", nargs="+", choices=["anomalens", "textbook"], default=["anomalens", "textbook"])
    parser.add_argument("--anomalib", action="store_true", help=f"also time anomalib 2.x ({PEER_PYTHON})")
    parser.add_argument("--anomalib-timeout", type=float, default=3600.0, help="seconds before giving up on it")
    parser.add_argument("--anomalib-max-gb", type=float, default=12.0, help="its address-space limit (GB)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    from anomalens.components.coreset import coverage_radius

    print(f"data={args.data} ratio={args.ratio} threads={args.threads}")
    print(f"{'images':>6} {'patches':>8} {'method':>10} {'seconds':>9} {'peak RSS MiB':>13} {'+input MiB':>11} "
          f"{'radius':>8}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        for n_images in args.images:
            features = make_features(n_images, args.data)
            path = str(Path(tmp) / f"features_{n_images}.pt")
            torch.save(features, path)
            results = {}
            for method in args.methods:
                queue = ctx.Queue()
                proc = ctx.Process(target=_run, args=(method, path, args.ratio, args.threads, queue))
                proc.start()
                results[method] = queue.get()
                results[method]["selected"] = torch.tensor(results[method]["selected"])
                proc.join()
            if args.anomalib:
                results["anomalib"] = run_anomalib(path, args.ratio, args.threads, args.anomalib_timeout,
                                                   args.anomalib_max_gb)
            for method, r in results.items():
                if isinstance(r, str):
                    print(f"{n_images:>6} {len(features):>8} {method:>10} {r}")
                    continue
                radius = coverage_radius(features, r["selected"])
                print(f"{n_images:>6} {len(features):>8} {method:>10} {r['seconds']:>9.2f} {r['rss_peak']:>13.0f} "
                      f"{r['rss_peak'] - r['rss_input']:>11.0f} {radius:>8.3f}", flush=True)
            if "anomalens" in results and "textbook" in results:
                a, b = results["anomalens"]["selected"], results["textbook"]["selected"]
                differ = (a != b).nonzero()
                first = "none" if len(differ) == 0 else f"step {int(differ[0])} of {len(a)} (float32 near-tie)"
                print(f"{'':>6} anomalens vs textbook: first different centre: {first}; "
                      f"{len(set(a.tolist()) & set(b.tolist())) / len(a):.1%} of the centres shared")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
