"""`bench.py serve` against a small local server speaking the OpenAI chat-completions streaming protocol
and each engine's way of reporting acceptance (vLLM's Prometheus counters, SGLang's server info)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from launch.benchmarks import serve

WORDS_PER_REPLY = 6


class _Engine:
    """State of a fake engine: every completion adds drafts and accepted tokens to the counters."""

    def __init__(self, flavour):
        self.flavour, self.requests, self.drafts, self.accepted = flavour, [], 0, 0
        self.per_pos = [0, 0, 0]
        self.lock = threading.Lock()


def _handler(engine):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, body, ctype="application/json"):
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                self._send(json.dumps({"object": "list", "data": [{"id": "tiny", "object": "model"}]}))
            elif self.path == "/metrics" and engine.flavour == "vllm":
                lines = ["# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.",
                         "# TYPE vllm:spec_decode_num_drafts_total counter",
                         f'vllm:spec_decode_num_drafts_total{{engine="0",model_name="tiny"}} {float(engine.drafts)}',
                         f'vllm:spec_decode_num_accepted_tokens_total{{engine="0",model_name="tiny"}} '
                         f"{float(engine.accepted)}"]
                lines += [f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",model_name="tiny",'
                          f'position="{j}"}} {float(v)}' for j, v in enumerate(engine.per_pos)]
                self._send("\n".join(lines) + "\n", "text/plain")
            elif self.path == "/get_server_info" and engine.flavour == "sglang":
                self._send(json.dumps({"internal_states": [{"avg_spec_accept_length": 2.75,
                                                            "last_gen_throughput": 100.0}]}))
            else:
                self.send_error(404)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == "/v1/chat/completions" and body["stream"] is True
            with engine.lock:
                engine.requests.append(body)
                engine.drafts += 4  # 4 verify steps per reply, accepting 2, 1, 3, 0 of 3 drafts
                engine.accepted += 6
                for j, v in enumerate([3, 2, 1]):
                    engine.per_pos[j] += v
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            turn = sum(m["role"] == "user" for m in body["messages"])
            for i in range(WORDS_PER_REPLY):
                chunk = {"choices": [{"index": 0, "delta": {"content": f"w{turn}.{i} "}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": WORDS_PER_REPLY + 1}}
            self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    return Handler


@pytest.fixture
def server():
    started = []

    def start(flavour):
        engine = _Engine(flavour)
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(engine))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        started.append(httpd)
        return f"http://127.0.0.1:{httpd.server_port}", engine

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def _prompts(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 1, "category": "writing", "turns": ["First question?", "A follow-up."]},
        {"question_id": 2, "category": "math", "turns": ["Single turn."]},
        {"prompt": "Plain prompt."},
    ]) + "\n")
    return path


def test_serve_bench_vllm_counters_and_multi_turn(tmp_path, server, capsys):
    url, engine = server("vllm")
    base_url, base_engine = server("vllm")
    out = tmp_path / "serve.json"
    args = [ "--url", url, "--baseline-url", base_url, "--prompts", str(_prompts(tmp_path)), "--concurrency", "2",
            "--max-tokens", "32", "--out", str(out)]
    from launch.bench import main

    assert main(["serve", *args]) == 0
    report = json.loads(out.read_text())
    run = report["runs"]["draft"]
    assert run["model"] == "tiny" and run["requests"] == 4 and len(engine.requests) == 4
    assert run["output_tokens"] == 4 * (WORDS_PER_REPLY + 1)  # from the usage chunk, not the chunk count
    # The follow-up turn carries the first reply as history.
    followup = next(r for r in engine.requests if len(r["messages"]) == 3)
    assert [m["role"] for m in followup["messages"]] == ["user", "assistant", "user"]
    assert followup["messages"][1]["content"] == "".join(f"w1.{i} " for i in range(WORDS_PER_REPLY))
    assert all(r["max_tokens"] == 32 and r["model"] == "tiny" for r in engine.requests)
    # 4 requests × (4 drafts, 6 accepted tokens): τ = 1 + 24/16; per position 12/16, 8/16, 4/16.
    acc = run["acceptance"]
    assert acc["engine"] == "vllm" and acc["accept_length"] == pytest.approx(2.5)
    assert acc["accepted_per_position"] == pytest.approx([0.75, 0.5, 0.25])
    assert run["latency_s"]["p50"] <= run["latency_s"]["p99"] and run["ttft_s"]["p50"] <= run["latency_s"]["p99"]
    assert run["output_tokens_per_s"] > 0 and report["speedup"] > 0
    assert {r["id"] for r in run["replies"]} == {"1", "2", f"{tmp_path / 'question.jsonl'}:3"}
    assert "accept len" in capsys.readouterr().out


def test_serve_bench_sglang_server_info(tmp_path, server):
    url, _ = server("sglang")
    prompts = serve.load_prompts(str(_prompts(tmp_path)))
    result = serve.run_server(url, prompts, max_tokens=16)
    assert result.acceptance == {"engine": "sglang", "accept_length": 2.75}


def test_serve_bench_unreachable_server_fails_clearly(tmp_path, capsys):
    from launch.bench import main

    assert main(["serve", "--url", "http://127.0.0.1:9", "--prompts", str(_prompts(tmp_path))]) == 2
    assert "127.0.0.1:9" in capsys.readouterr().out


def test_percentiles_nearest_rank():
    assert serve.percentiles([5, 1, 4, 2, 3]) == {"p50": 3, "p90": 5, "p99": 5, "mean": 3}
    assert serve.percentiles(list(range(1, 101)))["p90"] == 90
