"""A WSGI app (nothing of odfork_user in it) that holds GUNICORN_APP_BYTES
(default 2 GiB) of Python objects built at import, as an app preloaded by
`gunicorn --preload` does."""

import os

N = int(os.environ.get("GUNICORN_APP_BYTES", str(2 << 30))) // 200  # ~200 B an entry here
TABLE = {f"k{i}": "x" * 100 + str(i) for i in range(N)}


def app(environ, start_response):
    body = TABLE.get("k" + environ.get("PATH_INFO", "/1")[1:], "-").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
