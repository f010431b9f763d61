"""The OpenAI-compatible endpoint judge against a fake local server (offline): logprobs when returned, text otherwise,
re-prompt on a verdict miss, retries on 5xx, the key only in the Authorization header; and alpaca_eval's own
``evaluate`` pipeline pointed at the same server through treg's annotator config."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from treg.evaluation.judges import EndpointJudge, JudgePrompt, JudgeStats, run_judge

KEY = "sk-test-secret-123"


class FakeServer:
    """A scripted /v1/chat/completions. ``mode``: "logprobs", "text", "refuse-logprobs"; ``verdicts``: texts returned
    in turn for long generations; ``fail_first``: answer 503 to the first N requests."""

    def __init__(self, mode="logprobs", verdicts=(), fail_first=0, p_m=0.8, no_logprobs_for=None):
        self.mode, self.verdicts, self.fail_first, self.p_m = mode, list(verdicts), fail_first, p_m
        self.no_logprobs_for = no_logprobs_for  # requests containing this text get an unparsable "x" and no logprobs
        self.requests, self.headers = [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                status, payload = server.respond(body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def respond(self, body):
        import math

        if len(self.requests) <= self.fail_first:
            return 503, {"error": {"message": "overloaded"}}
        if body.get("logprobs") and self.mode == "refuse-logprobs":
            return 400, {"error": {"message": "logprobs are not supported"}}
        if body.get("max_tokens") == 1:
            text = "m" if self.p_m >= 0.5 else "M"
            choice = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": text}}
            if body.get("logprobs") and self.mode == "logprobs":
                top = [
                    {"token": "m", "logprob": math.log(self.p_m), "bytes": [109]},
                    {"token": "M", "logprob": math.log(1 - self.p_m), "bytes": [77]},
                ]
                choice["logprobs"] = {
                    "content": [{"token": text, "logprob": top[0]["logprob"], "bytes": [109], "top_logprobs": top}]
                }
        else:
            text = self.verdicts.pop(0) if self.verdicts else "My final verdict is: [[A=B]]"
            choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        if self.no_logprobs_for and self.no_logprobs_for in json.dumps(body["messages"]):
            choice = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "x"}}
        return 200, {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server_factory():
    servers = []

    def make(**kw):
        servers.append(FakeServer(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _choice():
    return JudgePrompt(user_template="m: {X}\nM: {Y}", fields=(("X", "a"), ("Y", "b")), system="judge")


def _verdict():
    return JudgePrompt(user_template="A: {X}\nB: {Y}", fields=(("X", "a"), ("Y", "b")), kind="verdict")


def test_logprobs_are_used_when_returned_and_the_key_stays_in_the_header(server_factory, monkeypatch, caplog):
    monkeypatch.setenv("TREG_TEST_KEY", KEY)
    server = server_factory(mode="logprobs", p_m=0.8)
    judge = EndpointJudge("judge-model", server.url, api_key_env="TREG_TEST_KEY", parallel=2)
    with caplog.at_level(logging.DEBUG):
        v = judge.judge([_choice()])[0]
    assert v.p_first == pytest.approx(0.8) and v.label == "m"
    assert server.headers[0]["authorization"] == f"Bearer {KEY}"
    assert server.requests[0]["logprobs"] is True and server.requests[0]["messages"][0] == {
        "role": "system",
        "content": "judge",
    }
    assert KEY not in caplog.text and KEY not in judge.cache_id


def test_text_is_parsed_when_the_server_gives_no_logprobs(server_factory):
    server = server_factory(mode="text", p_m=0.2)
    v = EndpointJudge("j", server.url, api_key_env=None).judge([_choice()])[0]
    assert v.p_first == 0.0 and v.label == "M" and v.probs is None


def test_a_server_refusing_logprobs_falls_back_to_text(server_factory):
    server = server_factory(mode="refuse-logprobs", p_m=0.9)
    judge = EndpointJudge("j", server.url, api_key_env=None, retries=0)
    assert judge.judge([_choice()])[0].p_first == 1.0
    assert "logprobs" not in server.requests[-1]


def test_verdict_reprompts_once_on_a_miss(server_factory):
    server = server_factory(verdicts=["I think A is good.", "Final: [[B>A]]"])
    v = EndpointJudge("j", server.url, api_key_env=None).judge([_verdict()])[0]
    assert v.label == "B>A" and v.p_first == 0.0 and v.attempts == 2
    assert "I think A is good." in v.text and "[[B>A]]" in v.text
    second = server.requests[1]["messages"]
    assert second[-2] == {"role": "assistant", "content": "I think A is good."}
    assert second[-1]["content"] == "continue your judgment and finish by outputting a final verdict label"


def test_two_misses_are_a_counted_failure(server_factory):
    server = server_factory(verdicts=["no label", "still none"])
    stats = JudgeStats()
    out = run_judge(EndpointJudge("j", server.url, api_key_env=None), [_verdict()], retries=0, stats=stats)
    assert out == [None] and stats.failed_prompts == 1


def test_server_errors_are_retried(server_factory):
    server = server_factory(fail_first=2, verdicts=["[[A>>B]]"])
    judge = EndpointJudge("j", server.url, api_key_env=None, retries=3, backoff=0.01)
    assert judge.judge([_verdict()])[0].label == "A>>B" and len(server.requests) == 3


def test_alpaca_eval_evaluate_with_treg_annotator_config(server_factory, tmp_path, monkeypatch):
    """alpaca_eval's own pipeline (annotator config from eval/alpaca_eval, local reference outputs, no hub)."""
    from treg.evaluation import alpaca_eval as ae

    monkeypatch.setenv("TREG_TEST_KEY", KEY)
    server = server_factory(mode="logprobs", p_m=0.25)  # P(output_1 = "m" better) = 0.25 before any switching
    reference = [{"instruction": f"task {i}", "output": f"reference {i}", "generator": "ref"} for i in range(4)]
    outputs = [{"instruction": f"task {i}", "output": f"mine {i}", "generator": "mine"} for i in range(4)]
    annotations, metrics = ae.evaluate_with_annotator(
        outputs,
        reference,
        list(range(4)),
        config_dir="treg_weighted_endpoint",  # shipped with treg, found through the package
        judge_model="judge-model",
        base_url=server.url,
        out_dir=str(tmp_path),
        api_key_env="TREG_TEST_KEY",
    )
    assert len(server.requests) == 4 and server.requests[0]["model"] == "judge-model"
    assert server.headers[0]["authorization"] == f"Bearer {KEY}"
    # alpaca_eval randomly switches the two outputs per instruction and maps the preference back: 1.25 or 1.75
    assert sorted({round(a["preference"], 6) for a in annotations}) <= [1.25, 1.75]
    assert metrics["n_failed"] == 0 and 25.0 <= metrics["win_rate"] <= 75.0
    assert KEY not in (tmp_path / "annotator" / "treg_weighted_endpoint" / "configs.yaml").read_text()


def test_annotator_path_keeps_instruction_indices_of_a_subset_with_a_failed_judgment(server_factory, tmp_path):
    """--annotator-config on a subset (rows 5, 2, 0, 3 of the reference) where the judgment of row 2 fails: every
    annotation carries its own row's index (not its position after the failure is dropped); the failure is counted."""
    from treg.evaluation import alpaca_eval as ae

    server = server_factory(mode="logprobs", p_m=0.25, no_logprobs_for="task 2")
    reference = [{"instruction": f"task {i}", "output": f"reference {i}", "generator": "ref"} for i in range(6)]
    indices = [5, 2, 0, 3]
    outputs = [{"instruction": f"task {i}", "output": f"mine {i}", "generator": "mine"} for i in indices]
    annotations, metrics = ae.evaluate_with_annotator(
        outputs,
        reference,
        indices,
        config_dir="treg_weighted_endpoint",
        judge_model="judge-model",
        base_url=server.url,
        out_dir=str(tmp_path),
        api_key_env="TREG_NO_SUCH_KEY",
    )
    assert {a["instruction"]: a["index"] for a in annotations} == {f"task {i}": i for i in indices}
    failed = [a["instruction"] for a in annotations if a["preference"] != a["preference"]]
    assert failed == ["task 2"] and metrics["n_failed"] == 1 and metrics["n_total"] == 3
