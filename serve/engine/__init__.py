"""The serving engine: continuous batching of mixed-adapter requests under an orchestration policy.

No HTTP here (`serve/http` is the server); the scheduling rules and policies are plain Python shared
with the simulator (`serve.batching`, `serve.policy`).

    from serve.engine import Engine, GenerationRequest, SamplingParams

    engine = Engine.from_pretrained("tiny", lora_modules={"shapes": "runs/default/adapters/adapter_0"})
    with engine:
        handle = engine.submit(GenerationRequest(adapter="shapes", prompt="...", images=[image]))
        for event in handle: ...          # TokenEvent per token, then the Result
"""

from serve.engine.requests import (
    GenerationRequest,
    RequestError,
    RequestHandle,
    Result,
    SamplingParams,
    TokenEvent,
)

__all__ = ["Engine", "EngineStats", "GenerationRequest", "RequestError", "RequestHandle", "Result",
           "SamplingParams", "TokenEvent"]


def __getattr__(name: str):
    if name in ("Engine", "EngineStats"):
        from serve.engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'serve.engine' has no attribute {name!r}")
