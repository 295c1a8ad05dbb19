"""The OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn; no model code, no JAX here).

    from serve.http import ServerSettings, create_app
    app = create_app(engine, ServerSettings(api_key="..."))   # then uvicorn.run(app, host="127.0.0.1")

`python -m serve` builds the engine from vLLM-style flags and runs this app.
"""

from serve.http.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
