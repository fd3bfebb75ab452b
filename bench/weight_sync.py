"""Weight broadcast latency vs adapter size and vs number of receiving actors.

    python -m bench.weight_sync [--sizes 1 10 50 200] [--actors 1 2 4 8 16] [--actor-size-mb 10]

The publisher packs the state and puts it in the object store once (as the learner does); each receiver
fetches and unpacks it and verifies its sha256 checksum: the receiving side of `safediff.common.weight_sync`
without a model.
Reports milliseconds from the first send to the last verified acknowledgement (median of 3), with and
without the checksum verification, so transfer and hashing costs show separately.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import torch  # noqa: E402

from safediff.common.messages import AdapterUpdate  # noqa: E402
from safediff.common.trainable import state_checksum  # noqa: E402
from safediff.common.weight_sync import fetch_state, pack_state, state_bytes  # noqa: E402


@ray.remote(num_cpus=0.1)
class SyncProbe:
    def receive(self, update: AdapterUpdate, verify: bool) -> int:
        state = fetch_state(update)
        if verify and state_checksum(state) != update.checksum:
            raise RuntimeError("checksum mismatch")
        return update.version


def synthetic_state(megabytes: float) -> dict[str, torch.Tensor]:
    """LoRA-shaped fp32 tensors (rank 8, 320..1280 features) adding up to about `megabytes`."""
    state, total, i = {}, 0, 0
    gen = torch.Generator().manual_seed(0)
    while total < megabytes * 2**20:
        width = (320, 640, 1280)[i % 3]
        state[f"block{i}.lora_A.weight"] = torch.randn(8, width, generator=gen)
        state[f"block{i}.lora_B.weight"] = torch.randn(width, 8, generator=gen)
        total += 2 * 8 * width * 4
        i += 1
    return state


def broadcast_ms(probes: list, state: dict[str, torch.Tensor], verify: bool, repeats: int = 3) -> float:
    checksum = state_checksum(state)
    times = []
    for version in range(1, repeats + 1):
        start = time.perf_counter()
        update = AdapterUpdate(version, ray.put(pack_state(state)), checksum, 0, state_bytes(state))
        ray.get([p.receive.remote(update, verify) for p in probes])
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 50, 200])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--actor-size-mb", type=float, default=10)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=2 * 2**30)
    probes = [SyncProbe.remote() for _ in range(max(args.actors))]
    warm = AdapterUpdate(0, ray.put(pack_state({})), state_checksum({}), 0, 0)
    ray.get([p.receive.remote(warm, True) for p in probes])
    print("| adapter MB | 1 actor, verified (ms) | 1 actor, transfer only (ms) |\n|---|---|---|")
    for mb in args.sizes:
        state = synthetic_state(mb)
        print(f"| {state_bytes(state) / 2**20:.0f} | {broadcast_ms(probes[:1], state, True):.1f} | "
              f"{broadcast_ms(probes[:1], state, False):.1f} |")
    state = synthetic_state(args.actor_size_mb)
    print(f"\n| actors ({args.actor_size_mb:g} MB) | verified (ms) | transfer only (ms) |\n|---|---|---|")
    rows = {}
    for n in args.actors:
        rows[n] = (broadcast_ms(probes[:n], state, True), broadcast_ms(probes[:n], state, False))
        print(f"| {n} | {rows[n][0]:.1f} | {rows[n][1]:.1f} |")
    lo, hi = min(args.actors), max(args.actors)
    print(f"\n{hi} actors / {lo} actor: {rows[hi][0] / rows[lo][0]:.2f}x verified, "
          f"{rows[hi][1] / rows[lo][1]:.2f}x transfer only")
    ray.shutdown()


if __name__ == "__main__":
    main()
