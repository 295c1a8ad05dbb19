"""`python -m serve`: the OpenAI-compatible server for a base model and many adapters, with vLLM's flags.

    python -m serve --model tiny --lora-modules shapes=runs/default/adapters/adapter_0 --port 8000

Each adapter is a model of the API (`"model": "shapes"`); the base model answers to its served name.
Binds 127.0.0.1 unless `--host` says otherwise. SIGINT or SIGTERM stops accepting connections, lets the
requests in flight finish for up to `--shutdown-timeout` seconds, then cancels the rest (their responses
end with finish reason "abort") and stops the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib
import signal
import sys

import uvicorn

from serve.batch import add_engine_arguments, engine_from_args, parse_lora_modules
from serve.engine import RequestError
from serve.http import ServerSettings, create_app

log = logging.getLogger("serve")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    engine = p.add_argument_group("model, adapters and engine (as `python -m serve.batch`)")
    add_engine_arguments(engine)
    engine.add_argument("--max-waiting", type=int, default=256,
                        help="requests that may wait for a decode slot before new ones get 429 (default 256)")
    engine.add_argument("--enable-lora", action="store_true",
                        help="accepted for vLLM compatibility; adapters are always enabled")

    http = p.add_argument_group("server")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"),
                      help="require 'Authorization: Bearer KEY' on /v1 paths (default: $VLLM_API_KEY)")
    http.add_argument("--allow-runtime-lora-updating", action="store_true",
                      default=_truthy(os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")),
                      help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter (also with "
                           "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
    http.add_argument("--allowed-local-media-path", type=pathlib.Path,
                      help="let image_url name local files under this directory (default: data URLs only)")
    http.add_argument("--shutdown-timeout", type=float, default=30.0,
                      help="seconds in-flight requests get to finish after SIGINT/SIGTERM (default 30)")
    http.add_argument("--uvicorn-log-level", default="info",
                      choices=("critical", "error", "warning", "info", "debug", "trace"))
    return p


class _Server(uvicorn.Server):
    """uvicorn's server, except that at shutdown the requests still running after `grace` seconds are
    cancelled in the engine, so their responses end properly (finish reason "abort", then [DONE]) instead
    of being cut off."""

    def __init__(self, config: uvicorn.Config, *, cancel_all, grace: float):
        super().__init__(config)
        self.cancel_all, self.grace = cancel_all, grace

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self.grace, self.cancel_all)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.max_cpu_loras is not None and args.max_cpu_loras < args.max_loras:
        p.error(f"--max-cpu-loras {args.max_cpu_loras} must be at least --max-loras {args.max_loras}")
    if args.allowed_local_media_path is not None and not args.allowed_local_media_path.is_dir():
        p.error(f"--allowed-local-media-path: {args.allowed_local_media_path} is not a directory")
    if args.chat_template is not None and not args.chat_template.is_file():
        p.error(f"--chat-template: {args.chat_template} is not a file")
    try:
        lora_modules = parse_lora_modules(args.lora_modules)
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = engine_from_args(args, max_waiting=args.max_waiting)
    except RequestError as err:
        p.error(f"--lora-modules: {err}")
    settings = ServerSettings(api_key=args.api_key, allow_runtime_lora_updating=args.allow_runtime_lora_updating,
                              allowed_local_media_path=args.allowed_local_media_path, model_root=args.model,
                              lora_paths=lora_modules)
    app = create_app(engine, settings)
    # uvicorn's own graceful timeout is only a backstop: `_Server` cancels what is left in the engine first.
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                    lifespan="off", timeout_graceful_shutdown=round(args.shutdown_timeout) + 10),
                     cancel_all=app.state.api.cancel_all, grace=args.shutdown_timeout)
    # uvicorn handles SIGINT/SIGTERM while it serves and raises them again afterwards with the handlers it
    # found; these ones only note them, so the engine is shut down below rather than the process killed.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: log.info("signal %d: shutting down", signum))
    engine.start()
    try:
        log.info("serving %s with adapters [%s] on http://%s:%d", engine.served_model_name,
                 ", ".join(engine.adapters()), args.host, args.port)
        server.run()
    finally:
        engine.shutdown(cancel=True, timeout=args.shutdown_timeout)
    log.info("stopped")
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
