"""``attnscope dashboard``: serve the Dash explorer over the runs under a directory."""

from __future__ import annotations

import argparse
import sys

from attnscope.errors import MissingDependencyError


def run(args: argparse.Namespace) -> int:
    try:
        from attnscope.dashboard import create_app
    except ModuleNotFoundError as err:
        if err.name != "dash":
            raise
        raise MissingDependencyError(
            "the dashboard needs Dash: pip install 'attnscope[dashboard]'"
        ) from err

    app = create_app(args.runs)
    if args.host not in ("127.0.0.1", "localhost"):
        print(
            f"warning: serving on {args.host}: anyone who can reach this address can read "
            f"the runs under {args.runs}",
            file=sys.stderr,
        )
    url = f"http://{args.host}:{args.port}/"
    print(f"attnscope dashboard: {url} (runs under {args.runs})", flush=True)
    app.run(host=args.host, port=args.port, debug=False)
    return 0
