"""`python -m serve.batch`: OpenAI Batch API files through the engine, as vLLM's `run_batch` does.

    python -m serve.batch --model tiny --lora-modules shapes=runs/default/adapters/adapter_0 \\
        -i requests.jsonl -o responses.jsonl

Each input line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {...}}` with `body.model` naming an adapter (`--lora-modules`) or the base model
(`--served-model-name`, default the model directory's name, "tiny" for the embedded one); images are
`image_url` parts with data URLs or local file paths. Each output line is `{"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error"}`, in input order. A bad line (malformed JSON,
unknown adapter, undecodable image, prompt too long) gets its error and the others still run; all
requests go through one engine, so rows of different adapters share batches.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import uuid
from collections.abc import Sequence

from tqdm import tqdm

from serve import protocol
from serve.engine.engine import Engine
from serve.engine.requests import RequestError
from serve.policy import POLICIES


def parse_lora_modules(values: Sequence[str]) -> dict[str, str]:
    """vLLM's `--lora-modules`: NAME=DIR items, or JSON objects {"name": ..., "path": ...}."""
    out = {}
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                item = json.loads(value)
                name, path = item["name"], item["path"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise argparse.ArgumentTypeError(f"--lora-modules {value!r}: expected {{\"name\": ..., \"path\": ...}}") from err
        else:
            name, sep, path = value.partition("=")
            if not sep or not name or not path:
                raise argparse.ArgumentTypeError(f"--lora-modules {value!r}: expected NAME=DIR")
        if name in out:
            raise argparse.ArgumentTypeError(f"--lora-modules: {name!r} given twice")
        out[name] = path
    return out


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine's flags, with vLLM's names (shared by `python -m serve`)."""
    p.add_argument("--model", default="tiny",
                   help="'tiny' (the embedded tiny LLaVA) or a local HF directory: LLaVA, Qwen2-VL or Qwen2.5-VL")
    p.add_argument("--served-model-name", help="the base model's name in requests (default: the model's name)")
    p.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=DIR",
                   help="adapters to serve: NAME=DIR or a JSON object {\"name\", \"path\"} each")
    p.add_argument("--max-loras", type=int, default=8, help="adapter slots on the device (distinct adapters per batch)")
    p.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank the slots hold")
    p.add_argument("--max-cpu-loras", type=int,
                   help="adapters whose weights stay in host memory (default: all); the least recently used beyond "
                        "it are read from their directory again when requested")
    p.add_argument("--max-num-seqs", type=int, default=8, help="decode slots (requests running at once)")
    p.add_argument("--max-model-len", type=int, help="positions per decode slot: prompt + output (default: the model's)")
    p.add_argument("--policy", default="valora", choices=sorted(POLICIES), help="orchestration policy")
    p.add_argument("--chat-template", type=pathlib.Path, help="a Jinja chat template file overriding the processor's")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "pallas_gpu", "pallas_tpu"),
                   help="the batched-LoRA kernels (auto: Pallas on GPU and TPU, reference on CPU)")


def engine_from_args(args, **kwargs) -> Engine:
    template = args.chat_template.read_text() if args.chat_template else None
    return Engine.from_pretrained(
        args.model, lora_modules=parse_lora_modules(args.lora_modules), max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        policy=args.policy, chat_template=template, dtype=args.dtype, backend=args.backend,
        served_model_name=args.served_model_name, **kwargs)


def output_row(custom_id, status: int, body: dict | None, error: str | None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": None if body is None else {"status_code": status, "request_id": uuid.uuid4().hex,
                                                     "body": body},
            "error": None if error is None else {"code": str(status), "message": error}}


def run_batch(engine: Engine, lines: Sequence[str], *, progress: bool = True) -> list[dict]:
    """The output rows for the input lines, in order; the engine must be started."""
    pending = []  # (index, custom_id, url, handles) of submitted rows
    out: list[dict | None] = [None] * len(lines)
    for index, line in enumerate(lines):
        custom_id = None
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise RequestError("each line must be a JSON object")
            custom_id, url, body = row.get("custom_id"), row.get("url"), row.get("body")
            if row.get("method", "POST") != "POST" or url not in (protocol.CHAT, protocol.COMPLETIONS):
                raise RequestError(f"unsupported request {row.get('method')} {url}: use POST {protocol.CHAT} "
                                   f"or {protocol.COMPLETIONS}")
            if not isinstance(body, dict):
                raise RequestError("'body' must be an object")
            request = (protocol.chat_request(body, base_model=engine.served_model_name, allow_local_paths=True)
                       if url == protocol.CHAT else protocol.completion_request(body, base_model=engine.served_model_name))
            handles = [engine.submit(request) for _ in range(protocol.copies(body))]
            pending.append((index, custom_id, url, body["model"], handles))
        except json.JSONDecodeError as err:
            out[index] = output_row(custom_id, 400, None, f"line {index + 1} is not JSON: {err}")
        except RequestError as err:
            out[index] = output_row(custom_id, err.status, protocol.error_body(str(err), err.status), str(err))
    for index, custom_id, url, model, handles in tqdm(pending, desc="serve.batch", unit="request",
                                                     disable=not progress):
        results = [h.result() for h in handles]
        failed = next((r for r in results if r.finish_reason == "error"), None)
        if failed is not None:
            out[index] = output_row(custom_id, failed.status, protocol.error_body(failed.error, failed.status),
                                    failed.error)
        else:
            out[index] = output_row(custom_id, 200, protocol.response_body(url, results, model), None)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.batch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(p)
    p.add_argument("-i", "--input-file", required=True, type=pathlib.Path, help="OpenAI Batch JSONL input")
    p.add_argument("-o", "--output-file", required=True, type=pathlib.Path, help="JSONL output, one row per input")
    args = p.parse_args(argv)
    try:
        lines = [line for line in args.input_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        lora_modules = parse_lora_modules(args.lora_modules)
    except (OSError, argparse.ArgumentTypeError) as err:
        p.error(str(err))
    try:
        engine = engine_from_args(args, max_waiting=max(256, 16 * len(lines)))
    except RequestError as err:
        p.error(f"--lora-modules: {err}")
    print(f"serving {args.model} with adapters {sorted(lora_modules)}: {len(lines)} requests", file=sys.stderr)
    with engine:
        rows = run_batch(engine, lines)
    args.output_file.parent.mkdir(parents=True, exist_ok=True)
    args.output_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    failed = sum(row["error"] is not None for row in rows)
    print(f"wrote {len(rows)} responses to {args.output_file} ({failed} failed)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
