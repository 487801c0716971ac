"""Serves one persistent chdb session over the subset of ClickHouse's HTTP interface that the
relay's sink (the `clickhouse` crate) uses, for the modern-profile tests.

Usage: python3 chdb_http.py SESSION_DIR

Prints `port N` on stdout once it listens on 127.0.0.1:N, then serves until stdin reaches
end of file (the test holds the pipe, so the server dies with the test).

What is understood, as a ClickHouse server does:
- POST with the statement in the body, or in the `query` parameter with the data in the body
  (INSERT ... FORMAT F; the data is loaded with FROM INFILE, so the engine's own input format
  parses it);
- `decompress=1`: the body is in ClickHouse's compressed-block framing (LZ4 or none); block
  checksums are not verified (the engine would verify them; here the loopback cannot corrupt);
- `database` (USE before the statement), `default_format`, and any other parameter as a setting
  of the statement; answers are never compressed (the client asks, the server may decline);
- a failure answers 500 with `X-ClickHouse-Exception-Code` and the exception text.

Exit status: 3 when chdb cannot be imported (stderr says so), 2 on a usage error.
"""

import http.server
import os
import re
import sys
import tempfile
import threading
import urllib.parse

EXIT_CHDB_MISSING = 3
EXIT_USAGE = 2

# URL parameters that are not settings.
NOT_SETTINGS = {
    "query",
    "database",
    "default_format",
    "decompress",
    "compress",
    "query_id",
    "session_id",
    "role",
    "user",
    "password",
    "client_protocol_version",
}

# Compressed-block methods of ClickHouse's framing.
METHOD_NONE = 0x02
METHOD_LZ4 = 0x82
CHECKSUM_BYTES = 16
HEADER_BYTES = 9  # method (1), compressed size with header (4), uncompressed size (4)

FORMAT_AT_END = re.compile(r"^(?P<head>.*?)\s+FORMAT\s+(?P<format>\w+)\s*$", re.S | re.I)
EXCEPTION_CODE = re.compile(r"Code:\s*(\d+)")


def lz4_block(src: bytes, size: int) -> bytes:
    """Decodes one raw LZ4 block whose decoded size is `size`."""
    out = bytearray()
    i = 0
    while i < len(src):
        token = src[i]
        i += 1
        literals = token >> 4
        if literals == 15:
            while True:
                extra = src[i]
                i += 1
                literals += extra
                if extra != 255:
                    break
        out += src[i : i + literals]
        i += literals
        if i >= len(src):
            break  # the last sequence has literals only
        offset = src[i] | (src[i + 1] << 8)
        i += 2
        match = token & 15
        if match == 15:
            while True:
                extra = src[i]
                i += 1
                match += extra
                if extra != 255:
                    break
        match += 4
        start = len(out) - offset
        if offset >= match:
            out += out[start : start + match]
        else:  # an overlapping copy repeats the bytes being written
            for k in range(match):
                out.append(out[start + k])
    if len(out) != size:
        raise ValueError(f"LZ4 block decoded to {len(out)} bytes, header says {size}")
    return bytes(out)


def decompress(body: bytes) -> bytes:
    """Decodes a sequence of ClickHouse compressed blocks."""
    out = bytearray()
    i = 0
    while i < len(body):
        header = i + CHECKSUM_BYTES
        method = body[header]
        compressed = int.from_bytes(body[header + 1 : header + 5], "little")
        size = int.from_bytes(body[header + 5 : header + 9], "little")
        data = body[header + HEADER_BYTES : header + compressed]
        if method == METHOD_LZ4:
            out += lz4_block(data, size)
        elif method == METHOD_NONE:
            out += data
        else:
            raise ValueError(f"unsupported compression method 0x{method:02x}")
        i = header + compressed
    return bytes(out)


def quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: chdb_http.py SESSION_DIR", file=sys.stderr)
        return EXIT_USAGE
    try:
        from chdb import session as chdb_session
    except ImportError as error:
        print(
            f"cannot import chdb ({error}): the PyPI package chdb-core is not installed "
            f"for {sys.executable}",
            file=sys.stderr,
        )
        return EXIT_CHDB_MISSING

    session = chdb_session.Session(sys.argv[1])
    # One session answers every connection, one statement at a time.
    lock = threading.Lock()
    spool = tempfile.mkdtemp(dir=sys.argv[1])

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the test reports what matters
            pass

        def read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return bytes(body)
                    body += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def answer(self, status: int, body: bytes, code: str = "") -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            if code:
                self.send_header("X-ClickHouse-Exception-Code", code)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            params = dict(
                urllib.parse.parse_qsl(
                    urllib.parse.urlsplit(self.path).query, keep_blank_values=True
                )
            )
            body = self.read_body()
            settings = ", ".join(
                f"{name} = {quote(value)}"
                for name, value in params.items()
                if name not in NOT_SETTINGS
            )
            try:
                if "query" in params:
                    sql = params["query"]
                    if params.get("decompress") == "1":
                        body = decompress(body)
                    found = FORMAT_AT_END.match(sql)
                    if not found or not sql.lstrip().upper().startswith("INSERT"):
                        raise ValueError(f"expected INSERT ... FORMAT F with data: {sql}")
                    path = os.path.join(spool, f"insert-{threading.get_ident()}.bin")
                    with open(path, "wb") as spooled:
                        spooled.write(body)
                    clause = f" SETTINGS {settings}" if settings else ""
                    sql = (
                        f"{found['head']} FROM INFILE {quote(path)}{clause} "
                        f"FORMAT {found['format']}"
                    )
                else:
                    sql = body.decode("utf-8")
                    if settings:
                        sql = f"{sql} SETTINGS {settings}"
                with lock:
                    if "database" in params:
                        session.query(f"USE `{params['database']}`")
                    result = session.query(sql, params.get("default_format", "TabSeparated"))
                    data = result.bytes()
            except Exception as error:  # every failure is an answer, as a server's would be
                text = str(error)
                found = EXCEPTION_CODE.search(text)
                self.answer(500, (text + "\n").encode(), found.group(1) if found else "1001")
                return
            self.answer(200, data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"port {server.server_address[1]}", flush=True)
    sys.stdin.read()  # until the test closes the pipe or dies
    server.shutdown()
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
