"""Demo stage: serving. The pretrained decoder behind `lmforge serve` (continuous batching) and, in the full demo,
behind `transformers serve` with and without its continuous batching, under concurrent clients on loopback
(`lmforge.serve.load_test`, as `benchmarks/serve.py` runs it, with a shorter load)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.demo.verdicts import serving_note
from lmforge.eval.report import Section, markdown_table
from lmforge.serve.load_test import compare, document_openings

if TYPE_CHECKING:
    from lmforge.demo import DemoData, DemoPlan


def run(plan: DemoPlan, data: DemoData, pretrained: Path) -> list[Section]:
    openings = document_openings([data.files["train"]], max(plan.serve_clients) * plan.serve_requests)
    results = compare(pretrained, list(plan.serve_servers), list(plan.serve_clients), plan.serve_requests,
                      plan.serve_tokens, openings)
    rows = [(name, clients, f"{m['tokens_per_s']:,.0f}", f"{m['requests_per_s']:.2f}",
             f"{m['ttft_p50_s'] * 1000:,.0f}", f"{m['ttft_p95_s'] * 1000:,.0f}", f"{m['latency_p50_s'] * 1000:,.0f}",
             f"{m['latency_p95_s'] * 1000:,.0f}")
            for name, levels in results["servers"].items() for clients, m in levels.items()]
    seq = results["sequential"]
    rows.append(("lmforge, sequential `generate`", 1, f"{seq['tokens_per_s']:,.0f}", f"{seq['requests_per_s']:.2f}",
                 "", "", "", ""))
    table = markdown_table(["server", "clients", "output tok/s", "req/s", "TTFT p50 ms", "TTFT p95 ms",
                            "latency p50 ms", "latency p95 ms"], rows)
    return [Section("Serving", "\n".join([
        f"The pretrained decoder served over HTTP on loopback: each client sends {plan.serve_requests} streamed "
        f"greedy completions of up to {plan.serve_tokens} tokens one after another (aiohttp readers of the event "
        "stream), "
        "each prompt the first words of a different training document; "
        "`transformers` is `transformers serve` on the same weights exported, `transformers-cb` the same with "
        "`--continuous-batching`. Output tokens are counted with the model's tokenizer. `benchmarks/serve.py` runs "
        "the longer comparison.",
        "",
        table,
        "",
        serving_note(results["ratios"]),
    ]))]
