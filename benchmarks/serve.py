"""Serving under load: `lmforge serve` vs `transformers serve` (with and without its continuous batching) on the
same exported weights, and vs lmforge's own sequential generation (`lmforge.serve.load_test` measures).

Each server runs alone as a subprocess on loopback; at each concurrency level that many clients (aiohttp readers of
the server-sent events, in this process) each send `--requests` streamed greedy completions of up to `--max-tokens`
tokens, one after another, every prompt distinct. Printed per server and level: output tokens/s, requests/s, p50/p95
time to first token and latency; then lmforge serve's throughput over the best transformers server and over
sequential generation. Targets (issue 13): >= 2x transformers serve's best throughput at 8 and 32 clients, and a
lower p50 time to first token.

    python benchmarks/serve.py --run runs/demo/pretrain --prompts runs/demo/data/world/train.jsonl
    python benchmarks/serve.py --run runs/sft                       # 1, 8 and 32 clients, every server
    python benchmarks/serve.py --run runs/sft --clients 1 8 --requests 2 --max-tokens 32 --json serve.json
    python benchmarks/serve.py --run runs/sft --servers lmforge transformers-cb
    python benchmarks/serve.py --run runs/sft --threads 1    # every server on one intra-op thread
    python benchmarks/serve.py --run runs/sft --clients 8 32 --rounds 3   # three rounds, the median ratio
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from lmforge.serve.load_test import SERVERS, compare, document_openings  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", type=Path, required=True,
                   help="lmforge run or checkpoint dir (a decoder with a tokenizer), e.g. --run runs/sft")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels, e.g. 1 8 32")
    p.add_argument("--requests", type=int, default=16,
                   help="requests each client sends one after another, e.g. 4 (fewer: each level lasts a second or "
                        "less, and one stall of the machine moves its figure)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each completion, e.g. 64")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS),
                   help="servers to measure, e.g. lmforge transformers-cb (transformers serve --continuous-batching)")
    p.add_argument("--prompts", type=Path, nargs="+", default=None,
                   help="take each prompt from the opening words of a document of these files (txt/jsonl/parquet, as "
                        "`data prepare` reads them), e.g. --prompts runs/demo/data/world/train.jsonl; default: short "
                        "word lists, which a trained model may answer with an end of text at once")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of every server (OMP_NUM_THREADS) and of the sequential run, e.g. 1 where "
                        "the clients share the server's cores (default: torch's, one per core)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure everything this many times, the servers' order reversed every other round, and print "
                        "each round's ratios and their median, e.g. 3")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here, e.g. --json serve.json")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def print_round(results: dict) -> None:
    header = f"{'server':<20}{'clients':>8}{'tok/s':>10}{'req/s':>8}{'TTFT p50':>10}{'p95':>8}{'lat p50':>9}{'p95':>8}"
    print(header + "\n" + "-" * len(header))
    for name, levels in results["servers"].items():
        for clients, m in levels.items():
            print(f"{name:<20}{clients:>8}{m['tokens_per_s']:>10.1f}{m['requests_per_s']:>8.2f}{m['ttft_p50_s']:>10.3f}"
                  f"{m['ttft_p95_s']:>8.3f}{m['latency_p50_s']:>9.3f}{m['latency_p95_s']:>8.3f}")
    seq = results["sequential"]
    print(f"{'lmforge sequential':<20}{1:>8}{seq['tokens_per_s']:>10.1f}{seq['requests_per_s']:>8.2f}")
    for clients, ratio in results["ratios"].items():
        print(f"{clients} clients: lmforge serve throughput "
              + ", ".join(f"{v:.2f}x {k.replace('_', ' ')}" for k, v in ratio.items()))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(common.machine_line())
    if args.threads:
        print(f"every server and the sequential run on {args.threads} intra-op thread(s) (OMP_NUM_THREADS)")
    texts = None
    if args.prompts:
        texts = document_openings(args.prompts, max(args.clients) * args.requests)
    rounds = []
    for i in range(args.rounds):
        servers = args.servers if i % 2 == 0 else args.servers[::-1]
        rounds.append(compare(args.run, servers, args.clients, args.requests, args.max_tokens, texts, args.threads))
        if args.rounds > 1:
            print(f"round {i + 1} of {args.rounds} (servers in the order {', '.join(servers)})")
        print_round(rounds[-1])
    if args.rounds > 1:
        for clients in map(str, args.clients):
            for key in rounds[0]["ratios"][clients]:
                each = [r["ratios"][clients][key] for r in rounds]
                print(f"{clients} clients, {key.replace('_', ' ')}: median {statistics.median(each):.2f}x over "
                      f"{args.rounds} rounds ({', '.join(f'{v:.2f}' for v in each)})")
    results = rounds[0] if args.rounds == 1 else {"rounds": rounds}
    if args.json:
        args.json.write_text(json.dumps({"machine": common.machine_line(), **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
