"""The vLLM server wrapper: command line, cause diagnosis, health wait, crash detection and
process-group stop against a fake server script; two real vLLM CPU starts marked `vllm`."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from pricing.serving.server import (
    ServerSpec,
    ServerStartError,
    VllmServer,
    attach,
    build_command,
    diagnose,
    free_port,
    group_alive,
    server_env,
    sigterm_as_exit,
)


FAKE_SERVER = textwrap.dedent(
    '''
    """A stand-in for the vLLM OpenAI server: same arguments, behaviour picked by --fake-mode."""
    import argparse, json, os, signal, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    p = argparse.ArgumentParser()
    p.add_argument("--model"); p.add_argument("--host"); p.add_argument("--port", type=int)
    p.add_argument("--served-model-name"); p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--fake-mode", default="ok"); p.add_argument("--fake-delay", type=float, default=0.3)
    p.add_argument("--fake-pidfile")
    args, _ = p.parse_known_args()
    print("fake vLLM starting", flush=True)
    time.sleep(args.fake_delay)
    if args.fake_mode == "crash":
        print("Traceback (most recent call last):", flush=True)
        print("ValueError: To serve at least one request with the model's max seq len (4096), (2.0 GiB KV "
              "cache is needed, which is larger than the available KV cache memory (1.0 GiB).", flush=True)
        sys.exit(1)
    if args.fake_mode == "stubborn":  # a child that ignores SIGTERM, like a wedged worker
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        with open(args.fake_pidfile, "w") as f:
            f.write(str(child.pid))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            key = os.environ.get("VLLM_API_KEY")
            if key and self.path.startswith("/v1/") and self.headers.get("Authorization") != f"Bearer {key}":
                self.reply(401, {"error": "Unauthorized"})
            elif self.path == "/health":
                self.reply(503 if args.fake_mode == "unhealthy" else 200, None)
            elif self.path == "/v1/models":
                name = args.served_model_name or args.model
                self.reply(200, {"object": "list", "data": [{"id": name, "max_model_len": args.max_model_len}]})
            elif self.path == "/version":
                self.reply(200, {"version": "0.0.0-fake"})
            else:
                self.reply(404, {"error": "not found"})

        def reply(self, status, body):
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
    '''
)


@pytest.fixture
def fake_launcher(tmp_path: Path) -> tuple[str, ...]:
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVER)
    return (sys.executable, str(script))


def fake_server(launcher: tuple[str, ...], tmp_path: Path, *fake_args: str, api_key: str | None = None,
                **kwargs: float) -> VllmServer:
    spec = ServerSpec(model="org/fake-model", served_model_name="fake", max_model_len=2048, extra_args=fake_args,
                      api_key=api_key)
    return VllmServer(spec, log_path=tmp_path / "server.log", launcher=launcher, poll_interval_s=0.05,
                      startup_timeout_s=kwargs.get("startup_timeout_s", 20.0),
                      stop_grace_s=kwargs.get("stop_grace_s", 5.0))


# --- command line -------------------------------------------------------------------------------


def test_build_command_passes_every_setting() -> None:
    spec = ServerSpec(model="/m/llama", tensor_parallel_size=4, max_model_len=8192, load_format="dummy",
                      served_model_name="llama", api_key="k", extra_args=("--enforce-eager", "--dtype", "bfloat16"))
    cmd = build_command(spec, 8123, launcher=("vllm-x",))
    assert cmd == ["vllm-x", "--model", "/m/llama", "--host", "127.0.0.1", "--port", "8123",
                   "--tensor-parallel-size", "4", "--max-model-len", "8192", "--load-format", "dummy",
                   "--served-model-name", "llama", "--enforce-eager", "--dtype", "bfloat16"]
    assert "k" not in cmd  # the API key goes in the environment, out of `ps` and the log


def test_build_command_leaves_out_defaults() -> None:
    cmd = build_command(ServerSpec(model="org/model"), 9000, launcher=("vllm-x",))
    assert cmd == ["vllm-x", "--model", "org/model", "--host", "127.0.0.1", "--port", "9000"]


def test_default_launcher_is_the_openai_server_module_of_this_python() -> None:
    cmd = build_command(ServerSpec(model="m"), 1)
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def test_server_env_is_offline_for_local_folders_and_adds_spec_env(tmp_path: Path) -> None:
    env = server_env(ServerSpec(model=str(tmp_path), env={"VLLM_CPU_KVCACHE_SPACE": "1"}), base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    assert server_env(ServerSpec(model="org/model", api_key="secret"), base={}) == {"VLLM_API_KEY": "secret"}


# --- cause diagnosis on canned log snippets -----------------------------------------------------

LOG_SNIPPETS = [
    (["api_server.py: error: unrecognized arguments: --no-such-flag --other"],
     "unrecognized vLLM argument(s): --no-such-flag --other"),
    (["api_server.py: error: argument --max-model-len: invalid human_readable_int_or_auto value: 'abc'"],
     "bad vLLM argument: argument --max-model-len: invalid"),
    (["(APIServer pid=1) ERROR [launcher.py:90] [Errno 98] error while attempting to bind on address "
      "('127.0.0.1', 8000): address already in use"], "port already in use"),
    (["pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
      "  Value error, User-specified max_model_len (8192) is greater than the derived max_model_len "
      "(max_position_embeddings=4096.0 or model_max_length=None in model's config.json)."],
     "max-model-len 8192 is larger than the model's max_position_embeddings"),
    (["(EngineCore pid=2) ValueError: To serve at least one request with the model's max seq len (65536), "
      "(2.0 GiB KV cache is needed, which is larger than the available KV cache memory (1.0 GiB). Based on "
      "the available memory, the estimated maximum model length is 32640. Try increasing ...",
      "RuntimeError: Engine core initialization failed. See root cause above."],
     "not enough KV-cache memory for max-model-len 65536"),
    (["ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization`"],
     "the model does not fit"),
    (["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB. GPU 0 has a total capacity "
      "of 79.19 GiB of which 1.20 GiB is free."], "out of memory while loading the model"),
    (["huggingface_hub.errors.HFValidationError: Repo id must be in the form 'repo_name' or "
      "'namespace/repo_name': '/data/no/such/model'. Use `repo_type` argument if needed."],
     "unknown model path '/data/no/such/model'"),
    (["ValueError: Invalid repository ID or local directory specified: 'org/nope'."],
     "unknown model path or Hugging Face id 'org/nope'"),
    (["INFO starting", "ValueError: something odd happened",
      "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"],
     "exited with code 1: ValueError: something odd happened"),
]


@pytest.mark.parametrize(("lines", "expected"), LOG_SNIPPETS)
def test_diagnose_names_the_likely_cause(lines: list[str], expected: str) -> None:
    cause = diagnose(["INFO 11-22 00:20:11 [api_utils.py:347] non-default args: {}", *lines], returncode=1)
    assert expected in cause
    assert "\n" not in cause


def test_diagnose_passes_on_vllms_estimate_of_what_fits() -> None:
    assert diagnose([LOG_SNIPPETS[4][0][0]], returncode=1).endswith("(vLLM estimates 32640 fits)")


def test_diagnose_blames_the_oom_killer_for_sigkill() -> None:
    assert "out-of-memory killer" in diagnose(["INFO loading weights"], returncode=-signal.SIGKILL)


def test_diagnose_without_any_clue_gives_the_exit_code() -> None:
    warning = ("(APIServer pid=1) WARNING 11-22 00:26:14 [system_utils.py:255] Found ulimit of 20000 ... "
               "This can cause fd limit errors like `OSError: [Errno 24] Too many open files`.")
    assert diagnose(["INFO fine", warning, "INFO still fine"], returncode=3) == "exited with code 3"


# --- attach -------------------------------------------------------------------------------------


def test_attach_to_unreachable_url_fails_fast_with_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        attach(url, timeout_s=2.0)
    assert time.monotonic() - started < 5.0
    message = str(err.value)
    assert message.startswith(f"cannot reach {url}:") and message.endswith("is the server running?")
    assert "\n" not in message


def test_attach_reads_model_and_version_and_leaves_the_server_running(fake_launcher, tmp_path: Path) -> None:
    with fake_server(fake_launcher, tmp_path) as server:
        with attach(server.base_url + "/v1/") as attached:
            assert attached.base_url == server.base_url
            assert (attached.served_model_name, attached.max_model_len) == ("fake", 2048)
            assert attached.vllm_version == "0.0.0-fake"
        assert server.process is not None and server.process.poll() is None


def test_api_key_reaches_the_server_and_attach_checks_it(fake_launcher, tmp_path: Path) -> None:
    with fake_server(fake_launcher, tmp_path, api_key="sekrit") as server:
        assert server.served_model_name == "fake" and server.max_model_len == 2048  # read with the key
        with pytest.raises(ServerStartError, match=r"refused /v1/models \(HTTP 401\); check --api-key"):
            attach(server.base_url)
        assert attach(server.base_url, api_key="sekrit").served_model_name == "fake"
    assert "sekrit" not in (tmp_path / "server.log").read_text()


# --- lifecycle against the fake server ----------------------------------------------------------


def test_start_waits_for_health_and_describes_the_server(fake_launcher, tmp_path: Path) -> None:
    with fake_server(fake_launcher, tmp_path, "--fake-delay", "1.0") as server:
        assert server.started_s is not None and server.started_s >= 1.0
        assert server.port > 0 and server.base_url == f"http://127.0.0.1:{server.port}"
        assert (server.served_model_name, server.max_model_len, server.vllm_version) == ("fake", 2048, "0.0.0-fake")
        pgid = server.process.pid
        assert group_alive(pgid)
    assert not group_alive(pgid)
    assert "fake vLLM starting" in (tmp_path / "server.log").read_text()


def test_crash_during_start_raises_one_line_with_cause_and_log(fake_launcher, tmp_path: Path) -> None:
    server = fake_server(fake_launcher, tmp_path, "--fake-mode", "crash")
    started = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        with server:
            pytest.fail("the body must not run")
    assert time.monotonic() - started < 10.0
    message = str(err.value)
    assert "not enough KV-cache memory for max-model-len 4096" in message
    assert str(tmp_path / "server.log") in message and "\n" not in message
    assert any("ValueError" in line for line in err.value.log_tail)
    assert len(err.value.log_tail) <= 20


def test_startup_timeout_stops_the_server(fake_launcher, tmp_path: Path) -> None:
    server = fake_server(fake_launcher, tmp_path, "--fake-mode", "unhealthy", startup_timeout_s=1.5)
    with pytest.raises(ServerStartError, match=r"not healthy after 2 s"):
        server.start()
    assert server.process.poll() is not None and not group_alive(server.process.pid)


def test_stop_kills_a_child_that_ignores_sigterm(fake_launcher, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    with fake_server(fake_launcher, tmp_path, "--fake-mode", "stubborn", "--fake-pidfile", str(pidfile),
                     stop_grace_s=1.0) as server:
        child = int(pidfile.read_text())
        pgid = server.process.pid
        assert os.getpgid(child) == pgid
        stopping = time.monotonic()
    took = time.monotonic() - stopping
    assert 1.0 <= took < 8.0  # SIGTERM, a grace period, then SIGKILL
    assert not group_alive(pgid)


def test_error_in_the_body_still_stops_the_server(fake_launcher, tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with fake_server(fake_launcher, tmp_path) as server:
            pgid = server.process.pid
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
    assert not group_alive(pgid)


@pytest.mark.skipif(signal.getsignal(signal.SIGTERM) != signal.SIG_DFL, reason="SIGTERM is handled by the runner")
def test_sigterm_to_us_stops_the_server(fake_launcher, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        with sigterm_as_exit(), fake_server(fake_launcher, tmp_path) as server:
            pgid = server.process.pid
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises SystemExit before this ends
    assert not group_alive(pgid)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_port_in_use_is_reported_before_launching(fake_launcher, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        spec = ServerSpec(model="m", port=port)
        with pytest.raises(ServerStartError, match=f"port {port} is already in use"):
            VllmServer(spec, launcher=fake_launcher, log_path=tmp_path / "s.log").start()
    assert not (tmp_path / "s.log").exists()


def test_missing_model_folder_is_reported_before_launching(fake_launcher, tmp_path: Path) -> None:
    spec = ServerSpec(model=str(tmp_path / "no" / "model"))
    with pytest.raises(ServerStartError, match="unknown model path .*no such folder"):
        VllmServer(spec, launcher=fake_launcher, log_path=tmp_path / "s.log").start()


# --- real vLLM on CPU (the vllm_lock fixture is conftest's) ------------------------------------


def _tiny_spec(tmp_path: Path, *extra: str) -> ServerSpec:
    from pricing.serving.shapes import resolve_model

    model = resolve_model("tiny-llama", tmp_path / "models")
    return ServerSpec(model=model.model, load_format=model.load_format, max_model_len=1024,
                      served_model_name="tiny", env={"VLLM_CPU_KVCACHE_SPACE": "1"}, extra_args=extra)


@pytest.mark.vllm
def test_real_vllm_serves_the_tiny_shape_and_stops_cleanly(vllm_lock: None, tmp_path: Path) -> None:
    with VllmServer(_tiny_spec(tmp_path), log_path=tmp_path / "vllm.log", startup_timeout_s=600) as server:
        print(f"tiny vLLM healthy after {server.started_s:.1f} s")
        pgid = server.process.pid
        assert urllib.request.urlopen(f"{server.base_url}/health", timeout=5).status == 200
        models = json.load(urllib.request.urlopen(f"{server.base_url}/v1/models", timeout=5))
        assert models["data"][0]["id"] == "tiny" == server.served_model_name
        assert server.max_model_len == 1024 and server.vllm_version
        events = _stream_completion(server.base_url, "tiny", " ab cd ef", max_tokens=8)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert len(chunks) >= 2
        assert chunks[-1]["usage"]["completion_tokens"] == 8
        assert chunks[-1]["usage"]["prompt_tokens"] == 4  # BOS + three word tokens
        chat = _post(server.base_url, "/v1/chat/completions", {
            "model": "tiny", "messages": [{"role": "user", "content": " ab cd"}], "max_tokens": 4})
        assert chat["usage"]["prompt_tokens"] == 3  # the shape's chat template: BOS + the content
        _text_prompts_through_detokenize(server.base_url)
        _live_metrics_scrape(server.base_url)
    assert not group_alive(pgid)


def _live_metrics_scrape(url: str) -> None:
    """The probe's /metrics scrape against vLLM: three streams of 16 tokens, alone on the server
    between the scrapes, are what the deltas hold."""
    import asyncio

    import aiohttp

    from pricing.measure.gpu_energy import open_gpu_meter
    from pricing.measure.telemetry import ProbeTelemetry

    async def stream(session: aiohttp.ClientSession) -> int:
        body = {"model": "tiny", "prompt": " ab cd ef gh ij kl mn op", "max_tokens": 16, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        usage = None
        async with session.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: {") and (chunk := json.loads(line[len(b"data: "):])).get("usage"):
                    usage = chunk["usage"]
        return usage["completion_tokens"]

    async def scrape():
        async with aiohttp.ClientSession() as session:
            telemetry = ProbeTelemetry(session, url, meter=open_gpu_meter(), poll_interval_s=0.5)
            await telemetry.start()
            tokens = await asyncio.gather(*(stream(session) for _ in range(3)))
            return tokens, await telemetry.stop()

    tokens, result = asyncio.run(scrape())
    assert tokens == [16, 16, 16]
    assert result.energy is None  # no GPU here: not measured, never 0
    m = result.server_metrics
    assert m is not None
    assert m["server_ttft_count"] == 3 and m["generation_tokens"] == 48 and m["requests_finished"] == 3
    assert 0 < m["server_itl_count"] <= 3 * 15
    assert 0 < m["server_ttft_mean_s"] < 60 and m["server_ttft_p90_s"] > 0
    assert m["prompt_tokens"] >= 3 * 8
    assert m["kv_cache_usage_max_frac"] >= 0 and m["requests_running_max"] >= 0 and m["scrapes"] >= 2


def _text_prompts_through_detokenize(url: str) -> None:
    """Our client's text prompts (random ids through vLLM's /detokenize), as `--prompt-format text`."""
    import asyncio
    import itertools

    from pricing.load.client import ClientConfig, ProbePlan
    from pricing.measure.probe import run_probe
    from pricing.schema import LoadSpec

    cfg = ClientConfig(base_url=url, model="tiny", prompt_format="text", vocab_size=4096)
    result = asyncio.run(run_probe(cfg, LoadSpec(mode="closed", concurrency=2), itertools.repeat((40, 4)),
                                   ProbePlan(min_window_s=0.5, min_requests=3)))
    assert result.stats.failed == 0 and result.stats.completed >= 3, result.aborted
    done = [r for r in result.records if r.ok]
    # Re-tokenized text need not keep the count, but it is a prompt of about that length.
    assert all(10 <= r.prompt_tokens <= 200 for r in done), [r.prompt_tokens for r in done]
    # Every reply is as long as asked (ignore_eos). All ask for 4 tokens but slot 0's first,
    # which asks for 1/2 of them so the two slots do not run in lockstep.
    lengths = [(r.completion_tokens, r.target_output_tokens) for r in done]
    assert all(got == asked for got, asked in lengths), lengths
    assert sorted(r.target_output_tokens for r in result.records) == [2] + [4] * (len(result.records) - 1)


@pytest.mark.vllm
def test_real_vllm_names_a_bad_argument(vllm_lock: None, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        with VllmServer(_tiny_spec(tmp_path, "--no-such-flag"), log_path=tmp_path / "vllm.log"):
            pytest.fail("the body must not run")
    assert "--no-such-flag" in str(err.value) and "unrecognized" in str(err.value)
    assert time.monotonic() - started < 120


def _post(base_url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base_url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def _stream_completion(base_url: str, model: str, prompt: str, max_tokens: int) -> list[str]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(f"{base_url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return [line.decode().removeprefix("data: ").strip() for line in response if line.startswith(b"data: ")]


def test_exit_cause_of_a_server_that_was_serving() -> None:
    from pricing.serving.server import exit_cause

    # Words of a start-up failure in a healthy log do not hide the signal that ended it.
    log = ["INFO ... out of memory checks passed", "ValueError: bad request from a client"]
    assert exit_cause(log, -signal.SIGKILL).startswith("was killed (SIGKILL")
    assert exit_cause(log, -signal.SIGTERM) == "was stopped by SIGTERM"
    assert exit_cause(log, 1) == "exited with code 1: ValueError: bad request from a client"
    assert exit_cause([], 0) == "exited with code 0"
