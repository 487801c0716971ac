"""Serves one persistent chdb session (the ClickHouse engine of the PyPI package chdb-core)
over the part of ClickHouse's HTTP interface that the relay, `prism-relay verify` and the
tests use. Started by the test bed's `Chdb` handle (tests/testbed/src/chdb.rs), whose module
documentation says where this differs from a real server.

Usage: python3 chdb_server.py SERVER_DIR PORT NAME

The engine's data lives in SERVER_DIR/data (it survives kill -9 and a restart on the same
directory); every INSERT's URL parameters are appended to SERVER_DIR/inserts.jsonl, one JSON
object a line, so tests can see the settings the relay sent. Serves on 127.0.0.1:PORT until
killed. `GET /ping` answers `Ok.` as a server does; `GET /prism-testbed/name` answers NAME,
so the test bed can tell this server from a stranger on its port.

What is understood, as a ClickHouse server does:
- the statement in the `query` parameter, in the body, or begun in the parameter and
  continued in the body; for `INSERT ... FORMAT F` in the parameter, the body is the data
  (loaded with FROM INFILE, so the engine's own input format parses it);
- `decompress=1`: the body is in ClickHouse's compressed-block framing (LZ4 or none); block
  checksums are not verified (a loopback cannot corrupt them);
- `database`, `default_format`, and every other parameter as a setting of the statement
  (so `async_insert`, `wait_for_async_insert`, `insert_deduplication_token` reach the engine);
  answers are never compressed (the client asks with `compress=1`, a server may decline);
- a failure answers with the HTTP status a real server gives for its exception code (the
  mapping of ClickHouse's src/Server/HTTP/exceptionCodeToHTTPStatus.cpp, by error name), the
  `X-ClickHouse-Exception-Code` header, and the body `Code: N. DB::Exception: ... (NAME)`.

A test hook, for what a real server does when it is killed at the wrong moment: while the
file SERVER_DIR/lose-next-insert names a table, the next INSERT into that table carrying an
`insert_deduplication_token` is run, its new parts' rows are deleted (the deduplication log
keeps the token) and the connection is closed without an answer; the file is removed. A server
killed between writing an insert's token to its deduplication log and committing the insert's
part comes back in that state, and answers the retry as a duplicate without storing it.

Exit status: 3 when chdb cannot be imported (stderr says how to install it), 2 on a usage
error, 1 when the port is taken (stderr says "Address already in use").
"""

import errno
import http.server
import json
import os
import re
import socket
import sys
import threading
import urllib.parse

EXIT_CHDB_MISSING = 3
EXIT_USAGE = 2
EXIT_PORT_TAKEN = 1

# The version scripts/lib/prereqs.sh installs; named in the failure message.
CHDB_PYPI = "chdb-core==26.9.0"

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

# HTTP statuses by exception name, as src/Server/HTTP/exceptionCodeToHTTPStatus.cpp maps the
# codes; every other exception is 500.
STATUS_BY_NAME = {
    "REQUIRED_PASSWORD": 401,
    **dict.fromkeys(
        [
            "UNKNOWN_USER",
            "WRONG_PASSWORD",
            "AUTHENTICATION_FAILED",
            "SET_NON_GRANTED_ROLE",
            "ACCESS_DENIED",
        ],
        403,
    ),
    **dict.fromkeys(
        [
            "BAD_ARGUMENTS",
            "CANNOT_COMPILE_REGEXP",
            "CANNOT_PARSE_TEXT",
            "CANNOT_PARSE_ESCAPE_SEQUENCE",
            "CANNOT_PARSE_QUOTED_STRING",
            "CANNOT_PARSE_DATE",
            "CANNOT_PARSE_DATETIME",
            "CANNOT_PARSE_NUMBER",
            "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING",
            "CANNOT_PARSE_IPV4",
            "CANNOT_PARSE_IPV6",
            "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
            "CANNOT_PARSE_UUID",
            "DUPLICATE_COLUMN",
            "ILLEGAL_COLUMN",
            "UNKNOWN_ELEMENT_IN_AST",
            "UNKNOWN_TYPE_OF_AST_NODE",
            "THERE_IS_NO_COLUMN",
            "TOO_DEEP_AST",
            "TOO_BIG_AST",
            "UNEXPECTED_AST_STRUCTURE",
            "SYNTAX_ERROR",
            "INCORRECT_DATA",
            "TYPE_MISMATCH",
            "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
        ],
        400,
    ),
    **dict.fromkeys(
        [
            "UNKNOWN_TABLE",
            "UNKNOWN_FUNCTION",
            "UNKNOWN_IDENTIFIER",
            "UNKNOWN_TYPE",
            "UNKNOWN_STORAGE",
            "UNKNOWN_DATABASE",
            "UNKNOWN_SETTING",
            "UNKNOWN_DIRECTION_OF_SORTING",
            "UNKNOWN_AGGREGATE_FUNCTION",
            "UNKNOWN_FORMAT",
            "UNKNOWN_DATABASE_ENGINE",
            "UNKNOWN_TYPE_OF_QUERY",
            "UNKNOWN_ROLE",
        ],
        404,
    ),
    "QUERY_IS_TOO_LARGE": 413,
    "NOT_IMPLEMENTED": 501,
    "SOCKET_TIMEOUT": 503,
    "CANNOT_OPEN_FILE": 503,
    "CANNOT_SCHEDULE_TASK": 503,
    "HTTP_LENGTH_REQUIRED": 411,
    "TIMEOUT_EXCEEDED": 408,
    "UNSUPPORTED_MEDIA_TYPE": 415,
}

# The code a server gives a body it cannot decompress, and the one for anything this
# stand-in itself fails at (std::exception in a server).
CANNOT_DECOMPRESS = (271, "CANNOT_DECOMPRESS")
STD_EXCEPTION = (1001, "STD_EXCEPTION")

INSERT_WITH_FORMAT = re.compile(
    r"^(?P<head>\s*INSERT\s.*?)\s+FORMAT\s+(?P<format>\w+)\s*$", re.S | re.I
)
INSERT_TABLE = re.compile(
    r"^\s*INSERT\s+INTO\s+(?:[`\"]?\w+[`\"]?\s*\.\s*)?[`\"]?(?P<table>\w+)", re.I
)
# The test hook's file in SERVER_DIR (see the module documentation).
LOSE_NEXT_INSERT = "lose-next-insert"
TRAILING_FORMAT = re.compile(r"\s+FORMAT\s+(\w+)\s*;?\s*$", re.I)
EXCEPTION_CODE = re.compile(r"Code:\s*(\d+)")
EXCEPTION_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)\s*(?:\(version [^)]*\)\s*)?\.?\s*$")


class StandInError(Exception):
    """A failure of the stand-in itself, answered with `code` and `name` like a server's."""

    def __init__(self, code_and_name, text):
        super().__init__(text)
        self.code, self.name = code_and_name


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
    try:
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
    except (IndexError, ValueError) as error:
        raise StandInError(CANNOT_DECOMPRESS, f"Cannot decompress: {error}") from error
    return bytes(out)


def quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def with_settings(sql: str, clause: str) -> str:
    """`sql` with `SETTINGS clause` before its trailing FORMAT clause, or at its end."""
    found = TRAILING_FORMAT.search(sql)
    if found:
        return f"{sql[: found.start()]} SETTINGS {clause} FORMAT {found.group(1)}"
    return f"{sql} SETTINGS {clause}"


def exception_answer(error: Exception, version: str):
    """(status, code, body) of a failure, as a server of `version` answers it."""
    if isinstance(error, StandInError):
        code, name, text = error.code, error.name, str(error)
        text = f"Code: {code}. DB::Exception: {text}. ({name})"
    else:
        text = str(error).strip()
        found = EXCEPTION_CODE.search(text)
        named = EXCEPTION_NAME.search(text)
        if found:
            code, name = int(found.group(1)), named.group(1) if named else ""
        else:
            code, name = STD_EXCEPTION
            text = f"Code: {code}. DB::Exception: {text}. ({name})"
    if "(version " not in text:
        text = f"{text} (version {version})"
    return STATUS_BY_NAME.get(name, 500), str(code), (text + "\n").encode()


def main() -> int:
    if len(sys.argv) != 4 or not sys.argv[2].isdigit():
        print("usage: chdb_server.py SERVER_DIR PORT NAME", file=sys.stderr)
        return EXIT_USAGE
    server_dir, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    try:
        from chdb import session as chdb_session
    except ImportError as error:
        print(
            f"cannot import chdb ({error}): the PyPI package chdb-core is not installed "
            f"for {sys.executable}; run scripts/test, which installs {CHDB_PYPI} "
            f"(or `python3 -m pip install {CHDB_PYPI}`)",
            file=sys.stderr,
        )
        return EXIT_CHDB_MISSING

    session = chdb_session.Session(os.path.join(server_dir, "data"))
    version = session.query("SELECT version()", "TabSeparated").bytes().decode().strip()
    # One session answers every connection, one statement at a time.
    lock = threading.Lock()
    spool = os.path.join(server_dir, "spool")
    os.makedirs(spool, exist_ok=True)
    inserts_log = os.path.join(server_dir, "inserts.jsonl")
    lose_file = os.path.join(server_dir, LOSE_NEXT_INSERT)

    def take_lost_insert(head: str, settings: dict) -> str:
        """The table of this insert when the test hook is to lose it (disarming the hook)."""
        if "insert_deduplication_token" not in settings:
            return ""
        try:
            with open(lose_file) as armed:
                table = armed.read().strip()
        except FileNotFoundError:
            return ""
        found = INSERT_TABLE.match(head)
        if not found or found["table"] != table:
            return ""
        os.remove(lose_file)
        return table

    def active_parts(database: str, table: str) -> set:
        answer = session.query(
            f"SELECT name FROM system.parts WHERE database = {quote(database)} "
            f"AND table = {quote(table)} AND active",
            "TabSeparated",
        )
        return set(answer.bytes().decode().split())

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the tests report what matters
            pass

        def setup(self):
            super().setup()
            # Headers and body leave in separate writes; without this, Nagle's algorithm holds
            # the body until the client's delayed ACK (40 ms), on every answer.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

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
            self.send_header("Content-Type", "text/plain; charset=UTF-8")
            if code:
                self.send_header("X-ClickHouse-Exception-Code", code)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = urllib.parse.urlsplit(self.path).path
            if path in ("/ping", "/"):
                if "query=" not in self.path:
                    self.answer(200, b"Ok.\n")
                    return
            elif path == "/prism-testbed/name":
                self.answer(200, name.encode())
                return
            self.run(b"")

        def do_POST(self):
            self.run(self.read_body())

        def run(self, body: bytes) -> None:
            params = dict(
                urllib.parse.parse_qsl(
                    urllib.parse.urlsplit(self.path).query, keep_blank_values=True
                )
            )
            settings = {k: v for k, v in params.items() if k not in NOT_SETTINGS}
            clause = ", ".join(f"{k} = {quote(v)}" for k, v in settings.items())
            try:
                if params.get("decompress") == "1":
                    body = decompress(body)
                head = params.get("query", "")
                found = INSERT_WITH_FORMAT.match(head)
                if found and body:
                    path = os.path.join(spool, f"insert-{threading.get_ident()}.bin")
                    with open(path, "wb") as spooled:
                        spooled.write(body)
                    settings_sql = f" SETTINGS {clause}" if clause else ""
                    sql = (
                        f"{found['head']} FROM INFILE {quote(path)}{settings_sql} "
                        f"FORMAT {found['format']}"
                    )
                    with open(inserts_log, "a") as log:
                        log.write(json.dumps({"query": head, "settings": settings}) + "\n")
                else:
                    sql = (head + "\n" + body.decode("utf-8")).strip()
                    if not sql:
                        raise StandInError((62, "SYNTAX_ERROR"), "Empty query")
                    if clause:
                        sql = with_settings(sql, clause)
                database = params.get("database", "default")
                with lock:
                    lost = take_lost_insert(head, settings) if found and body else ""
                    session.query(f"USE `{database}`")
                    before = active_parts(database, lost) if lost else set()
                    result = session.query(sql, params.get("default_format", "TabSeparated"))
                    data = result.bytes()
                    if lost:
                        new_parts = active_parts(database, lost) - before
                        if new_parts:
                            names = ", ".join(quote(p) for p in sorted(new_parts))
                            session.query(
                                f"ALTER TABLE `{database}`.`{lost}` DELETE WHERE _part IN "
                                f"({names}) SETTINGS mutations_sync = 1"
                            )
                if lost:
                    # No answer, as from a server killed before it could give one.
                    self.close_connection = True
                    return
            except Exception as error:  # every failure is an answer, as a server's would be
                status, code, text = exception_answer(error, version)
                self.answer(status, text, code)
                return
            self.answer(200, data)

    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            print(f"127.0.0.1:{port}: Address already in use", file=sys.stderr)
            return EXIT_PORT_TAKEN
        raise
    server.daemon_threads = True
    print(f"chdb {version} listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
