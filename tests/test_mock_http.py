"""The mock's bare HTTP layer: requests split across reads, keep-alive, unknown routes."""

import json
import socket

from pricing.testing.mock_server import MockConfig


def _read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    size = int(headers["content-length"])
    while len(rest) < size:
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(rest[:size])


def test_split_request_keep_alive_and_unknown_route(mock_server):
    mock = mock_server(MockConfig())
    body = json.dumps({"tokens": [1, 2, 3]}).encode()
    request = (b"POST /detokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    with socket.create_connection(("127.0.0.1", mock.port)) as sock:
        for cut in (10, len(request) - 3):  # headers split, then the body's last bytes late
            sock.sendall(request[:cut])
            sock.sendall(request[cut:])
            assert _read_response(sock) == (200, {"prompt": "t1 t2 t3"})
        sock.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")  # same connection: kept alive
        status, answer = _read_response(sock)
        assert status == 404 and "no route" in answer["error"]["message"]
        sock.sendall(b"POST /detokenize HTTP/1.1\r\nContent-Length: 8\r\n\r\nnot json")
        status, answer = _read_response(sock)
        assert status == 400 and "bad request" in answer["error"]["message"]
