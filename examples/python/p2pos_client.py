#!/usr/bin/env python3
"""A p2pos local API client in plain Python (standard library only).

It shows how any program can use a p2pos node without linking Rust: HTTP/1.1
with JSON over the daemon's Unix socket (or loopback TCP with a bearer
token), and raw byte streams through an HTTP upgrade.

Usage:
  p2pos_client.py --data-dir DIR status
  p2pos_client.py --data-dir DIR echo-server SERVICE       # echo one stream back
  p2pos_client.py --data-dir DIR send PEER SERVICE TEXT [--addr IP:PORT]
  p2pos_client.py --data-dir DIR datagram PEER SERVICE TEXT [--addr IP:PORT]
  p2pos_client.py --data-dir DIR recv-datagrams SERVICE [--timeout-ms N]
  p2pos_client.py --tcp 127.0.0.1:7448 --token TOKEN status
"""

import argparse
import base64
import json
import os
import socket
import sys
import urllib.parse


class ApiError(Exception):
    """The daemon answered with an error status."""

    def __init__(self, status, message):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class P2posClient:
    """Talks to one p2pos daemon."""

    def __init__(self, data_dir=None, tcp=None, token=None):
        if tcp is None and data_dir is None:
            raise ValueError("give data_dir (Unix socket) or tcp (host:port)")
        self.data_dir = data_dir
        self.tcp = tcp
        self.token = token

    def _connect(self):
        if self.tcp:
            host, port = self.tcp.rsplit(":", 1)
            return socket.create_connection((host, int(port)))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(os.path.join(self.data_dir, "api.sock"))
        return sock

    def _send_request(self, method, path, body=None, upgrade=False):
        sock = self._connect()
        headers = [f"{method} {path} HTTP/1.1", "Host: localhost"]
        if self.token:
            headers.append(f"Authorization: Bearer {self.token}")
        payload = b""
        if body is not None:
            payload = json.dumps(body).encode()
            headers.append("Content-Type: application/json")
        headers.append(f"Content-Length: {len(payload)}")
        if upgrade:
            headers += ["Connection: Upgrade", "Upgrade: p2pos-stream"]
        else:
            headers.append("Connection: close")
        sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode() + payload)
        return sock

    @staticmethod
    def _read_head(sock):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(1)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            data += chunk
        head = data.decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        headers = {}
        for line in head[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        return status, headers

    def call(self, method, path, body=None):
        """A JSON request; returns the decoded answer (None when empty)."""
        sock = self._send_request(method, path, body)
        status, headers = self._read_head(sock)
        length = int(headers.get("content-length", "0"))
        data = b""
        while len(data) < length:
            chunk = sock.recv(length - len(data))
            if not chunk:
                break
            data += chunk
        sock.close()
        value = json.loads(data) if data else None
        if status >= 400:
            raise ApiError(status, (value or {}).get("error", "error"))
        return value

    def _upgrade(self, method, path):
        sock = self._send_request(method, path, upgrade=True)
        status, headers = self._read_head(sock)
        if status != 101:
            length = int(headers.get("content-length", "0"))
            data = sock.recv(length) if length else b""
            sock.close()
            message = json.loads(data).get("error", "error") if data else "error"
            raise ApiError(status, message)
        return sock, headers.get("p2pos-peer")

    def status(self):
        return self.call("GET", "/v1/status")

    def register(self, service, description=""):
        return self.call("PUT", f"/v1/services/{service}", {"description": description})

    def unregister(self, service):
        return self.call("DELETE", f"/v1/services/{service}")

    def accept(self, service):
        """Waits for a peer's stream; returns (socket, peer id)."""
        return self._upgrade("POST", f"/v1/services/{service}/accept")

    def open_stream(self, peer, service, addr=None):
        """Opens a stream to a peer's service; returns a socket."""
        query = {"peer": peer, "service": service}
        if addr:
            query["addr"] = addr
        sock, _ = self._upgrade("POST", "/v1/streams?" + urllib.parse.urlencode(query))
        return sock

    def send_datagram(self, peer, service, data, addr=None):
        body = {"peer": peer, "service": service, "data": base64.b64encode(data).decode()}
        if addr:
            body["addr"] = addr
        return self.call("POST", "/v1/datagrams", body)

    def poll_datagrams(self, service, timeout_ms=1000):
        items = self.call("GET", f"/v1/services/{service}/datagrams?timeout_ms={timeout_ms}")
        return [(i["peer"], base64.b64decode(i["data"])) for i in items]


def read_all(sock):
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def main():
    parser = argparse.ArgumentParser(description="p2pos local API example client")
    parser.add_argument("--data-dir", default=os.environ.get("P2POS_DATA_DIR"))
    parser.add_argument("--tcp")
    parser.add_argument("--token")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status")
    echo = sub.add_parser("echo-server")
    echo.add_argument("service")
    for name in ("send", "datagram"):
        p = sub.add_parser(name)
        p.add_argument("peer")
        p.add_argument("service")
        p.add_argument("text")
        p.add_argument("--addr")
    recv = sub.add_parser("recv-datagrams")
    recv.add_argument("service")
    recv.add_argument("--timeout-ms", type=int, default=5000)
    args = parser.parse_args()

    client = P2posClient(data_dir=args.data_dir, tcp=args.tcp, token=args.token)
    try:
        if args.cmd == "status":
            print(json.dumps(client.status(), indent=2))
        elif args.cmd == "echo-server":
            client.register(args.service, "echoes one stream back")
            print("ready", flush=True)
            sock, peer = client.accept(args.service)
            data = read_all(sock)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            sock.close()
            client.unregister(args.service)
            print(f"echoed {len(data)} bytes to {peer}", file=sys.stderr)
        elif args.cmd == "send":
            sock = client.open_stream(args.peer, args.service, args.addr)
            sock.sendall(args.text.encode())
            sock.shutdown(socket.SHUT_WR)
            print(read_all(sock).decode())
        elif args.cmd == "datagram":
            client.send_datagram(args.peer, args.service, args.text.encode(), args.addr)
        elif args.cmd == "recv-datagrams":
            for peer, data in client.poll_datagrams(args.service, args.timeout_ms):
                print(f"{peer} {data.decode(errors='replace')}")
    except ApiError as e:
        print(f"p2pos_client: {e.message} (HTTP {e.status})", file=sys.stderr)
        sys.exit(1)
    except (ConnectionError, FileNotFoundError) as e:
        print(f"p2pos_client: cannot reach the daemon: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
