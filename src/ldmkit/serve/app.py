"""The FastAPI application: the page at `/`, the A1111 API under /sdapi/v1, OpenAPI docs at /docs.

Every generation request is checked (`schema`) on the event loop, then queued for the one worker
thread (`worker`); the request awaits its job's Future, so the event loop stays free for /progress and
/interrupt while images are drawn. With `auth` every path (page, API, docs) asks for HTTP basic
credentials, as A1111's `--api-auth user:pass[,user2:pass2]`.
"""

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import secrets
import socket
from importlib import resources
from pathlib import Path
from typing import Any

from ldmkit.errors import LdmkitError
from ldmkit.serve.generate import run_generation
from ldmkit.serve.models import ModelStore
from ldmkit.serve.schema import MAX_SIDE_FACTOR, FieldProblem, Img2ImgRequest, Txt2ImgRequest, resolve, sampler_names
from ldmkit.serve.worker import Job, QueueFull, Worker

MAX_BODY = 128 << 20  # bytes of one request: a few large images; beyond it, 413 before anything is read


def parse_auth(text: str | None) -> list[tuple[str, str]]:
    """`user:pass[,user2:pass2]` → [(user, pass), ...]; a malformed pair is an LdmkitError."""
    if not text:
        return []
    pairs = []
    for part in text.split(","):
        user, sep, password = part.strip().partition(":")
        if not sep or not user or not password:
            raise LdmkitError("--api-auth takes user:password (several: user:pass,user2:pass2)")
        pairs.append((user, password))
    return pairs


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, auth: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without credentials, unless the user says so explicitly."""
    if not is_loopback(host) and not auth and not insecure:
        raise LdmkitError(f"--host {host} lets other machines generate on this one: add --api-auth user:password "
                          "(HTTP basic), or pass --insecure-no-auth if the network is yours alone")


def check_port(host: str, port: int) -> None:
    """A port another program holds is one clear line, before any model is loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            raise LdmkitError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None


def page_html() -> str:
    return resources.files("ldmkit.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(checkpoints: list[str], queue_size: int = 8, auth: str | None = None, device: str = "cpu",
               preview_every: int = 5, store: ModelStore | None = None, lora_dir: str | None = None,
               embeddings_dir: str | None = None, tiny_decoder: str | None = None, tiny_final: bool = False,
               **speed):
    """The ASGI app serving `checkpoints` (the first is loaded now; the others when a client switches).
    `lora_dir`: LoRA files by name (`<lora:name:w>` in prompts, GET /sdapi/v1/loras); `embeddings_dir`:
    textual-inversion embeddings by name (GET /sdapi/v1/embeddings). `speed`: precision, backend,
    backend_cache (`ModelStore`)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import HTMLResponse, JSONResponse
    except ImportError:
        raise LdmkitError("ldmkit serve needs FastAPI and uvicorn: pip install 'ldmkit[serve]'") from None

    credentials = parse_auth(auth)
    store = store or ModelStore(checkpoints, device, lora_dir=lora_dir, embeddings_dir=embeddings_dir,
                                tiny_decoder=tiny_decoder, tiny_final=tiny_final, **speed)
    worker = Worker(queue_size, preview_every)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="ldmkit", version=_version(), lifespan=lifespan,
                  description="A page at / and the AUTOMATIC1111 web UI's API (/sdapi/v1) over ldmkit models.")
    app.state.store, app.state.worker = store, worker

    app.add_middleware(Guard, credentials=credentials)

    @app.exception_handler(FieldProblem)
    async def field_problem(request: Request, exc: FieldProblem):
        return JSONResponse({"detail": exc.detail()}, status_code=422)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(LdmkitError)
    async def refused(request: Request, exc: LdmkitError):  # the model refused an input the checks could not foresee
        return JSONResponse({"detail": [{"loc": ["body"], "msg": str(exc), "type": "value_error"}]}, status_code=422)

    async def run_job(job: Job, request: Request | None = None) -> Any:
        """Queue `job` and wait for it. When the client of `request` goes away, its job is dropped from the
        queue or, running, stopped at its next step: nobody is left to receive it."""
        result = asyncio.ensure_future(asyncio.wrap_future(worker.submit(job)))
        while request is not None:
            done, _ = await asyncio.wait([result], timeout=0.5)
            if done:
                break
            if await request.is_disconnected():
                if not job.future.cancel():
                    worker.interrupt(job)
                break
        return await result

    async def generate(req: Txt2ImgRequest, images: bool, request: Request):
        gen = await asyncio.to_thread(resolve, req, store, images)  # decodes images: off the event loop
        job = Job(lambda w: run_generation(gen, store, w), steps=gen.steps_per_batch * gen.n_iter)
        return await run_job(job, request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(page_html())

    @app.post("/sdapi/v1/txt2img", tags=["A1111"], summary="Text to image")
    async def txt2img(req: Txt2ImgRequest, request: Request) -> dict:
        return await generate(req, False, request)

    @app.post("/sdapi/v1/img2img", tags=["A1111"], summary="Image to image, inpainting")
    async def img2img(req: Img2ImgRequest, request: Request) -> dict:
        return await generate(req, True, request)

    @app.get("/sdapi/v1/progress", tags=["A1111"], summary="Progress, eta and a preview of the running job")
    async def progress(skip_current_image: bool = False) -> dict:
        return worker.progress(skip_current_image)

    @app.post("/sdapi/v1/interrupt", tags=["A1111"], summary="Stop the running generation at its next step")
    async def interrupt() -> dict:
        worker.interrupt()
        return {}

    @app.get("/sdapi/v1/samplers", tags=["A1111"])
    async def samplers() -> list[dict]:
        return sampler_names()

    @app.get("/sdapi/v1/schedulers", tags=["A1111"])
    async def schedulers() -> list[dict]:
        return [{"name": n, "label": n.capitalize(), "aliases": None, "default_rho": None, "need_inner_model": False}
                for n in ("automatic", "uniform", "karras", "exponential")]

    @app.get("/sdapi/v1/sd-models", tags=["A1111"], summary="The checkpoints this server was started with")
    async def sd_models() -> list[dict]:
        return [e.describe() for e in store.entries]

    @app.get("/sdapi/v1/scripts", tags=["A1111"], summary="Scripts (none; ControlNet maps go in alwayson_scripts)")
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/options", tags=["A1111"])
    async def get_options() -> dict:
        e = store.current
        return {"sd_model_checkpoint": e.title, "sd_checkpoint_hash": e.sha256, "samples_format": "png",
                "show_progress_every_n_steps": worker.preview_every, "live_previews_enable": worker.preview_every > 0}

    @app.post("/sdapi/v1/options", tags=["A1111"], summary="Switch the model (sd_model_checkpoint); preview interval")
    async def set_options(options: dict[str, Any]) -> None:
        every = options.get("show_progress_every_n_steps")
        if every is not None:
            if not isinstance(every, int) or isinstance(every, bool) or every < -1:
                raise FieldProblem("show_progress_every_n_steps", "expected an integer >= -1 (-1 or 0: no preview)")
            worker.preview_every = max(every, 0)
        name = options.get("sd_model_checkpoint")
        if name is not None:
            entry = store.find(name)
            if entry is None:
                raise FieldProblem("sd_model_checkpoint",
                                   f"no model {name!r}; this server has {', '.join(e.title for e in store.entries)}")
            if entry is not store.current:
                def switch(w):
                    store.get(entry)  # loads on the worker, after the jobs queued before
                    store.current = entry

                await run_job(Job(switch, what="load model"))
        return None

    @app.get("/sdapi/v1/loras", tags=["A1111"], summary="The LoRA files of --lora-dir: name, alias, path, metadata")
    async def loras() -> list[dict]:
        library = store.networks
        return [] if library is None else await asyncio.to_thread(library.a1111_listing)

    @app.post("/sdapi/v1/refresh-loras", tags=["A1111"], summary="Rescan --lora-dir for added or changed files")
    async def refresh_loras() -> None:
        if store.networks is not None:
            await asyncio.to_thread(store.networks.refresh)
        return None

    @app.get("/sdapi/v1/embeddings", tags=["A1111"], summary="Textual-inversion embeddings of --embeddings-dir")
    async def embeddings() -> dict:
        library = store.embeddings
        return {"loaded": {}, "skipped": {}} if library is None else await asyncio.to_thread(library.a1111_listing)

    @app.get("/ldmkit/v1/model", tags=["ldmkit"], summary="What the current model can do (the page reads it)")
    async def model() -> dict:
        caps = store.capabilities()  # max_side: the largest width or height a request may ask (schema.check_side)
        return {**caps, "max_side": MAX_SIDE_FACTOR * caps["size"], "samplers": [s["name"] for s in sampler_names()],
                "queue_size": worker.queue.maxsize}

    return app


class Guard:
    """ASGI middleware (a plain one: it keeps the client's disconnect visible to the endpoints): HTTP basic
    credentials on every path when the server has some, and a 413 for a body over MAX_BODY."""

    def __init__(self, app, credentials: list[tuple[str, str]]):
        self.app, self.credentials = app, credentials

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers
        from starlette.responses import JSONResponse, Response

        headers = Headers(scope=scope)
        if self.credentials and not _authorised(headers.get("authorization"), self.credentials):
            response = Response("credentials needed", status_code=401, headers={"WWW-Authenticate": 'Basic realm="ldmkit"'})
            return await response(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            return await JSONResponse({"detail": f"request larger than {MAX_BODY >> 20} MB"}, status_code=413)(scope, receive, send)
        return await self.app(scope, receive, send)


def _authorised(header: str | None, credentials: list[tuple[str, str]]) -> bool:
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    ok = False
    for u, p in credentials:  # every pair compared, in constant time
        ok |= secrets.compare_digest(user.encode(), u.encode()) & secrets.compare_digest(password.encode(), p.encode())
    return ok


def _version() -> str:
    from ldmkit import __version__

    return __version__


def run_server(checkpoints: list[str], host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
               insecure_no_auth: bool = False, queue_size: int = 8, device: str = "auto", preview_every: int = 5,
               lora_dir: str | None = None, embeddings_dir: str | None = None, tiny_decoder: str | None = None,
               tiny_final: bool = False, **speed) -> None:
    """`ldmkit serve`: check the address, load the first model, serve until Ctrl-C. `speed`: precision,
    backend, backend_cache (`ModelStore`)."""
    from ldmkit.device import pick_device

    parse_auth(auth)
    check_host(host, auth, insecure_no_auth)
    for path in checkpoints:  # every refusal that needs no model comes before the first is loaded
        if not Path(path).exists():
            raise LdmkitError(f"--checkpoint {path} does not exist")
    if tiny_decoder is not None and not Path(tiny_decoder).exists():
        raise LdmkitError(f"--tiny-decoder {tiny_decoder} does not exist")
    for flag, folder in (("--lora-dir", lora_dir), ("--embeddings-dir", embeddings_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise LdmkitError(f"{flag} {folder} is not a folder")
    try:
        import uvicorn
    except ImportError:
        raise LdmkitError("ldmkit serve needs FastAPI and uvicorn: pip install 'ldmkit[serve]'") from None
    check_port(host, port)
    app = create_app(checkpoints, queue_size=queue_size, auth=auth, device=str(pick_device(device, "--device")),
                     preview_every=preview_every, lora_dir=lora_dir, embeddings_dir=embeddings_dir,
                     tiny_decoder=tiny_decoder, tiny_final=tiny_final, **speed)
    shown = f"[{host}]" if ":" in host else host
    print(f"ldmkit serve: http://{shown}:{port}/ (API: /sdapi/v1, docs: /docs); "
          f"model {app.state.store.current.title}; Ctrl-C stops", flush=True)
    uvicorn.run(app, host=host.strip("[]"), port=port, log_level="warning")
