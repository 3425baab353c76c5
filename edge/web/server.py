"""The panel's FastAPI app: server-rendered pages, the JSON API under /api, /metrics.

``create_app(backend, cfg, data_dir)`` builds it; ``serve`` runs it with
uvicorn. Every handler that touches the backend is a plain ``def`` (run in
the thread pool), so a slow query never blocks the event loop, and nothing
runs on the pipeline thread.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    StreamingResponse,
)
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from edge import __version__
from edge.types import StatusEvent, VerdictCode
from edge.web.auth import (
    AuthError,
    LoginLimiter,
    PanelDb,
    Role,
    Session,
    tokens_equal,
)
from edge.web.backend import ModelSlot, PanelBackend, PartQuery, PartRecord, SlotName
from edge.web.config import PanelConfig
from edge.web.media import JpegCache, draw_live, encode_jpeg, read_image
from edge.web.metrics import PanelMetrics
from edge.web.schemaform import (
    FormSection,
    build_form,
    diff,
    display_value,
    flatten,
    get_path,
    localize,
    parse_form,
)
from edge.web.system import SystemInfo, read_system
from edge.web.teach import TeachArgv, TeachService, default_teach_argv
from edge.web.translate import LANGUAGES, translate

log = logging.getLogger(__name__)

SESSION_COOKIE = "li_session"
PRE_COOKIE = "li_pre"
LANG_COOKIE = "li_lang"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
HERE = Path(__file__).parent

TECHNICIAN_SECTIONS = frozenset({"camera", "pipeline"})
"""Settings sections a technician may change; all others need an admin."""
SAFE_HISTORY_LIMIT = 200
LIVE_STATS_TTL_S = 2.0
"""The Live page's counters and charts are recomputed at most this often."""
LIVE_BODY_TTL_S = 0.2
"""/api/live answers are rebuilt at most this often, however many screens poll."""
STATS_TTL_S = 10.0
"""/api/stats answers are recomputed at most this often per (window, bucket)."""


# ---------------------------------------------------------------------------
# API models (the OpenAPI spec is built from these)


class ErrorOut(BaseModel):
    detail: str


class RegionOut(BaseModel):
    x: int
    y: int
    w: int
    h: int
    area_px: int
    peak_score: float | None
    defect_class: str


class PartOut(BaseModel):
    inspection_id: int
    decided_unix: float
    code: Literal["OK", "NG", "ERROR"]
    score: float | None = Field(description="None when the verdict has no score (ERROR).")
    threshold: float | None
    defect_class: str
    regions: list[RegionOut]
    model_name: str
    model_version: str
    timings_ms: dict[str, float]
    error: str
    trigger_id: int | None
    source_id: str
    frame_sequence: int
    image_url: str | None
    heatmap_url: str | None
    acknowledged_by: str | None = None


class PartPageOut(BaseModel):
    parts: list[PartOut]
    total: int
    limit: int
    offset: int


class BucketOut(BaseModel):
    start_unix: float
    ok: int
    ng: int
    error: int
    latency_ms_p50: float | None
    latency_ms_max: float | None


class StatsOut(BaseModel):
    since_unix: float
    bucket_s: float
    ok: int
    ng: int
    error: int
    total: int
    yield_percent: float | None
    throughput_per_min: float
    buckets: list[BucketOut]


class LiveOut(BaseModel):
    part: PartOut | None
    live_image_url: str | None
    threshold: float
    stats: StatsOut


class SlotOut(BaseModel):
    slot: Literal["active", "staged", "previous"]
    empty: bool
    name: str
    version: str
    created: str
    threshold: float | None
    metrics: dict[str, Any]
    sha256: str


class HealthOut(BaseModel):
    camera_connected: bool
    camera_fps: float | None
    camera_dropped_frames: int
    backend_name: str
    backend_latency_ms_p50: float | None
    backend_latency_ms_p99: float | None
    pipeline_running: bool
    threshold: float
    plc_connected: bool | None
    plc_last_trigger_unix: float | None
    uplink_state: str
    uplink_outbox_depth: int | None
    disk_path: str
    disk_total_bytes: int | None
    disk_free_bytes: int | None
    cpu_percent: float | None
    cpu_temp_c: float | None
    gpu_temp_c: float | None
    memory_used_ratio: float | None
    extra: dict[str, float]


class EventOut(BaseModel):
    time_unix: float
    kind: str
    source: str
    severity: str
    message: str
    data: dict[str, Any]


class MeOut(BaseModel):
    username: str
    role: Literal["operator", "technician", "admin"]
    via_token: bool


class ThresholdIn(BaseModel):
    threshold: float | None = Field(
        description="New image threshold (normalised score); null restores the model's own.",
        ge=0.0,
        le=1000.0,
        allow_inf_nan=False,
    )


class OkOut(BaseModel):
    ok: bool = True
    message: str = ""


class ApplyOut(BaseModel):
    applied: list[str]
    restart_required: list[str]
    changed: list[str]


class AckIn(BaseModel):
    note: str = Field("", max_length=500)


class JobOut(BaseModel):
    id: str
    kind: str
    dataset: str
    state: Literal["queued", "running", "done", "failed"]
    progress: str
    started_unix: float | None
    finished_unix: float | None
    error: str
    result: dict[str, Any]


class DatasetOut(BaseModel):
    name: str
    good_train: int
    good_test: int
    defective: dict[str, int]


# ---------------------------------------------------------------------------


class PanelError(Exception):
    """A refused request: HTTP status, message key (translated) and optional detail."""

    def __init__(
        self, status: int, key: str, detail: str = "", loc: tuple[str, ...] = ("body",)
    ) -> None:
        super().__init__(detail or key)
        self.status = status
        self.key = key
        self.detail = detail
        self.loc = loc


@dataclass
class PanelState:
    backend: PanelBackend
    cfg: PanelConfig
    data_dir: Path
    db: PanelDb
    limiter: LoginLimiter
    templates: Jinja2Templates
    metrics: PanelMetrics
    teach: TeachService
    live_cache: JpegCache = field(default_factory=lambda: JpegCache(8))
    thumb_cache: JpegCache = field(default_factory=lambda: JpegCache(512))
    started_unix: float = field(default_factory=time.time)
    _sections: tuple[FormSection, ...] | None = None
    _stats_lock: threading.Lock = field(default_factory=threading.Lock)
    _live_lock: threading.Lock = field(default_factory=threading.Lock)
    _live_body: tuple[float, bytes] | None = None
    _stats_cache: dict[tuple[float, float], tuple[float, StatsOut]] = field(default_factory=dict)

    def sections(self) -> tuple[FormSection, ...]:
        if self._sections is None:
            self._sections = build_form(type(self.backend.config()).model_json_schema())
        return self._sections

    def stats(self, window_s: float, bucket_s: float, ttl_s: float) -> StatsOut:
        """Statistics over the last ``window_s``, computed at most once per ``ttl_s``.

        However many screens poll, the store is asked once per period (single
        flight: the lock is held while computing), so watching never adds load
        in proportion to the number of watchers.
        """
        key = (window_s, bucket_s)
        now = time.monotonic()
        with self._stats_lock:
            hit = self._stats_cache.get(key)
            if hit is not None and now - hit[0] < ttl_s:
                return hit[1]
            out = stats_out(self.backend, window_s, bucket_s)
            if len(self._stats_cache) > 32:
                self._stats_cache.clear()
            self._stats_cache[key] = (time.monotonic(), out)
            return out

    def live_cached(self, make: Callable[[], bytes]) -> bytes:
        """The /api/live body, rebuilt at most once per ``LIVE_BODY_TTL_S`` (single flight)."""
        with self._live_lock:
            now = time.monotonic()
            if self._live_body is None or now - self._live_body[0] >= LIVE_BODY_TTL_S:
                self._live_body = (now, make())
            return self._live_body[1]

    def system(self) -> SystemInfo:
        store = self.backend.health().store_path
        return read_system(store if store is not None else self.data_dir)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def part_out(p: PartRecord, ack: str | None = None) -> PartOut:
    base = f"/media/parts/{p.inspection_id}"
    return PartOut(
        inspection_id=p.inspection_id,
        decided_unix=p.decided_unix,
        code=p.code.name,
        score=_finite(p.score),
        threshold=_finite(p.threshold),
        defect_class=p.defect_class,
        regions=[
            RegionOut(
                x=r.x,
                y=r.y,
                w=r.w,
                h=r.h,
                area_px=r.area_px,
                peak_score=_finite(r.peak_score),
                defect_class=r.defect_class,
            )
            for r in p.regions
        ],
        model_name=p.model_name,
        model_version=p.model_version,
        timings_ms={k: v for k, v in p.timings_ms.items() if math.isfinite(v)},
        error=p.error,
        trigger_id=p.trigger_id,
        source_id=p.source_id,
        frame_sequence=p.frame_sequence,
        image_url=f"{base}/image" if p.has_image else None,
        heatmap_url=f"{base}/heatmap" if p.has_heatmap else None,
        acknowledged_by=ack,
    )


def slot_out(s: ModelSlot) -> SlotOut:
    return SlotOut(
        slot=s.slot.value,
        empty=s.empty,
        name=s.name,
        version=s.version,
        created=s.created,
        threshold=_finite(s.threshold),
        metrics=json.loads(json.dumps(s.metrics, default=str)),
        sha256=s.sha256,
    )


def event_out(e: StatusEvent) -> EventOut:
    return EventOut(
        time_unix=e.time_unix,
        kind=e.kind,
        source=e.source,
        severity=str(e.severity),
        message=e.message,
        data=json.loads(json.dumps(e.data, default=str)),
    )


def stats_out(backend: PanelBackend, window_s: float, bucket_s: float) -> StatsOut:
    now = time.time()
    st = backend.stats(now - window_s, bucket_s)
    total = st.total
    return StatsOut(
        since_unix=st.since_unix,
        bucket_s=st.bucket_s,
        ok=st.ok,
        ng=st.ng,
        error=st.error,
        total=total,
        yield_percent=(100.0 * st.ok / total) if total else None,
        throughput_per_min=total / (window_s / 60.0),
        buckets=[
            BucketOut(
                start_unix=b.start_unix,
                ok=b.ok,
                ng=b.ng,
                error=b.error,
                latency_ms_p50=_finite(b.latency_ms_p50),
                latency_ms_max=_finite(b.latency_ms_max),
            )
            for b in st.buckets
        ],
    )


def parse_local_time(text: str | None, name: str = "since") -> float | None:
    """``2026-11-21T22:05`` (a datetime-local input, local time) -> unix seconds."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError, OSError):
        raise PanelError(422, "error.bad_time", text, ("query", name)) from None


def numeric_leaves(data: Any, limit: int = 14) -> list[tuple[str, float]]:
    """Numeric values of a nested mapping as (dotted key, value), for metric tables."""
    out = [
        (k, float(v))
        for k, v in flatten(data).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ]
    return out[:limit]


def fmt_time(unix: float | None) -> str:
    if unix is None or not math.isfinite(unix):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def safe_next(target: str | None) -> str:
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/live"


def client_of(request: Request) -> str:
    return request.client.host if request.client else "?"


_bearer = HTTPBearer(auto_error=False, description="API token")
_cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, description="Panel session")


def current_session(
    request: Request,
    cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    session_cookie: Annotated[str | None, Depends(_cookie)],
) -> Session | None:
    """The caller's session: a bearer API token or the session cookie."""
    db: PanelDb = request.app.state.panel.db
    if cred is not None:
        return db.token_session(cred.credentials)
    if session_cookie:
        return db.session(session_cookie)
    return None


def need(role: Role, mutating: bool = False) -> Callable[..., Session]:
    """A dependency requiring ``role``; ``mutating`` also checks the CSRF header for cookies."""

    def dep(request: Request, sess: Annotated[Session | None, Depends(current_session)]) -> Session:
        if sess is None:
            raise PanelError(401, "error.login_required")
        if sess.user.role < role:
            raise PanelError(403, "error.forbidden", role.label)
        if (
            mutating
            and not sess.via_token
            and not tokens_equal(request.headers.get(CSRF_HEADER, ""), sess.csrf)
        ):
            raise PanelError(403, "error.csrf")
        return sess

    return dep


Operator = Annotated[Session, Depends(need(Role.OPERATOR))]
Technician = Annotated[Session, Depends(need(Role.TECHNICIAN))]
OperatorW = Annotated[Session, Depends(need(Role.OPERATOR, mutating=True))]
TechnicianW = Annotated[Session, Depends(need(Role.TECHNICIAN, mutating=True))]
AdminW = Annotated[Session, Depends(need(Role.ADMIN, mutating=True))]
PartFilters = tuple[str | None, str | None, str | None, str | None]
PartId = Annotated[int, PathParam(ge=0, le=2**62)]


def part_filters(
    verdict: Annotated[Literal["OK", "NG", "ERROR"] | None, Query()] = None,
    defect_class: Annotated[str | None, Query(max_length=100)] = None,
    since: Annotated[
        str | None, Query(max_length=40, description="Local time, ISO 8601 (2026-11-21T22:00)")
    ] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
) -> PartFilters:
    """History filters shared by /api/parts and /api/parts.csv."""
    return verdict, defect_class, since, until


# ---------------------------------------------------------------------------


def create_app(
    backend: PanelBackend,
    cfg: PanelConfig,
    data_dir: Path,
    *,
    teach_argv: TeachArgv = default_teach_argv,
) -> FastAPI:
    """The panel app for one appliance. ``data_dir`` holds panel.sqlite, datasets and jobs.

    ``teach_argv`` builds the teach job's command line (default: ``lineinspect
    teach`` then a scoring pass, see :mod:`edge.web.teachjob`).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["time"] = fmt_time
    templates.env.globals["LANGUAGES"] = LANGUAGES
    templates.env.globals["display_value"] = display_value
    templates.env.filters["dig"] = get_path
    templates.env.filters["numeric_leaves"] = numeric_leaves
    db = PanelDb(
        data_dir / "panel.sqlite", cfg.password_hash_time_cost, cfg.password_hash_memory_kib
    )
    state = PanelState(
        backend=backend,
        cfg=cfg,
        data_dir=data_dir,
        db=db,
        limiter=LoginLimiter(cfg.login_max_failures, cfg.login_window_s),
        templates=templates,
        metrics=None,  # type: ignore[arg-type]
        teach=TeachService(data_dir, backend, teach_argv),
    )
    state.metrics = PanelMetrics(backend, state.system)

    app = FastAPI(
        title="LineInspect panel API",
        version=__version__,
        description="JSON API of the LineInspect technician panel. Authenticate with a bearer "
        "API token (`lineinspect panel token add`) or a panel session cookie; cookie "
        "sessions must also send the X-CSRF-Token header on changes.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.panel = state
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # -- middleware and errors ---------------------------------------------
    @app.middleware("http")
    async def headers_and_metrics(request: Request, call_next: Callable[..., Any]) -> Response:
        t0 = time.perf_counter()
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self'; frame-ancestors 'none'; form-action 'self'",
        )
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        state.metrics.requests.labels(request.method, str(response.status_code)).inc()
        state.metrics.latency.labels(request.method).observe(time.perf_counter() - t0)
        return response

    def lang_of(request: Request) -> str:
        lang = request.cookies.get(LANG_COOKIE, "")
        return lang if lang in LANGUAGES else state.cfg.language

    def wants_html(request: Request) -> bool:
        return not request.url.path.startswith(("/api/", "/metrics", "/media/"))

    @app.exception_handler(PanelError)
    async def on_problem(request: Request, exc: PanelError) -> Response:
        lang = lang_of(request)
        message = translate(lang, exc.key)
        if exc.key == "error.forbidden":  # "needs the {role} role", role in this language
            message = translate(lang, exc.key, role=translate(lang, f"role.{exc.detail}"))
            exc.detail = ""
        if exc.status == 401 and wants_html(request):
            if not state.db.has_users():
                return RedirectResponse("/setup", status_code=303)
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
        if wants_html(request):
            sess = current_session(request, None, request.cookies.get(SESSION_COOKIE))
            return render(
                request,
                "error.html",
                sess,
                status_code=exc.status,
                message=message,
                detail=exc.detail,
            )
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        text = message + (f": {exc.detail}" if exc.detail else "")
        if exc.status == 422:  # the same shape as FastAPI's own validation errors
            body: dict[str, Any] = {
                "detail": [{"loc": list(exc.loc), "msg": text, "type": "value_error"}]
            }
        else:
            body = {"detail": text}
        return JSONResponse(body, status_code=exc.status, headers=headers)

    async def form_of(request: Request, sess: Session | None = None, pre: bool = False) -> FormData:
        """The submitted form, after its CSRF token is checked."""
        form = await request.form(max_files=2000, max_fields=2000)
        token = str(form.get(CSRF_FIELD) or "")
        expected = (
            request.cookies.get(PRE_COOKIE, "") if pre else (sess.csrf if sess is not None else "")
        )
        if not tokens_equal(token, expected):
            raise PanelError(403, "error.csrf")
        return form

    def render(
        request: Request, template: str, sess: Session | None, status_code: int = 200, **ctx: Any
    ) -> HTMLResponse:
        lang = lang_of(request)

        def t(key: str, **values: object) -> str:
            return translate(lang, key, **values)

        return state.templates.TemplateResponse(
            request,
            template,
            {
                "t": t,
                "lang": lang,
                "sess": sess,
                "user": sess.user if sess else None,
                "Role": Role,
                "csrf": sess.csrf if sess else "",
                "path": request.url.path,
                "cfg": state.cfg,
                "version": __version__,
                **ctx,
            },
            status_code=status_code,
        )

    def audit(  # noqa: PLR0917
        sess: Session,
        request: Request,
        action: str,
        target: str = "",
        old: Any = None,
        new: Any = None,
    ) -> None:
        state.db.audit(sess.user.username, action, target, old, new, client_of(request))

    # ======================================================================
    # First run, login, logout, language

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return RedirectResponse("/live" if state.db.has_users() else "/setup", 303)

    def pre_form(
        request: Request, template: str, status_code: int = 200, **ctx: Any
    ) -> HTMLResponse:
        import secrets

        token = request.cookies.get(PRE_COOKIE) or secrets.token_urlsafe(32)
        resp = render(request, template, None, status_code=status_code, pre_csrf=token, **ctx)
        resp.set_cookie(
            PRE_COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=state.cfg.secure_cookies,
            path="/",
        )
        return resp

    def start_session(
        request: Request, user_sess: Session | None, username: str, target: str
    ) -> Response:
        user = state.db.user(username)
        assert user is not None
        token, _ = state.db.open_session(user, state.cfg.session_ttl_s)
        resp = RedirectResponse(safe_next(target), status_code=303)
        resp.set_cookie(
            SESSION_COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=state.cfg.secure_cookies,
            max_age=int(state.cfg.session_ttl_s),
            path="/",
        )
        resp.delete_cookie(PRE_COOKIE, path="/")
        return resp

    @app.get("/setup", include_in_schema=False)
    def setup_page(request: Request) -> Response:
        if state.db.has_users():
            return RedirectResponse("/login", 303)
        return pre_form(request, "setup.html")

    @app.post("/setup", include_in_schema=False)
    async def setup_submit(request: Request) -> Response:
        form = await form_of(request, pre=True)
        username = str(form.get("username") or "").strip()
        password = str(form.get("password") or "")
        if password != str(form.get("password2") or ""):
            return pre_form(
                request,
                "setup.html",
                422,
                error=translate(lang_of(request), "error.password_mismatch"),
                username=username,
            )
        try:
            state.db.create_first_admin(username, password)
        except AuthError as exc:
            if state.db.has_users():
                raise PanelError(409, "error.already_setup") from None
            return pre_form(request, "setup.html", 422, error=str(exc), username=username)
        state.db.audit(username, "user.create_admin", username, None, "admin", client_of(request))
        return start_session(request, None, username, "/live")

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request, next: str = "/live") -> Response:
        if not state.db.has_users():
            return RedirectResponse("/setup", 303)
        return pre_form(request, "login.html", next=safe_next(next))

    @app.post("/login", include_in_schema=False)
    async def login_submit(request: Request) -> Response:
        form = await form_of(request, pre=True)
        username = str(form.get("username") or "").strip()[:64]
        password = str(form.get("password") or "")[:1024]
        target = safe_next(str(form.get("next") or "/live"))
        client = client_of(request)
        wait = state.limiter.retry_after_s(client, username)
        lang = lang_of(request)
        if wait > 0:
            resp = pre_form(
                request,
                "login.html",
                429,
                next=target,
                username=username,
                error=translate(lang, "login.too_many", s=math.ceil(wait)),
            )
            resp.headers["Retry-After"] = str(math.ceil(wait))
            return resp
        user = state.db.verify_password(username, password)
        if user is None:
            state.limiter.failed(client, username)
            state.db.audit(username or "?", "login.failed", username, None, None, client)
            return pre_form(
                request,
                "login.html",
                401,
                next=target,
                username=username,
                error=translate(lang, "login.failed"),
            )
        state.limiter.succeeded(client, username)
        state.db.audit(username, "login", username, None, None, client)
        return start_session(request, None, username, target)

    @app.post("/logout", include_in_schema=False)
    async def logout(
        request: Request, sess: Annotated[Session | None, Depends(current_session)]
    ) -> Response:
        if sess is not None:
            await form_of(request, sess)
            token = request.cookies.get(SESSION_COOKIE)
            if token:
                state.db.close_session(token)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @app.get("/lang/{code}", include_in_schema=False)
    def set_lang(code: str, next: str = "/live") -> Response:
        resp = RedirectResponse(safe_next(next), status_code=303)
        if code in LANGUAGES:
            resp.set_cookie(LANG_COOKIE, code, max_age=365 * 86400, samesite="lax", path="/")
        return resp

    # ======================================================================
    # Pages

    def page_session(request: Request, role: Role) -> Session:
        auth = request.headers.get("authorization", "")
        cred = None
        if auth[:7].lower() == "bearer " and auth[7:].strip():
            cred = HTTPAuthorizationCredentials(scheme="Bearer", credentials=auth[7:].strip())
        sess = current_session(request, cred, request.cookies.get(SESSION_COOKIE))
        if sess is None:
            raise PanelError(401, "error.login_required")
        if sess.user.role < role:
            raise PanelError(403, "error.forbidden", role.label)
        return sess

    @app.get("/live", include_in_schema=False)
    def live_page(request: Request) -> Response:
        sess = page_session(request, Role.OPERATOR)
        return render(request, "live.html", sess, health=backend.health())

    @app.post("/threshold", include_in_schema=False)
    async def threshold_form(request: Request) -> Response:
        sess = page_session(request, Role.TECHNICIAN)
        form = await form_of(request, sess)
        text = str(form.get("threshold") or "").strip()
        try:
            value = None if text == "" else float(text)
            if value is not None and not (math.isfinite(value) and 0 <= value <= 1000):
                raise ValueError
        except ValueError:
            raise PanelError(422, "error.bad_threshold", text) from None
        set_threshold(sess, request, value)
        return RedirectResponse(safe_next(str(form.get("next") or "/live")), 303)

    def set_threshold(sess: Session, request: Request, value: float | None) -> None:
        old = backend.health().threshold
        try:
            backend.set_threshold(value)
        except ValueError as exc:
            raise PanelError(422, "error.bad_threshold", str(exc)) from None
        audit(sess, request, "threshold.set", "pipeline.threshold", old, value)

    def history_query(  # noqa: PLR0917
        verdict: str | None,
        defect_class: str | None,
        since: str | None,
        until: str | None,
        limit: int,
        offset: int,
    ) -> PartQuery:
        code = None
        if verdict:
            try:
                code = VerdictCode[verdict.upper()]
            except KeyError:
                raise PanelError(422, "error.bad_verdict", verdict, ("query", "verdict")) from None
        return PartQuery(
            code=code,
            defect_class=defect_class or None,
            since_unix=parse_local_time(since, "since"),
            until_unix=parse_local_time(until, "until"),
            limit=limit,
            offset=offset,
        )

    @app.get("/history", include_in_schema=False)
    def history_page(  # noqa: PLR0917
        request: Request,
        verdict: str = "",
        defect_class: str = "",
        since: str = "",
        until: str = "",
        page: Annotated[int, Query(ge=1, le=100000)] = 1,
    ) -> Response:
        sess = page_session(request, Role.OPERATOR)
        per_page = 25
        q = history_query(verdict, defect_class, since, until, per_page, (page - 1) * per_page)
        result = backend.query_parts(q)
        acks = state.db.acks([p.inspection_id for p in result.parts])
        pages = max(1, math.ceil(result.total / per_page))
        filters = {"verdict": verdict, "defect_class": defect_class, "since": since, "until": until}
        qs = "&".join(f"{k}={quote(v)}" for k, v in filters.items() if v)
        return render(
            request,
            "history.html",
            sess,
            parts=result.parts,
            total=result.total,
            page=page,
            pages=pages,
            filters=filters,
            qs=qs,
            acks=acks,
            classes=backend.defect_classes(),
        )

    @app.get("/parts/{inspection_id}", include_in_schema=False)
    def part_page(request: Request, inspection_id: int) -> Response:
        sess = page_session(request, Role.OPERATOR)
        part = backend.part(inspection_id)
        if part is None:
            raise PanelError(404, "error.no_part", str(inspection_id))
        acks = state.db.acks([inspection_id])
        return render(request, "part.html", sess, part=part, ack=acks.get(inspection_id))

    @app.post("/parts/{inspection_id}/ack", include_in_schema=False)
    async def part_ack(request: Request, inspection_id: int) -> Response:
        sess = page_session(request, Role.OPERATOR)
        form = await form_of(request, sess)
        acknowledge(sess, request, inspection_id, str(form.get("note") or ""))
        return RedirectResponse(f"/parts/{inspection_id}", 303)

    def acknowledge(sess: Session, request: Request, inspection_id: int, note: str) -> None:
        if backend.part(inspection_id) is None:
            raise PanelError(404, "error.no_part", str(inspection_id))
        state.db.acknowledge(inspection_id, sess.user.username, note)
        audit(sess, request, "part.acknowledge", str(inspection_id), None, note[:500])

    @app.get("/models", include_in_schema=False)
    def models_page(request: Request, confirm: str = "") -> Response:
        sess = page_session(request, Role.OPERATOR)
        slots = {s.slot: s for s in backend.model_slots()}
        if confirm and confirm not in {"activate", "rollback"}:
            confirm = ""
        if confirm and sess.user.role < Role.ADMIN:
            raise PanelError(403, "error.forbidden", Role.ADMIN.label)
        return render(request, "models.html", sess, slots=slots, SlotName=SlotName, confirm=confirm)

    @app.post("/models/{action}", include_in_schema=False)
    async def models_action(request: Request, action: str) -> Response:
        sess = page_session(request, Role.ADMIN)
        form = await form_of(request, sess)
        if action not in {"activate", "rollback"}:
            raise PanelError(404, "error.not_found", action)
        if form.get("confirm") != "yes":
            return RedirectResponse(f"/models?confirm={action}", 303)
        model_action(sess, request, action)
        return RedirectResponse("/models", 303)

    def model_action(sess: Session, request: Request, action: str) -> ModelSlot:
        before = {s.slot.value: f"{s.name} {s.version}".strip() for s in backend.model_slots()}
        try:
            slot = backend.activate_staged() if action == "activate" else backend.rollback()
        except ValueError as exc:
            raise PanelError(409, "error.model_refused", str(exc)) from None
        audit(
            sess,
            request,
            f"model.{action}",
            "active",
            before.get("active"),
            f"{slot.name} {slot.version}",
        )
        return slot

    @app.get("/settings", include_in_schema=False)
    def settings_page(request: Request) -> Response:
        sess = page_session(request, Role.TECHNICIAN)
        return settings_render(request, sess)

    def editable_sections(sess: Session) -> set[str]:
        keys = {s.key for s in state.sections()}
        return keys if sess.user.role >= Role.ADMIN else keys & TECHNICIAN_SECTIONS

    def settings_render(
        request: Request, sess: Session, status_code: int = 200, **ctx: Any
    ) -> HTMLResponse:
        current_cfg = backend.config().model_dump(mode="json")
        ctx.setdefault("errors", {})
        ctx.setdefault("raw", {})
        return render(
            request,
            "settings.html",
            sess,
            status_code=status_code,
            sections=localize(state.sections(), lang_of(request)),
            values=current_cfg,
            editable=editable_sections(sess),
            **ctx,
        )

    @app.post("/settings", include_in_schema=False)
    async def settings_submit(request: Request) -> Response:
        sess = page_session(request, Role.TECHNICIAN)
        form = await form_of(request, sess)
        fields = {k: str(v) for k, v in form.items() if isinstance(v, str)}
        result = apply_settings(sess, request, fields)
        if isinstance(result, dict):
            return settings_render(request, sess, 422, errors=result, raw=fields)
        return settings_render(request, sess, applied=result)

    def apply_settings(
        sess: Session, request: Request, fields: dict[str, str]
    ) -> ApplyOut | dict[str, str]:
        old_cfg = backend.config()
        old = old_cfg.model_dump(mode="json")
        parsed = parse_form(
            state.sections(),
            fields,
            old,
            type(old_cfg),
            editable_sections(sess),
            lang=lang_of(request),
        )
        if parsed.errors or parsed.model is None:
            return parsed.errors
        return apply_model(sess, request, old, parsed.model)

    def apply_model(
        sess: Session, request: Request, old: dict[str, Any], model: BaseModel
    ) -> ApplyOut:
        new = model.model_dump(mode="json")
        changes = diff(old, new)
        if not changes:
            return ApplyOut(applied=[], restart_required=[], changed=[])
        allowed = editable_sections(sess)
        denied = [k for k in changes if k.split(".")[0] not in allowed]
        if denied:
            raise PanelError(403, "error.forbidden_section", ", ".join(denied))
        try:
            res = backend.apply_config(model)  # type: ignore[arg-type]
        except ValueError as exc:
            raise PanelError(422, "error.config_refused", str(exc)) from None
        audit(
            sess,
            request,
            "config.apply",
            ",".join(changes),
            {k: v[0] for k, v in changes.items()},
            {k: v[1] for k, v in changes.items()},
        )
        return ApplyOut(
            applied=list(res.applied),
            restart_required=list(res.restart_required),
            changed=list(changes),
        )

    @app.get("/health", include_in_schema=False)
    def health_page(request: Request) -> Response:
        sess = page_session(request, Role.OPERATOR)
        return render(
            request,
            "health.html",
            sess,
            h=health_out(),
            events=list(reversed(backend.recent_events(50))),
        )

    @app.get("/audit", include_in_schema=False)
    def audit_page(request: Request, page: Annotated[int, Query(ge=1, le=100000)] = 1) -> Response:
        sess = page_session(request, Role.TECHNICIAN)
        entries, total = state.db.audit_entries(50, (page - 1) * 50)
        return render(
            request,
            "audit.html",
            sess,
            entries=entries,
            page=page,
            pages=max(1, math.ceil(total / 50)),
        )

    @app.get("/users", include_in_schema=False)
    def users_page(request: Request) -> Response:
        sess = page_session(request, Role.ADMIN)
        return render(request, "users.html", sess, users=state.db.users(), tokens=state.db.tokens())

    @app.post("/users", include_in_schema=False)
    async def users_submit(request: Request) -> Response:
        sess = page_session(request, Role.ADMIN)
        form = await form_of(request, sess)
        action = str(form.get("action") or "")
        username = str(form.get("username") or "").strip()
        new_token = None
        try:
            if action == "add":
                role = Role.parse(str(form.get("role") or ""))
                state.db.create_user(username, str(form.get("password") or ""), role)
                audit(sess, request, "user.add", username, None, role.label)
            elif action == "role":
                role = Role.parse(str(form.get("role") or ""))
                old_user = state.db.user(username)
                state.db.set_role(username, role)
                audit(
                    sess,
                    request,
                    "user.role",
                    username,
                    old_user.role.label if old_user else None,
                    role.label,
                )
            elif action == "password":
                state.db.set_password(username, str(form.get("password") or ""))
                audit(sess, request, "user.password", username)
            elif action == "delete":
                state.db.delete_user(username)
                audit(sess, request, "user.delete", username)
            elif action == "token":
                new_token, tok = state.db.create_token(username, str(form.get("name") or ""))
                audit(sess, request, "token.add", f"{tok.id}:{tok.name}", None, username)
            elif action == "revoke":
                tid = int(str(form.get("token_id") or "0"))
                state.db.revoke_token(tid)
                audit(sess, request, "token.revoke", str(tid))
            else:
                raise PanelError(422, "error.bad_action", action)
        except (AuthError, ValueError) as exc:
            return render(
                request,
                "users.html",
                sess,
                422,
                users=state.db.users(),
                tokens=state.db.tokens(),
                error=str(exc),
            )
        return render(
            request,
            "users.html",
            sess,
            users=state.db.users(),
            tokens=state.db.tokens(),
            new_token=new_token,
            done=translate(lang_of(request), "users.saved"),
        )

    @app.get("/account", include_in_schema=False)
    def account_page(request: Request) -> Response:
        sess = page_session(request, Role.OPERATOR)
        return render(request, "account.html", sess)

    @app.post("/account", include_in_schema=False)
    async def account_submit(request: Request) -> Response:
        sess = page_session(request, Role.OPERATOR)
        form = await form_of(request, sess)
        lang = lang_of(request)
        if state.db.verify_password(sess.user.username, str(form.get("old") or "")) is None:
            return render(
                request, "account.html", sess, 422, error=translate(lang, "account.wrong_password")
            )
        new = str(form.get("password") or "")
        if new != str(form.get("password2") or ""):
            return render(
                request, "account.html", sess, 422, error=translate(lang, "error.password_mismatch")
            )
        try:
            state.db.set_password(sess.user.username, new)
        except AuthError as exc:
            return render(request, "account.html", sess, 422, error=str(exc))
        audit(sess, request, "user.password", sess.user.username)
        resp = RedirectResponse("/login", 303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    # -- teach ----------------------------------------------------------------
    @app.get("/teach", include_in_schema=False)
    def teach_page(request: Request, dataset: str = "") -> Response:
        sess = page_session(request, Role.TECHNICIAN)
        datasets = state.teach.datasets()
        chosen = dataset if any(d.name == dataset for d in datasets) else ""
        return render(
            request,
            "teach.html",
            sess,
            datasets=datasets,
            chosen=chosen,
            jobs=state.teach.jobs(),
            result=state.teach.latest_result(chosen) if chosen else None,
            defect_names=state.teach.defect_names(),
        )

    @app.post("/teach/{action}", include_in_schema=False)
    async def teach_action(request: Request, action: str) -> Response:
        sess = page_session(request, Role.TECHNICIAN)
        form = await form_of(request, sess)
        name = str(form.get("dataset") or "").strip()
        try:
            if action == "collect":
                count = int(str(form.get("count") or "0"))
                job = state.teach.collect(name, count)
            elif action == "upload":
                files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
                label = str(form.get("label") or "good")

                def store_all() -> int:  # decoding and writing off the event loop
                    return sum(
                        state.teach.add_image(name, label, f.filename or "upload", f.file.read())
                        for f in files
                    )

                stored = await run_in_threadpool(store_all)
                job = None
                audit(
                    sess, request, "dataset.upload", name, None, {"label": label, "files": stored}
                )
            elif action == "teach":
                job = state.teach.start_teach(name)
            elif action == "promote":
                job_id = str(form.get("job") or "")
                pkg = state.teach.package_of(job_id)
                slot = backend.stage_model(pkg)
                audit(sess, request, "model.stage", "staged", None, f"{slot.name} {slot.version}")
                threshold = str(form.get("threshold") or "").strip()
                if threshold:
                    audit(sess, request, "teach.suggested_threshold", name, None, threshold)
                return RedirectResponse("/models", 303)
            else:
                raise PanelError(404, "error.not_found", action)
        except (ValueError, OSError) as exc:
            raise PanelError(422, "error.teach_refused", str(exc)) from None
        if job is not None:
            audit(sess, request, f"teach.{action}", name, None, job.id)
        return RedirectResponse(f"/teach?dataset={quote(name)}", 303)

    # ======================================================================
    # Media (images)

    @app.get("/media/live.jpg", include_in_schema=False)
    def live_jpeg(request: Request, overlay: int = 1) -> Response:
        page_session(request, Role.OPERATOR)
        live = backend.latest()
        if live is None:
            raise PanelError(404, "live.no_parts")
        v = live.verdict

        def make() -> bytes:
            img = (
                draw_live(live.image, live.anomaly_map, v.regions, v.threshold, v.code)
                if overlay
                else live.image
            )
            return encode_jpeg(img, 85, 1280)

        data = state.live_cache.get((v.inspection_id, bool(overlay)), make)
        return Response(
            data,
            media_type="image/jpeg",
            headers={"Cache-Control": "no-store", "X-Inspection-Id": str(v.inspection_id)},
        )

    @app.get("/media/parts/{inspection_id}/{kind}", include_in_schema=False)
    def part_media(request: Request, inspection_id: int, kind: str) -> Response:
        page_session(request, Role.OPERATOR)
        if kind == "thumb":
            part = backend.part(inspection_id)
            src = None
            if part is not None:
                # NG/ERROR: show where the defect is; OK: show the part as it was.
                prefer_heatmap = part.code is not VerdictCode.OK and part.has_heatmap
                if prefer_heatmap or (part.has_heatmap and not part.has_image):
                    src = backend.part_file(inspection_id, "heatmap")
                elif part.has_image:
                    src = backend.part_file(inspection_id, "image")
            if src is None:
                raise PanelError(404, "error.no_image")
            path = src

            def make() -> bytes | None:
                img = read_image(path)
                return None if img is None else encode_jpeg(img, 80, 200)

            data = state.thumb_cache.get((inspection_id, str(path)), make)
            if data is None:
                raise PanelError(404, "error.no_image")
            return Response(
                data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}
            )
        if kind not in {"image", "heatmap"}:
            raise PanelError(404, "error.no_image")
        file = backend.part_file(inspection_id, kind)  # type: ignore[arg-type]
        if file is None or not file.is_file():
            raise PanelError(404, "error.no_image")
        media = "image/png" if file.suffix.lower() == ".png" else "image/jpeg"
        return FileResponse(
            file, media_type=media, headers={"Cache-Control": "private, max-age=3600"}
        )

    # ======================================================================
    # JSON API

    api_errors: dict[int | str, dict[str, Any]] = {
        401: {"description": "Not logged in / bad token", "model": ErrorOut},
        403: {"description": "Role too low or CSRF token missing", "model": ErrorOut},
    }

    @app.get("/api/me", response_model=MeOut, responses=api_errors, tags=["auth"])
    def api_me(sess: Operator) -> MeOut:
        """Who is calling."""
        return MeOut(
            username=sess.user.username,
            role=sess.user.role.label,
            via_token=sess.via_token,
        )

    def live_body() -> bytes:
        live = backend.latest()
        part = None
        if live is not None:
            v = live.verdict
            part = part_out(PartRecord.from_verdict(v))
        out = LiveOut(
            part=part,
            live_image_url=f"/media/live.jpg?id={part.inspection_id}" if part else None,
            threshold=backend.health().threshold,
            stats=state.stats(3600.0, 60.0, LIVE_STATS_TTL_S),
        )
        return out.model_dump_json().encode()

    @app.get("/api/live", response_model=LiveOut, responses=api_errors, tags=["live"])
    def api_live(sess: Operator) -> Response:
        """The last part, the threshold in force and last hour's statistics."""
        # Built at most once per LIVE_BODY_TTL_S however many screens poll.
        return Response(state.live_cached(live_body), media_type="application/json")

    @app.get("/api/stats", response_model=StatsOut, responses=api_errors, tags=["live"])
    def api_stats(
        sess: Operator,
        window_s: Annotated[float, Query(ge=60, le=30 * 86400, allow_inf_nan=False)] = 3600.0,
        bucket_s: Annotated[float, Query(ge=10, le=86400, allow_inf_nan=False)] = 60.0,
    ) -> StatsOut:
        """Counts, yield, throughput and latency over a window, in buckets."""
        if window_s / bucket_s > 5000:
            raise PanelError(422, "error.too_many_buckets")
        return state.stats(window_s, bucket_s, STATS_TTL_S)

    @app.get("/api/parts", response_model=PartPageOut, responses=api_errors, tags=["history"])
    def api_parts(
        sess: Operator,
        filters: Annotated[PartFilters, Depends(part_filters)],
        limit: Annotated[int, Query(ge=1, le=SAFE_HISTORY_LIMIT)] = 50,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> PartPageOut:
        """Stored parts, newest first, filtered by verdict, defect class and time."""
        q = history_query(*filters, limit=limit, offset=offset)
        page = backend.query_parts(q)
        acks = state.db.acks([p.inspection_id for p in page.parts])
        return PartPageOut(
            parts=[part_out(p, acks.get(p.inspection_id, (None,))[0]) for p in page.parts],
            total=page.total,
            limit=limit,
            offset=offset,
        )

    @app.get(
        "/api/parts.csv",
        responses={**api_errors, 200: {"content": {"text/csv": {}}}},
        response_class=StreamingResponse,
        tags=["history"],
    )
    def api_parts_csv(
        sess: Operator,
        filters: Annotated[PartFilters, Depends(part_filters)],
        max_rows: Annotated[int, Query(ge=1, le=1_000_000)] = 100_000,
    ) -> StreamingResponse:
        """The filtered history as CSV (one row per part)."""
        first = history_query(*filters, limit=1, offset=0)

        def rows() -> Iterator[str]:
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(
                [
                    "inspection_id",
                    "time",
                    "decided_unix",
                    "verdict",
                    "score",
                    "threshold",
                    "defect_class",
                    "regions",
                    "model",
                    "model_version",
                    "latency_ms",
                    "trigger_id",
                    "error",
                ]
            )
            offset = 0
            while offset < max_rows:
                chunk = min(1000, max_rows - offset)
                page = backend.query_parts(
                    PartQuery(
                        code=first.code,
                        defect_class=first.defect_class,
                        since_unix=first.since_unix,
                        until_unix=first.until_unix,
                        limit=chunk,
                        offset=offset,
                    )
                )
                for p in page.parts:
                    w.writerow(
                        [
                            p.inspection_id,
                            fmt_time(p.decided_unix),
                            f"{p.decided_unix:.3f}",
                            p.code.name,
                            "" if not math.isfinite(p.score) else f"{p.score:.4f}",
                            f"{p.threshold:.4f}",
                            p.defect_class,
                            len(p.regions),
                            p.model_name,
                            p.model_version,
                            f"{p.timings_ms.get('total', float('nan')):.2f}",
                            "" if p.trigger_id is None else p.trigger_id,
                            p.error,
                        ]
                    )
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
                if len(page.parts) < chunk:
                    break
                offset += chunk

        return StreamingResponse(
            rows(),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="lineinspect-parts.csv"'},
        )

    @app.get(
        "/api/parts/{inspection_id}",
        response_model=PartOut,
        responses={**api_errors, 404: {"description": "No such part", "model": ErrorOut}},
        tags=["history"],
    )
    def api_part(sess: Operator, inspection_id: PartId) -> PartOut:
        """One stored part."""
        p = backend.part(inspection_id)
        if p is None:
            raise PanelError(404, "error.no_part", str(inspection_id))
        return part_out(p, state.db.acks([inspection_id]).get(inspection_id, (None,))[0])

    @app.post(
        "/api/parts/{inspection_id}/ack",
        response_model=OkOut,
        responses={**api_errors, 404: {"description": "No such part", "model": ErrorOut}},
        tags=["history"],
    )
    def api_ack(sess: OperatorW, request: Request, inspection_id: PartId, body: AckIn) -> OkOut:
        """Acknowledge a part (operator and up)."""
        acknowledge(sess, request, inspection_id, body.note)
        return OkOut()

    @app.put(
        "/api/threshold",
        response_model=OkOut,
        responses={**api_errors, 422: {"description": "Refused threshold"}},
        tags=["settings"],
    )
    def api_threshold(sess: TechnicianW, request: Request, body: ThresholdIn) -> OkOut:
        """Set the image threshold for the next parts (technician and up)."""
        set_threshold(sess, request, body.threshold)
        return OkOut()

    @app.get("/api/config", response_model=dict[str, Any], responses=api_errors, tags=["settings"])
    def api_config(sess: Technician) -> dict[str, Any]:
        """The configuration in force."""
        result: dict[str, Any] = backend.config().model_dump(mode="json")
        return result

    @app.get(
        "/api/config/schema", response_model=dict[str, Any], responses=api_errors, tags=["settings"]
    )
    def api_config_schema(sess: Technician) -> dict[str, Any]:
        """The configuration's JSON schema (what the Settings page is built from)."""
        schema: dict[str, Any] = type(backend.config()).model_json_schema()
        return schema

    @app.put(
        "/api/config",
        response_model=ApplyOut,
        responses={**api_errors, 422: {"description": "Invalid or refused config"}},
        tags=["settings"],
    )
    def api_put_config(
        sess: TechnicianW, request: Request, body: dict[str, Any]
    ) -> ApplyOut | JSONResponse:
        """Replace the configuration (whole document); sections beyond the role are refused."""
        from pydantic import ValidationError

        old_cfg = backend.config()
        try:
            model = type(old_cfg).model_validate(body)
        except ValidationError as exc:
            problems = [
                {"loc": ["body", *(str(p) for p in e["loc"])], "msg": e["msg"], "type": e["type"]}
                for e in exc.errors()
            ]
            return JSONResponse({"detail": problems}, status_code=422)
        return apply_model(sess, request, old_cfg.model_dump(mode="json"), model)

    @app.get("/api/models", response_model=list[SlotOut], responses=api_errors, tags=["models"])
    def api_models(sess: Operator) -> list[SlotOut]:
        """The active, staged and previous model slots."""
        return [slot_out(s) for s in backend.model_slots()]

    @app.post(
        "/api/models/{action}",
        response_model=SlotOut,
        responses={
            **api_errors,
            409: {"description": "Refused (e.g. empty slot)", "model": ErrorOut},
        },
        tags=["models"],
    )
    def api_model_action(
        sess: AdminW, request: Request, action: Literal["activate", "rollback"]
    ) -> SlotOut:
        """Activate the staged model or roll back to the previous one (admin)."""
        return slot_out(model_action(sess, request, action))

    def health_out() -> HealthOut:
        h = backend.health()
        s = state.system()
        return HealthOut(
            camera_connected=h.camera_connected,
            camera_fps=_finite(h.camera_fps),
            camera_dropped_frames=h.camera_dropped_frames,
            backend_name=h.backend_name,
            backend_latency_ms_p50=_finite(h.backend_latency_ms_p50),
            backend_latency_ms_p99=_finite(h.backend_latency_ms_p99),
            pipeline_running=h.pipeline_running,
            threshold=h.threshold,
            plc_connected=h.plc_connected,
            plc_last_trigger_unix=h.plc_last_trigger_unix,
            uplink_state=h.uplink_state,
            uplink_outbox_depth=h.uplink_outbox_depth,
            disk_path=s.disk_path,
            disk_total_bytes=s.disk_total_bytes,
            disk_free_bytes=s.disk_free_bytes,
            cpu_percent=s.cpu_percent,
            cpu_temp_c=s.cpu_temp_c,
            gpu_temp_c=s.gpu_temp_c,
            memory_used_ratio=s.memory_used_ratio,
            extra={k: v for k, v in h.extra.items() if math.isfinite(v)},
        )

    @app.get("/api/health", response_model=HealthOut, responses=api_errors, tags=["health"])
    def api_health(sess: Operator) -> HealthOut:
        """Camera, backend, PLC, uplink and machine health."""
        return health_out()

    @app.get("/api/events", response_model=list[EventOut], responses=api_errors, tags=["health"])
    def api_events(
        sess: Operator, limit: Annotated[int, Query(ge=1, le=500)] = 100
    ) -> list[EventOut]:
        """The last status events, newest last."""
        return [event_out(e) for e in backend.recent_events(limit)]

    @app.get("/api/datasets", response_model=list[DatasetOut], responses=api_errors, tags=["teach"])
    def api_datasets(sess: Technician) -> list[DatasetOut]:
        """Teaching datasets on this appliance."""
        return [
            DatasetOut(
                name=d.name,
                good_train=d.good_train,
                good_test=d.good_test,
                defective=dict(d.defective),
            )
            for d in state.teach.datasets()
        ]

    @app.get("/api/jobs", response_model=list[JobOut], responses=api_errors, tags=["teach"])
    def api_jobs(sess: Technician) -> list[JobOut]:
        """Collect / teach jobs, newest first."""
        return [JobOut(**j.as_dict()) for j in state.teach.jobs()]

    @app.get("/api/audit", responses=api_errors, tags=["auth"], response_model=list[dict[str, Any]])
    def api_audit(
        sess: Technician,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> list[dict[str, Any]]:
        """The audit log, newest first: who changed what, when, old and new value."""
        entries, _ = state.db.audit_entries(limit, offset)
        return [
            {
                "id": e.id,
                "time_unix": e.time_unix,
                "username": e.username,
                "action": e.action,
                "target": e.target,
                "old": e.old,
                "new": e.new,
                "client": e.client,
            }
            for e in entries
        ]

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        if not state.cfg.metrics_public:
            auth = request.headers.get("authorization", "")
            sess = None
            if auth.lower().startswith("bearer "):
                sess = state.db.token_session(auth[7:].strip())
            elif request.cookies.get(SESSION_COOKIE):
                sess = state.db.session(request.cookies[SESSION_COOKIE])
            if sess is None:
                return PlainTextResponse(
                    "authentication required\n", 401, headers={"WWW-Authenticate": "Bearer"}
                )
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class PanelServer:
    """The panel served by uvicorn in a background thread. A :class:`~edge.types.Component`.

    ``lineinspect run``/``demo`` start it after the pipeline: it only reads the
    backend from uvicorn's worker threads, never from the pipeline thread.
    """

    name = "panel"

    def __init__(
        self,
        backend: PanelBackend,
        cfg: PanelConfig,
        data_dir: Path,
        *,
        teach_argv: TeachArgv = default_teach_argv,
    ) -> None:
        self.cfg = cfg
        self.app = create_app(backend, cfg, data_dir, teach_argv=teach_argv)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"http://{host}:{self.cfg.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        """Bind and serve; raises OSError when the address cannot be bound."""
        import uvicorn

        config = uvicorn.Config(
            self.app,
            host=self.cfg.host,
            port=self.cfg.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="panel", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"web panel could not listen on {self.url}")
            time.sleep(0.02)
        log.info("web panel on %s", self.url)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._thread = None
