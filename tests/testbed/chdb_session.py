"""Runs SQL statements in one persistent chdb session, for the modern-profile tests.

Usage: python3 chdb_session.py SESSION_DIR < statements.json

stdin holds a JSON array of SQL strings. They run in order in one `chdb.session.Session`
rooted at SESSION_DIR, so databases and tables persist across statements (and across calls
with the same directory). A statement that fails does not stop the later ones. stdout is a
JSON array with one object per statement: {"ok": "<result text>"} or {"error": "<message>"}.
A statement without a FORMAT clause answers in TabSeparated.

Exit status: 0 when every statement ran (whether it succeeded or not), 3 when chdb cannot be
imported (the message on stderr says how to install it), 2 on a usage error.
"""

import json
import sys

# The exit status that tells the caller chdb is missing (scripts/test installs it).
EXIT_CHDB_MISSING = 3
EXIT_USAGE = 2


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: chdb_session.py SESSION_DIR < statements.json", file=sys.stderr)
        return EXIT_USAGE
    try:
        import chdb
        from chdb import session as chdb_session
    except ImportError as error:
        print(
            f"cannot import chdb ({error}): the PyPI package chdb-core is not installed "
            f"for {sys.executable}",
            file=sys.stderr,
        )
        return EXIT_CHDB_MISSING
    statements = json.load(sys.stdin)
    if not isinstance(statements, list) or not all(isinstance(s, str) for s in statements):
        print("stdin must be a JSON array of SQL strings", file=sys.stderr)
        return EXIT_USAGE

    results = []
    session = chdb_session.Session(sys.argv[1])
    try:
        for sql in statements:
            try:
                answer = session.query(sql, "TabSeparated")
                results.append({"ok": answer.bytes().decode("utf-8", "replace")})
            except Exception as error:  # chdb raises its own types; every failure is data here
                results.append({"error": str(error)})
    finally:
        session.close()
    json.dump(results, sys.stdout)
    print(f"chdb {chdb.__version__}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
