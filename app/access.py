"""Nothing about the API before login (issue 18, item 16).

With a password, gradio 6.31 answers /gradio_api/info with 401 but still embeds the whole API description
(every endpoint, parameter and default) in the login page it serves at `/` (routes.py, main(): the
`gradio_api_info` it renders does not depend on the login). This ASGI middleware blanks it in any page
served to a visitor who has not logged in; the page's script then asks /gradio_api/info, after login.
"""

from __future__ import annotations

import re

from starlette.middleware import Middleware
from starlette.requests import HTTPConnection

# The template's `<script>window.gradio_api_info = {...};</script>`: its JSON escapes "<" (gradio's toorjson),
# so the first ";</script>" ends it.
API_INFO = re.compile(rb"(window\.gradio_api_info\s*=\s*).*?(;\s*</script>)", re.S)


def app_kwargs() -> dict:
    """What serve() passes to demo.launch(app_kwargs=...): the middleware, in place before the first request."""
    return {"middleware": [Middleware(HideApiBeforeLogin)]}


def logged_out(scope) -> bool:
    """True when the app asks for a password and this request carries no valid login (gradio's own cookie check)."""
    app = scope.get("app")
    if getattr(app, "auth", None) is None or getattr(app, "auth_dependency", None) is not None:
        return False  # no password; or an auth dependency, which gradio checks on the page itself (401)
    cookies = HTTPConnection(scope).cookies
    token = cookies.get(f"access-token-{app.cookie_id}") or cookies.get(f"access-token-unsecure-{app.cookie_id}")
    return app.tokens.get(token) is None


class HideApiBeforeLogin:
    """Pass every request through; in an HTML page answered to a logged-out GET, set gradio_api_info to null."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "GET" or not logged_out(scope):
            await self.app(scope, receive, send)
            return
        start, chunks = None, []

        async def blank_api_info(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                if b"text/html" not in dict(start.get("headers", [])).get(b"content-type", b""):
                    await send(start)  # not a page: streamed through untouched
                    start = None
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = API_INFO.sub(rb"\1null\2", b"".join(chunks))
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, blank_api_info)
