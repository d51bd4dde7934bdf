"""Serving benchmark client: replay prompts against a running SGLang or vLLM OpenAI-compatible server.

    python launch/bench.py serve --url http://localhost:30000 --prompts question.jsonl \
        [--baseline-url http://localhost:30001] [--concurrency 8] [--max-tokens 256] [--out serve.json]

Serve the target with the draft at --url (and, for the speedup, the same target without it at
--baseline-url). Each prompt is a conversation (MT-bench `turns` are sent one after the other, the
server's replies kept as history); conversations run `--concurrency` at a time. Reported per server:
output tokens/s, request latency and time-to-first-token percentiles, and the acceptance length the
engine itself reports:

- vLLM: the Prometheus counters at /metrics, read before and after the run:
  τ = 1 + Δ vllm:spec_decode_num_accepted_tokens / Δ vllm:spec_decode_num_drafts, and per position
  Δ vllm:spec_decode_num_accepted_tokens_per_pos / Δ drafts (the formula of vLLM's
  examples/offline_inference/spec_decode.py);
- SGLang: /get_server_info → internal_states[0].avg_spec_accept_length after the run (the server's own
  running average).

Real figures come from a GPU host running the engines; the tests run this client against a small local
server that speaks the same protocol. Only the standard library is used.
"""
from __future__ import annotations

import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eagle_online.evaluate import EvalPrompt, load_prompts


class ServeError(RuntimeError):
    """The server could not be used (unreachable, an HTTP error, a reply that is not the protocol)."""


def _request(url: str, payload: dict | None = None, timeout: float = 600.0):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise ServeError(f"{url}: HTTP {e.code}: {e.read()[:500].decode(errors='replace')}") from None
    except urllib.error.URLError as e:
        raise ServeError(f"{url}: {e.reason}") from None


def _get_json(url: str):
    with _request(url, timeout=30) as r:
        return json.loads(r.read())


# ------------------------------------------------------------------------- engine acceptance

_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition → {name{labels}: value}, summed over labels other than `position`."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line.strip())
        if not m or line.startswith("#"):
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        name = name.removesuffix("_total")
        pos = re.search(r'position="(\d+)"', labels)
        key = f"{name}[{pos.group(1)}]" if pos else name
        out[key] = out.get(key, 0.0) + value
    return out


def _vllm_counters(base: str) -> dict[str, float] | None:
    try:
        with _request(f"{base}/metrics", timeout=30) as r:
            metrics = parse_prometheus(r.read().decode())
    except ServeError:
        return None
    return {k: v for k, v in metrics.items() if k.startswith("vllm:spec_decode_")} or None


def _sglang_accept_length(base: str) -> float | None:
    for path in ("/get_server_info", "/server_info"):
        try:
            info = _get_json(base + path)
        except (ServeError, ValueError):
            continue
        states = info.get("internal_states") or [{}]
        value = states[0].get("avg_spec_accept_length") if isinstance(states[0], dict) else None
        if value is not None:
            return float(value)
    return None


def engine_acceptance(base: str, before: dict | None, after: dict | None) -> dict:
    """The engine-reported acceptance length of the run: vLLM counters' deltas, else SGLang's average."""
    if before is not None and after is not None:
        drafts = after.get("vllm:spec_decode_num_drafts", 0) - before.get("vllm:spec_decode_num_drafts", 0)
        accepted = (after.get("vllm:spec_decode_num_accepted_tokens", 0)
                    - before.get("vllm:spec_decode_num_accepted_tokens", 0))
        if drafts > 0:
            per_pos = []
            j = 0
            while f"vllm:spec_decode_num_accepted_tokens_per_pos[{j}]" in after:
                key = f"vllm:spec_decode_num_accepted_tokens_per_pos[{j}]"
                per_pos.append((after[key] - before.get(key, 0)) / drafts)
                j += 1
            return {"engine": "vllm", "accept_length": 1 + accepted / drafts, "drafts": drafts,
                    "accepted_tokens": accepted, "accepted_per_position": per_pos}
    value = _sglang_accept_length(base)
    if value is not None:
        return {"engine": "sglang", "accept_length": value}
    return {"engine": None, "accept_length": None}


# ------------------------------------------------------------------------------------ the run


@dataclass
class RequestRecord:
    """One chat completion: timings and tokens."""

    latency_s: float
    ttft_s: float
    output_tokens: int


@dataclass
class ServeResult:
    """One server's figures over the prompt set."""

    url: str
    model: str
    requests: int
    output_tokens: int
    wall_s: float
    output_tokens_per_s: float
    latency_s: dict
    ttft_s: dict
    acceptance: dict
    replies: list = field(default_factory=list)


def percentiles(values: list[float], qs=(50, 90, 99)) -> dict:
    """Nearest-rank percentiles and the mean."""
    if not values:
        return {}
    s = sorted(values)
    out = {f"p{q}": s[min(len(s), max(1, math.ceil(q / 100 * len(s)))) - 1] for q in qs}
    out["mean"] = sum(s) / len(s)
    return out


def _chat(base: str, model: str, messages: list[dict], max_tokens: int,
          temperature: float) -> tuple[str, RequestRecord]:
    """One streamed chat completion: (reply text, record). Output tokens come from the final usage chunk
    (stream_options.include_usage, which both engines honour), else the number of content chunks."""
    payload = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
               "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, parts, chunks, usage = None, [], 0, None
    with _request(f"{base}/v1/chat/completions", payload) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                event = json.loads(data)
            except ValueError:
                raise ServeError(f"{base}: a stream event is not JSON: {data[:200]}") from None
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    parts.append(text)
                    chunks += 1
    latency = time.perf_counter() - start
    tokens = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") is not None else chunks
    return "".join(parts), RequestRecord(latency_s=latency, ttft_s=ttft if ttft is not None else latency,
                                         output_tokens=tokens)


def _conversation(base, model, prompt: EvalPrompt, max_tokens, temperature) -> tuple[list[str], list[RequestRecord]]:
    history, replies, records = list(prompt.messages), [], []
    for turn in prompt.turns or [None]:
        if turn is not None:
            history.append({"role": "user", "content": turn})
        reply, record = _chat(base, model, history, max_tokens, temperature)
        history.append({"role": "assistant", "content": reply})
        replies.append(reply)
        records.append(record)
    return replies, records


def run_server(url: str, prompts: list[EvalPrompt], *, model: str | None = None, concurrency: int = 1,
               max_tokens: int = 256, temperature: float = 0.0) -> ServeResult:
    """Replay `prompts` against one server and collect its figures."""
    base = url.rstrip("/")
    if model is None:
        models = _get_json(f"{base}/v1/models").get("data") or []
        if not models:
            raise ServeError(f"{base}/v1/models lists no model: pass --model")
        model = models[0]["id"]
    before = _vllm_counters(base)
    lock, records, replies = threading.Lock(), [], []
    start = time.perf_counter()

    def one(prompt):
        r, recs = _conversation(base, model, prompt, max_tokens, temperature)
        with lock:
            records.extend(recs)
            replies.append({"id": prompt.id, "replies": r})

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for f in [pool.submit(one, p) for p in prompts]:
            f.result()
    wall = time.perf_counter() - start
    tokens = sum(r.output_tokens for r in records)
    return ServeResult(
        url=url, model=model, requests=len(records), output_tokens=tokens, wall_s=wall,
        output_tokens_per_s=tokens / wall if wall > 0 else 0.0,
        latency_s=percentiles([r.latency_s for r in records]), ttft_s=percentiles([r.ttft_s for r in records]),
        acceptance=engine_acceptance(base, before, _vllm_counters(base)),
        replies=sorted(replies, key=lambda x: x["id"]),
    )


def add_arguments(parser) -> None:
    parser.add_argument("--url", required=True, help="server with the draft (OpenAI-compatible base URL)")
    parser.add_argument("--baseline-url", help="the same target served without the draft, for the speedup")
    parser.add_argument("--prompts", required=True, help="JSONL: MT-bench question.jsonl, prompt or messages records")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--model", help="model name to request (default: the first of /v1/models)")
    parser.add_argument("--concurrency", type=int, default=1, help="conversations in flight at once")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--out", type=Path, help="write the figures as JSON")


def main(args) -> int:
    try:
        prompts = load_prompts(args.prompts, limit=args.num_prompts)
        runs = {"draft": run_server(args.url, prompts, model=args.model, concurrency=args.concurrency,
                                    max_tokens=args.max_tokens, temperature=args.temperature)}
        if args.baseline_url:
            runs["baseline"] = run_server(args.baseline_url, prompts, model=args.model, concurrency=args.concurrency,
                                          max_tokens=args.max_tokens, temperature=args.temperature)
    except (ServeError, ValueError) as e:
        print(f"error: {e}")
        return 2
    report = {"prompts": args.prompts, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "temperature": args.temperature, "runs": {k: asdict(v) for k, v in runs.items()}}
    if "baseline" in runs and runs["baseline"].output_tokens_per_s > 0:
        report["speedup"] = runs["draft"].output_tokens_per_s / runs["baseline"].output_tokens_per_s
    print(f"{'run':<9} {'tok/s':>9} {'lat p50':>8} {'lat p99':>8} {'ttft p50':>8} {'accept len':>10}")
    for name, r in runs.items():
        accept = r.acceptance.get("accept_length")
        print(f"{name:<9} {r.output_tokens_per_s:>9.1f} {r.latency_s.get('p50', 0):>8.3f} "
              f"{r.latency_s.get('p99', 0):>8.3f} {r.ttft_s.get('p50', 0):>8.3f} "
              f"{accept if accept is None else round(accept, 3)!s:>10}")
    if "speedup" in report:
        print(f"speedup (output tokens/s): {report['speedup']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0
