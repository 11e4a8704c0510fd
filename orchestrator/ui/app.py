"""The inspector's web app: server-rendered pages, a JSON API of the views, a live stream.

Every request needs the token (`?token=` once, then an HttpOnly SameSite=Strict cookie, or
`Authorization: Bearer`); the others get 401. Nothing here writes to the store.
"""

from __future__ import annotations

import hmac
import json
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from events.store import Filter, StoreError
from orchestrator.api import InvalidTaskArgs
from orchestrator.config import ConfigError, load_config
from orchestrator.ui import render
from orchestrator.ui.data import Inspector, markers_by_kind, whole_number

HERE = Path(__file__).parent
COOKIE = "inspector_token"
EVENTS_PAGE = 100
API_EVENTS_PAGE = 1000  # the API's `events` rows when no `limit` is given (ADR-0014)
# The API's page of each paged view when no `limit` is given: `events` rows, `whatif` rows
# (decisions), `replay` tasks (ADR-0014).
API_PAGES = {"events": API_EVENTS_PAGE, "whatif": 500, "replay": 500}
WHATIF_PAGE = 500  # decisions per what-if page
SESSIONS_SHOWN = 200  # the newest; the events page reaches the rest
USAGE_BINS = 48
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]

templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["ts"] = lambda t: f"{t:%Y-%m-%d %H:%M:%S}" if t else ""
templates.env.filters["cost"] = lambda c: "" if c is None else f"${c:.6f}".rstrip("0")
templates.env.filters["json"] = lambda v: json.dumps(v, indent=2, default=str)


class TokenGate:
    """Lets through only requests that carry the token; the query form sets the cookie
    and, for a page, redirects to the same address without the token in it."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def _ok(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        bearer = auth[7:] if auth.lower().startswith("bearer ") else None
        cookie = SimpleCookie(headers.get("cookie", "")).get(COOKIE)
        query = parse_qsl(scope.get("query_string", b"").decode(), keep_blank_values=True)
        offered = dict(query).get("token")
        if self._ok(bearer) or self._ok(cookie.value if cookie else None):
            await self.app(scope, receive, send)
            return
        if not self._ok(offered):
            await PlainTextResponse(
                "401: this inspector needs its token (open the URL it printed)", 401
            )(scope, receive, send)
            return
        set_cookie = f"{COOKIE}={offered}; Path=/; HttpOnly; SameSite=Strict"
        if scope["method"] == "GET" and not scope["path"].startswith("/api/"):
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            target = scope["path"] + (f"?{rest}" if rest else "")
            response: Response = RedirectResponse(target, 303)
            response.headers["set-cookie"] = set_cookie
            await response(scope, receive, send)
            return

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], (b"set-cookie", set_cookie.encode())]
            await send(message)

        await self.app(scope, receive, send_with_cookie)


class Hardening:
    """Headers that keep pages to this machine: nothing loads from elsewhere, no framing."""

    HEADERS = (
        (
            b"content-security-policy",
            b"default-src 'self'; img-src 'self' data:; style-src 'self'; "
            b"frame-ancestors 'none'; form-action 'self'",
        ),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
        (b"cache-control", b"no-store"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        async def send_hardened(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, send_hardened if scope["type"] == "http" else send)


def _rows(rows: list[Any]) -> list[Any]:
    return [r.model_dump(mode="json") if isinstance(r, BaseModel) else r for r in rows]


def create_app(data: Inspector, token: str) -> ASGIApp:
    """The inspector app over `data`, guarded by `token`."""

    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        context.setdefault("reading", data.reading)
        context.setdefault("head", data.head)
        return templates.TemplateResponse(request, name, context)

    def bad(request: Request, message: str, status: int = 400) -> HTMLResponse:
        return templates.TemplateResponse(
            request, "error.html", {"message": message, "head": data.head}, status_code=status
        )

    async def sessions(request: Request) -> Response:
        def build() -> list[Any]:
            with data.lock:
                rows = sorted(data.summaries.values(), key=lambda s: s.first_position)
                return [(s, sorted(s.models)) for s in reversed(rows[-SESSIONS_SHOWN:])]

        rows = await run_in_threadpool(build)
        return page(request, "sessions.html", rows=rows, total=len(data.summaries))

    async def session(request: Request) -> Response:
        sid = request.path_params["session_id"]
        past = await run_in_threadpool(data.history, sid)
        if not past.stops:
            return bad(request, f'Unknown session "{sid}".' + data.known(sid), 404)
        return page(
            request,
            "session.html",
            sid=sid,
            stops=len(past.stops),
            last=past.stops[-1],
            timeline=_timeline(past),
            counts=markers_by_kind(past.markers),
            legend=render.legend(sorted({t.model for t in past.tasks.values() if t.model})),
            tasks=len(past.tasks),
        )

    def _timeline(past: Any) -> str:
        tasks = sorted(past.tasks.values(), key=lambda t: t.started_at)
        return render.timeline(tasks, past.markers)

    async def session_timeline(request: Request) -> Response:
        sid = request.path_params["session_id"]
        past = await run_in_threadpool(data.history, sid)
        return HTMLResponse(_timeline(past))

    async def session_at(request: Request) -> Response:
        sid = request.path_params["session_id"]
        try:
            index = int(request.query_params.get("index", "-1"))
        except ValueError:
            return bad(request, "index: a whole number (the slider's stop)")
        past = await run_in_threadpool(data.history, sid)
        if index < 0:
            index = len(past.stops) - 1
        try:
            state = await run_in_threadpool(data.travel, sid, index)
        except InvalidTaskArgs as exc:
            return bad(request, str(exc), 404)
        return templates.TemplateResponse(request, "travel.html", {"s": state})

    async def session_diff(request: Request) -> Response:
        sid = request.path_params["session_id"]
        try:
            a, b = int(request.query_params["a"]), int(request.query_params["b"])
        except (KeyError, ValueError):
            return bad(request, "a and b: the two marked stops, whole numbers")
        a, b = min(a, b), max(a, b)
        try:
            rows = await run_in_threadpool(data.travel_diff, sid, a, b)
            ends = await run_in_threadpool(lambda: (data.travel(sid, a), data.travel(sid, b)))
        except InvalidTaskArgs as exc:
            return bad(request, str(exc), 404)
        return templates.TemplateResponse(
            request,
            "diff.html",
            {"rows": rows, "since": ends[0].position, "until": ends[1].position},
        )

    async def task(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        try:
            record, explained, turns = await run_in_threadpool(data.task, task_id)
        except InvalidTaskArgs as exc:
            return bad(request, str(exc), 404)
        return page(request, "task.html", t=record, e=explained, turns=turns)

    async def processes(request: Request) -> Response:
        rows = await run_in_threadpool(data.processes)
        return page(request, "processes.html", rows=rows, host=data.host)

    async def events(request: Request) -> Response:
        raw = {k: v for k, v in request.query_params.items() if v != "" and k != "token"}
        raw.setdefault("limit", str(EVENTS_PAGE))
        filters = data.view_filters("events", raw)
        try:
            rows = await run_in_threadpool(data.events, filters)
        except InvalidTaskArgs as exc:
            return bad(request, str(exc))
        nxt = dict(raw, since=str(rows[-1].position)) if rows else None
        newest = dict(raw, since=str(max(0, data.head - int(raw["limit"]))))
        return page(
            request,
            "events.html",
            rows=rows,
            f=raw,
            types=data.event_types(),
            next=urlencode(nxt) if nxt and len(rows) == filters.get("limit") else None,
            newest=urlencode(newest),
        )

    async def usage(request: Request) -> Response:
        charts = await run_in_threadpool(_usage_charts, data)
        return page(request, "usage.html", charts=charts)

    async def whatif(request: Request) -> Response:
        sid = request.query_params.get("session") or None
        context: dict[str, Any] = {"text": "", "sid": sid, "rows": None, "error": None}
        if request.method == "POST":
            form = await request.form()
            context["text"] = text = str(form.get("config") or "")
            context["sid"] = sid = str(form.get("session") or "") or None
            since = str(form.get("since") or "0")
            try:
                config = load_config(tomllib.loads(text))
                after = whole_number(since)
                if after is None or after < 0:
                    raise InvalidTaskArgs("since: a log position (a whole number >= 0)")
                context["since"] = after
                # A page of decisions at a time: every session's is as long as the log.
                rows = await run_in_threadpool(data.whatif, config, sid, after, WHATIF_PAGE)
                context["rows"] = [r for r in rows if r.changed]
                context["unchanged"] = len(rows) - len(context["rows"])
                filters = {"session_id": sid, "since": after, "limit": WHATIF_PAGE}
                context["next"] = await run_in_threadpool(data.next_since, "whatif", filters, rows)
            except tomllib.TOMLDecodeError as exc:
                context["error"] = f"config: not valid TOML: {exc}"
            except (ConfigError, InvalidTaskArgs) as exc:
                context["error"] = str(exc)
        return page(request, "whatif.html", **context)

    async def api_view(request: Request) -> Response:
        name = request.path_params["view"]
        raw = {k: v for k, v in request.query_params.items() if k != "token"}
        if name in API_PAGES:  # a page by default; `limit=` (empty) asks for every row
            raw.setdefault("limit", str(API_PAGES[name]))
        session_id = raw.get("session_id") or "cli"
        filters = data.view_filters(name, raw)
        try:
            rows = await run_in_threadpool(data.view, name, filters, session_id)
            after = await run_in_threadpool(data.next_since, name, filters, rows)
        except (InvalidTaskArgs, ConfigError) as exc:
            return JSONResponse({"error": str(exc)}, 400)
        body: dict[str, Any] = {"rows": _rows(rows)}
        if after is not None:  # the same query from there on
            body["next"] = f"/api/views/{name}?" + urlencode({**raw, "since": str(after)})
        return Response(json.dumps(body, default=str), media_type="application/json")

    async def api_stream(request: Request) -> Response:
        try:
            after = int(request.query_params.get("after", str(data.head)))
        except ValueError:
            return JSONResponse({"error": "after: a log position (a whole number >= 0)"}, 400)
        sid = request.query_params.get("session_id") or None

        async def stream() -> AsyncIterator[str]:
            nonlocal after
            yield f": following after {after}\n\n"
            while True:
                head = await run_in_threadpool(data.wait_for_head, after, 1.0)
                if await request.is_disconnected():
                    return
                if head <= after:
                    yield ": keep-alive\n\n"
                    continue
                records = await run_in_threadpool(data.records, Filter(session_id=sid), after, head)
                for r in records:
                    yield f"id: {r.position}\ndata: {r.model_dump_json()}\n\n"
                after = head

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def on_store_error(request: Request, exc: Exception) -> Response:
        return PlainTextResponse(f"store: {exc}", 503)

    routes = [
        Route("/", sessions),
        Route("/sessions/{session_id}", session),
        Route("/sessions/{session_id}/timeline", session_timeline),
        Route("/sessions/{session_id}/at", session_at),
        Route("/sessions/{session_id}/diff", session_diff),
        Route("/tasks/{task_id}", task),
        Route("/processes", processes),
        Route("/events", events),
        Route("/usage", usage),
        Route("/whatif", whatif, methods=["GET", "POST"]),
        Route("/api/views/{view}", api_view),
        Route("/api/stream", api_stream),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={StoreError: on_store_error})
    return Hardening(TokenGate(app, token))


def _usage_charts(data: Inspector) -> list[tuple[str, str]]:
    """Tokens and cost over time per worker and model, in at most USAGE_BINS bins."""
    with data.lock:
        usage = {k: dict(v) for k, v in data.usage.items()}
    minutes = sorted({m for buckets in usage.values() for m in buckets})
    if not minutes:
        return [("usage", render.bars("tokens", {}, []))]
    first, last = minutes[0], minutes[-1]
    width = max(1, -(-(last - first + 1) // USAGE_BINS))
    bins = (last - first) // width + 1
    labels = [
        f"{datetime.fromtimestamp((first + i * width) * 60, UTC):%m-%d %H:%M}" for i in range(bins)
    ]
    tokens: dict[str, list[float]] = {}
    cost: dict[str, list[float]] = {}
    for (worker, model), buckets in sorted(usage.items()):
        name = f"{worker} {model}"
        tokens[name] = [0.0] * bins
        cost[name] = [0.0] * bins
        for minute, (_, tin, tout, dollars) in buckets.items():
            i = (minute - first) // width
            tokens[name][i] += tin + tout
            cost[name][i] += dollars
    return [
        ("tokens", render.bars("tokens (input + output) per worker and model", tokens, labels)),
        ("cost", render.bars("cost in USD per worker and model", cost, labels, " $")),
    ]
