"""The engine: continuous batching over fixed decode slots, one orchestration policy choice per step.

Requests are validated and tokenised on the caller's thread (`submit`), then wait in the engine's
queue. One loop thread runs steps; before each step the policy (`serve.policy`, shared with the
simulator) picks the mode (unmerged, merged with adapter m, mixture with m merged) and which waiting
requests join, and the step runs in the order `serve.batching` defines:

1. switch: the adapter pool merges, unmerges, or replaces the merged adapter (one jitted, donated
   update);
2. prefill: each admitted request runs alone through a jitted prefill (prompt length bucketed to a power
   of two, images encoded with its adapter), its KV rows are copied into a free decode slot, and its
   first token is sampled; a classify request is answered from its adapter's head here and ends;
3. decode: every slot that was running before the step generates one token in one jitted call.

The KV cache is one static buffer (decode slots x `max_model_len`), donated to every call; each slot
keeps its own length and positions (`KVCache.length` per row). Slots, not pages: every request reserves
`max_model_len` positions, so KV memory is slots x max_model_len x (2 x layers x kv heads x head dim);
a request whose prompt plus `max_tokens` does not fit `max_model_len` is refused at submission. Paged
blocks would let short requests share memory with long ones; at the batch sizes this engine targets
the static buffer keeps every program's shapes fixed and costs no gather in attention.

Any family of the model registry: a prompt's host-side inputs are prepared at submission, on the caller's
thread, by `valora_jax.generation.prompt_inputs` (the family's `generation_inputs` hook where it has one:
Qwen-VL's vision metadata, each image's patches padded to a power-of-two bucket, and M-RoPE positions;
the prefill leaves each slot's next position in the cache, and decode steps continue from it).

Compiled programs: one decode program per mode shape (the model as it is, for steps whose rows need no
LoRA term: base rows while nothing is merged, the merged adapter's own rows in merged mode; unmerged;
mixture), one prefill program per prompt bucket and image shape (LLaVA: image count; Qwen-VL: image-count
and patch buckets), one KV-insert program per prompt bucket; nothing recompiles when adapters, requests or
modes change. Detokenisation and streaming never stall the device: a step's tokens are booked when they
arrive (stop ids, max_tokens), and their text is decoded and streamed while the device runs the next
decode step; a stop string is therefore seen one step late, and the token decoded past it is dropped.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import itertools
import logging
import pathlib
import queue
import threading
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from serve import batching
from serve.cost_profile import StepTiming, step_features
from serve.engine.requests import (
    GenerationRequest,
    RequestError,
    RequestHandle,
    Result,
    TokenEvent,
    now,
)
from serve.policy import make_policy
from valora_jax import chat, load_pretrained
from valora_jax.adapters.pool import AdapterPool
from valora_jax.generation import bucket_length, left_pad, prompt_inputs, sample_rows
from valora_jax.kv_cache import KVCache
from valora_jax.models.tiny import TINY, tiny_base
from valora_jax.sharding import shard_model

log = logging.getLogger(__name__)

class EngineOverloaded(RequestError):
    """The waiting queue is full: try again after `retry_after` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message, status=429)
        self.retry_after = retry_after


class EngineDead(RuntimeError):
    """The engine loop has stopped (shut down, or died on an error): HTTP 503."""

    status = 503


@dataclasses.dataclass
class EngineStats:
    running: int
    waiting: int
    kv_usage: float
    max_loras: int
    loaded_adapters: list[str]
    running_adapters: list[str]
    waiting_adapters: list[str]
    mode: str
    merged: str | None
    switches: int
    healthy: bool


# What an image processor returns that `prompt_inputs` takes, with its dtype.
IMAGE_INPUTS = {"pixel_values": np.float32, "image_grid_thw": np.int64}


@dataclasses.dataclass(frozen=True)
class _Prompt:
    """A request's prefill inputs, prepared on the host: its token ids left-padded to their bucket (1, bucket),
    their mask, the pixel inputs and positions `model.hidden_states` takes (`prompt_inputs`)."""

    ids: np.ndarray
    mask: np.ndarray
    pixels: object
    positions: np.ndarray | None


@dataclasses.dataclass(eq=False)
class _Work:
    """A validated request with its tokenised inputs and bookkeeping, waiting or in a slot."""

    request: GenerationRequest
    handle: RequestHandle
    sched: batching.Request
    prompt: _Prompt
    stop_ids: frozenset[int]
    result: Result
    slot: int = -1
    seed: int = 0
    text: str = ""


def _prefill(graphdef, state, ids, pixels, mask, positions, cache, adapters, seed, temperature, top_k, top_p):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.hidden_states(ids, pixels, mask, position_ids=positions, cache=cache, adapters=adapters)
    logits = model.logits(hidden[:, -1])
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 0))(seed)
    token, logprob = sample_rows(logits, keys, temperature, top_k, top_p)
    heads = None if adapters is None or adapters.heads is None else model.classify_slots(hidden[:, -1],
                                                                                          adapters.heads)
    return token, logprob, heads, cache


def _insert(cache: KVCache, prompt: KVCache, slot) -> KVCache:
    """The one-row prompt cache `prompt` (length P) written into decode slot `slot` of `cache`."""
    length = prompt.max_len
    put = lambda big, small: jax.lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), slot, 0)
    valid = jnp.zeros((1, cache.max_len), bool).at[:, :length].set(prompt.valid)
    return KVCache(
        k=cache.k.at[:, slot, :length].set(prompt.k[:, 0].astype(cache.k.dtype)),
        v=cache.v.at[:, slot, :length].set(prompt.v[:, 0].astype(cache.v.dtype)),
        valid=put(cache.valid, valid), next_position=put(cache.next_position, prompt.next_position),
        length=put(cache.length, prompt.length))


def _decode(graphdef, state, tokens, cache, adapters, active, seed, step, temperature, top_k, top_p):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.hidden_states(tokens[:, None], attention_mask=active[:, None], cache=cache,
                                        adapters=adapters)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed, step)
    token, logprob = sample_rows(model.logits(hidden[:, -1]), keys, temperature, top_k, top_p)
    return token, logprob, cache


class Engine:
    """Serves one base model and the adapters of an `AdapterPool`; see the module docstring.

    `max_num_seqs` decode slots of `max_model_len` positions each; `max_waiting` requests may wait
    before `submit` answers `EngineOverloaded`. `policy` names a `serve.policy` policy (its parameters in
    `policy_params`). `chat_template` (Jinja text) renders chat messages when the processor has none
    of its own, or overrides it. With a `mesh` (its model and pool sharded on it, as `from_pretrained`
    does), every step runs under it: tensor parallel over 'model', decode slots over 'data'.
    """

    def __init__(self, model: nnx.Module, processor, pool: AdapterPool, *, policy: str = "valora",
                 policy_params: Mapping | None = None, max_num_seqs: int = 8, max_model_len: int | None = None,
                 max_waiting: int = 256, chat_template: str | None = None, served_model_name: str = "base",
                 min_bucket: int = 16, mesh=None):
        if processor is None:
            raise ValueError("the engine needs the model's processor (tokenizer and image processor)")
        self.model, self.processor, self.pool, self.mesh = model, processor, pool, mesh
        # Every array of the model's state committed to where it lies: the pool's writes (placements, merges)
        # return committed arrays and jit keys its programs on commitment, so a state that starts uncommitted
        # (the pool's empty slots) would compile every program again after the first write.
        nnx.update(model, jax.tree.map(lambda x: jax.device_put(x, x.sharding) if isinstance(x, jax.Array) else x,
                                       nnx.state(model)))
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.config = model.config
        self.policy_name = policy
        self.policy = make_policy(policy, **dict(policy_params or {}))
        self.num_slots, self.max_waiting, self.min_bucket = max_num_seqs, max_waiting, min_bucket
        self.max_len = max_model_len or self.config.text.max_position_embeddings
        self.served_model_name = served_model_name
        self.chat_template = chat.chat_template(model, processor, chat_template)
        self.limits = batching.Limits(max_batch=max_num_seqs)
        dtype = model.language_model.embed_tokens.embedding.dtype
        self.cache = KVCache.init(self.config.text, max_num_seqs, self.max_len, dtype)
        self.cache_dtype = dtype
        self._prefill = jax.jit(_prefill, static_argnums=0, donate_argnames="cache")
        self._insert = jax.jit(_insert, donate_argnums=0)
        self._decode = jax.jit(_decode, static_argnums=0, donate_argnames="cache")
        self._slots: list[_Work | None] = [None] * max_num_seqs
        self._tokens = np.zeros(max_num_seqs, np.int32)
        self._untexted: list[tuple[_Work, int, float]] = []  # booked tokens whose text is not streamed yet
        self._split = None  # (pool version, (graphdef, state))
        self._waiting: collections.deque[_Work] = collections.deque()
        self._inbox: queue.Queue[_Work] = queue.Queue()
        self._lock = threading.RLock()  # the pool and the model's weights: the loop's steps, loads, unloads
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cancel_all = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ids = itertools.count()
        self.switches = 0
        self.mode = "unmerged"
        self.step_timings: list[StepTiming] | None = None  # a list: each step appends its phases' times

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str = TINY, *, lora_modules: Mapping[str, str] | None = None,
                        max_loras: int = 8, max_lora_rank: int = 64, max_cpu_loras: int | None = None,
                        dtype: str = "float32",
                        backend: str = "auto", served_model_name: str | None = None, mesh=None, **kwargs) -> Engine:
        """An engine for `model` ("tiny" or a local HF directory of a registry family: LLaVA, Qwen2-VL,
        Qwen2.5-VL) with `lora_modules` (name -> adapter directory) loaded into an `AdapterPool` of `max_loras`
        device slots of rank `max_lora_rank`, at most `max_cpu_loras` of them with their weights in host
        memory (default: all)."""
        if model == TINY:
            base, processor = tiny_base(jnp.dtype(dtype))
        else:
            base, processor = load_pretrained(model, dtype=jnp.dtype(dtype), mesh=mesh)
        pool = AdapterPool(base, slots=max_loras, max_rank=max_lora_rank, backend=backend, host_capacity=max_cpu_loras)
        if mesh is not None:
            shard_model(base, mesh)  # the pool's slots too, by their logical axes
        engine = cls(base, processor, pool, served_model_name=served_model_name or pathlib.Path(model).name,
                     mesh=mesh, **kwargs)
        for name, path in (lora_modules or {}).items():
            engine.load_adapter(name, path)
        return engine

    # -- adapters --------------------------------------------------------------------------------------
    def adapters(self) -> list[str]:
        return list(self.pool.adapters)

    def classify_tasks(self, adapter: str) -> list[str]:
        return list(self.pool._adapter(adapter).heads)

    def load_adapter(self, name: str, path: str | pathlib.Path, pin: bool = False) -> None:
        """Load an adapter into the pool's host memory; errors (400 / 404) name it and change nothing."""
        if name == self.served_model_name:
            raise RequestError(f"adapter name {name!r} is the base model's name")
        with self._lock:
            try:
                self.pool.load(name, path, pin=pin)
            except FileNotFoundError as err:
                raise RequestError(str(err), status=404) from err
            except (ValueError, RuntimeError) as err:
                raise RequestError(str(err), status=400) from err

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; refused (400) while requests run with it, 404 when it is not loaded."""
        with self._lock:
            if name not in self.pool.adapters:
                raise RequestError(f"adapter {name!r} is not loaded", status=404)
            if self.pool.merged == name:
                self.pool.unmerge()
                self.switches += 1
            try:
                self.pool.unload(name)
            except ValueError as err:
                raise RequestError(str(err), status=400) from err

    # -- requests --------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate and tokenise `request` and queue it; raises RequestError for a request that cannot run."""
        if self._error is not None or (self._thread is not None and not self._thread.is_alive()):
            raise EngineDead(f"the engine has stopped{f': {self._error}' if self._error else ''}")
        if self._inbox.qsize() + len(self._waiting) >= self.max_waiting:
            raise EngineOverloaded(f"{self.max_waiting} requests are already waiting", retry_after=1.0)
        work = self._prepare(request)
        self._inbox.put(work)
        self._wake.set()
        return work.handle

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> Result:
        """Submit and wait; a request the engine refuses comes back as a Result with finish reason "error"."""
        try:
            handle = self.submit(request)
        except RequestError as err:
            return Result(id=request.id, finish_reason="error", error=str(err), status=err.status)
        return handle.result(timeout)

    def _prepare(self, request: GenerationRequest) -> _Work:
        rid = request.id or f"req-{next(self._ids)}"
        arrival = now()
        if request.adapter is not None and request.adapter not in self.pool.adapters:
            raise RequestError(f"the model {request.adapter!r} does not exist", status=404)
        request.sampling.check()
        if request.classify is not None:
            if request.adapter is None:
                raise RequestError("a classify request needs an adapter with a head for its task")
            tasks = self.classify_tasks(request.adapter)
            if request.classify not in tasks:
                raise RequestError(f"adapter {request.adapter!r} has no classify head for task "
                                   f"{request.classify!r}; it has {tasks}", status=404)
        ids, vision, n_images = self._encode(request)
        max_tokens = 1 if request.classify else request.sampling.max_tokens
        if len(ids) + max_tokens > self.max_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; with max_tokens {max_tokens} that exceeds "
                               f"the model's context length {self.max_len}")
        prompt = self._prompt(ids, vision, max_tokens)
        sched = batching.Request(rid, request.adapter, arrival, len(ids), max_tokens, n_images)
        eos = self.config.eos_token_id
        stop = frozenset(request.sampling.stop_token_ids) | (
            frozenset() if eos is None or request.sampling.ignore_eos else {eos})
        seed = request.sampling.seed if request.sampling.seed is not None else np.random.randint(2**31)
        return _Work(request, RequestHandle(rid), sched, prompt, stop,
                     Result(id=rid, finish_reason="length", prompt_tokens=len(ids), arrival=arrival), seed=seed)

    def _encode(self, request: GenerationRequest) -> tuple[list[int], dict[str, np.ndarray], int]:
        """The prompt's token ids, its images' processor outputs (`IMAGE_INPUTS`, none without images) and
        the image count."""
        given = [x is not None for x in (request.prompt, request.prompt_ids, request.messages)]
        if sum(given) != 1:
            raise RequestError("give exactly one of prompt, prompt_ids and messages")
        images = [_open_image(image) for image in request.images]
        if request.prompt_ids is not None:
            ids = [int(t) for t in request.prompt_ids]
            if any(not 0 <= t < self.config.text.vocab_size for t in ids):
                raise RequestError(f"prompt_ids must lie in [0, {self.config.text.vocab_size})")
            out = self.processor.image_processor(images=images, return_tensors="np") if images else {}
        else:
            text = request.prompt
            if request.messages is not None:
                try:
                    text = chat.render(self.tokenizer, request.messages, self.chat_template)
                except Exception as err:  # a template error is the request's messages' fault
                    raise RequestError(f"messages do not render with the chat template: {err}") from err
            if not text or not text.strip():
                raise RequestError("the prompt is empty")
            try:
                out = self.processor(text=[text], images=images or None, return_tensors="np")
            except ValueError as err:  # e.g. image placeholders and images do not match
                raise RequestError(str(err)) from err
            ids = [int(t) for t in out["input_ids"][0]]
        vision = {key: np.asarray(out[key], dtype) for key, dtype in IMAGE_INPUTS.items() if images and key in out}
        # A family with host-side preparation (`generation_inputs`) checks its image tokens there (`_prompt`);
        # without it (LLaVA), each image fills `image_seq_length` image tokens.
        if not hasattr(self.model, "generation_inputs"):
            n_image_tokens = sum(t == self.config.image_token_id for t in ids)
            expected = len(images) * self.config.image_seq_length
            if n_image_tokens != expected:
                raise RequestError(f"the prompt has {n_image_tokens} image tokens but {len(images)} image(s) need "
                                   f"{expected}: put one <image> placeholder per image")
        if not ids:
            raise RequestError("the prompt is empty")
        return ids, vision, len(images)

    def _prompt(self, ids: list[int], vision: Mapping[str, np.ndarray], max_tokens: int) -> _Prompt:
        """The prefill inputs of a prompt: its ids left-padded to their bucket, and the pixel inputs and
        positions `prompt_inputs` prepares from them; its ValueError (image tokens that do not match the
        images) is the request's 400."""
        bucket = min(bucket_length(len(ids), self.min_bucket), self.max_len - max_tokens)
        padded, mask = left_pad(np.asarray([ids], np.int32), np.ones((1, len(ids)), bool), bucket,
                                self.config.pad_token_id or 0)
        try:
            pixels, positions = prompt_inputs(self.model, padded, mask, vision.get("pixel_values"),
                                              vision.get("image_grid_thw"))
        except ValueError as err:
            raise RequestError(str(err)) from err
        return _Prompt(padded, mask, pixels, positions)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop the loop: finish running and waiting requests first, or `cancel` them."""
        self._cancel_all = cancel
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown(cancel=exc[0] is not None)

    @property
    def healthy(self) -> bool:
        return self._error is None and (self._thread is None or self._thread.is_alive())

    def stats(self) -> EngineStats:
        running = [w for w in self._slots if w is not None]
        waiting = list(self._waiting)
        used = sum(int(w.sched.kv_tokens) for w in running)
        return EngineStats(
            running=len(running), waiting=len(waiting) + self._inbox.qsize(),
            kv_usage=used / (self.num_slots * self.max_len), max_loras=self.pool.num_slots,
            loaded_adapters=self.adapters(),
            running_adapters=sorted({w.request.adapter for w in running if w.request.adapter}),
            waiting_adapters=sorted({w.request.adapter for w in waiting if w.request.adapter}),
            mode=self.mode, merged=self.pool.merged, switches=self.switches, healthy=self.healthy)

    def compiled_programs(self) -> int:
        """Programs the engine's jitted functions hold (a test asserts a run of mixed requests adds none)."""
        return sum(f._cache_size() for f in (self._prefill, self._insert, self._decode))

    # -- the loop --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                self._take_inbox()
                if self._stop.is_set() and (self._cancel_all or not (self._waiting or any(self._slots))):
                    break
                if not self._waiting and not any(self._slots):
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                with self._lock:
                    self.step()
        except BaseException as err:  # the loop is dead: every request learns why
            log.exception("engine loop failed")
            self._error = err
        finally:
            reason = "error" if self._error is not None else "cancelled"
            for work in [w for w in self._slots if w is not None] + list(self._waiting):
                self._finish(work, reason, f"engine stopped: {self._error}" if self._error else "engine shut down")
            while not self._inbox.empty():
                self._finish(self._inbox.get(), reason, "engine shut down")

    def _on_mesh(self):
        """The engine's mesh as the active one (the model's activation constraints read it), if it has one."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _take_inbox(self) -> None:
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                return

    def step(self) -> None:
        """One scheduling step: plan, switch, prefill the admitted requests, decode the running ones. With
        `step_timings` a list, the step appends its `StepTiming` (what `python -m serve.profile` fits)."""
        with self._on_mesh():
            self._step()

    def _step(self) -> None:
        self._take_inbox()
        for work in [w for w in self._waiting if w.handle.cancelled]:
            self._waiting.remove(work)
            self._finish(work, "cancelled")
        for work in [w for w in self._slots if w is not None and w.handle.cancelled]:
            self._finish(work, "cancelled")
        waiting = [w for w in list(self._waiting) if self._adapter_ready(w)]
        running = [w for w in self._slots if w is not None]
        state = batching.StepState(now(), tuple(w.sched for w in waiting), tuple(w.sched for w in running),
                                   self.pool.merged, self.limits)
        plan = self.policy.plan(state)
        batching.check_plan(plan, state)
        timings = self.step_timings  # read once: a caller may swap the list between steps
        timing = timings is not None
        switch = []
        for op, _ in batching.switch_ops(self.pool.merged, plan.merged):
            start = now()
            self.pool.switch(plan.merged)
            self.switches += 1
            if timing:  # the update is asynchronous: wait for it so that its time is its own
                jax.block_until_ready(nnx.state(self.model))
                switch.append((op, now() - start))
        self.mode = plan.mode
        admitted = self._within_lora_slots(plan.admit, running)
        by_sched = {id(w.sched): w for w in waiting}
        decode = step_features([w.sched for w in running], plan.mode, plan.merged, prefill=False) \
            if timing and running else None
        prefill_start = now()
        for sched in admitted:
            work = by_sched[id(sched)]
            self._waiting.remove(work)
            self._admit(work)
        decode_start = now()
        if running:
            self._decode_running(running)
        if timing:
            timings.append(StepTiming(
                tuple(switch), step_features(admitted, plan.mode, plan.merged, prefill=True) if admitted else None,
                decode_start - prefill_start, decode, now() - decode_start))

    def _adapter_ready(self, work: _Work) -> bool:
        """False (and the request fails) when its adapter was unloaded while it waited."""
        if work.request.adapter is None or work.request.adapter in self.pool.adapters:
            return True
        self._waiting.remove(work)
        self._finish(work, "error", f"the model {work.request.adapter!r} was unloaded", status=404)
        return False

    def _within_lora_slots(self, admit: Sequence[batching.Request], running: Sequence[_Work]):
        """The admitted prefix whose distinct adapters (with the running ones and the merged one) fit the
        pool's device slots, as vLLM's `max_loras` rule."""
        distinct = {w.request.adapter for w in running if w.request.adapter} | {self.pool.merged} - {None}
        out = []
        for sched in admit:
            if sched.adapter is not None and sched.adapter not in distinct:
                if len(distinct) >= self.pool.num_slots:
                    break
                distinct.add(sched.adapter)
            out.append(sched)
        return out

    def _select(self, names, active, tasks=None):
        """The pool's selection for these rows, or None when no active row needs a LoRA term: the base rows
        while nothing is merged, the merged adapter's own rows while it is (merged mode). The model then runs
        as it is, with no per-row kernels."""
        merged = self.pool.merged
        live = [n for n, a in zip(names, active) if a]
        if tasks is None and all(n == merged for n in live):
            return None
        return self.pool.select(names, tasks=tasks)

    def _graph(self):
        """The model split for the jitted steps, split again only after the pool has written its variables
        (a split walks every module: at 7B widths it costs as much as a decode step's host work)."""
        if self._split is None or self._split[0] != self.pool.version:
            self._split = (self.pool.version, nnx.split(self.model))
        return self._split[1]

    def _admit(self, work: _Work) -> None:
        request, sampling = work.request, work.request.sampling
        try:
            batch = self._select([request.adapter], [True], [request.classify] if request.classify else None)
        except (KeyError, ValueError, RuntimeError) as err:
            self._finish(work, "error", str(err))
            return
        slot = self._slots.index(None)
        work.slot, work.result.started = slot, now()
        self.pool.hold([request.adapter])
        self._slots[slot] = work
        prompt = work.prompt
        prompt_cache = KVCache.init(self.config.text, 1, prompt.ids.shape[1], self.cache_dtype)
        token, logprob, heads, prompt_cache = self._prefill(
            *self._graph(), prompt.ids, prompt.pixels, prompt.mask, prompt.positions, prompt_cache, batch,
            np.asarray([work.seed], np.uint32),
            np.asarray([sampling.temperature], np.float32), np.asarray([sampling.top_k], np.int32),
            np.asarray([sampling.top_p], np.float32))
        if heads is not None:
            labels = self.pool.labels(request.adapter, request.classify)
            work.result.label = labels[int(np.argmax(np.asarray(heads)[0, :len(labels)]))]
            work.result.text = work.result.label
            self._finish(work, "stop")
            return
        self.cache = self._insert(self.cache, prompt_cache, jnp.int32(slot))
        self._emit(work, int(np.asarray(token)[0]), float(np.asarray(logprob)[0]))

    def _decode_running(self, running: Sequence[_Work]) -> None:
        rows = [w if w is not None and w in running else None for w in self._slots]
        active = np.asarray([w is not None for w in rows])
        params = lambda f, dtype: np.asarray([f(w) if w is not None else 0 for w in rows], dtype)
        batch = self._select([w.request.adapter if w is not None else None for w in rows], active)
        token, logprob, self.cache = self._decode(
            *self._graph(), jnp.asarray(self._tokens), self.cache, batch, active,
            params(lambda w: w.seed, np.uint32), params(lambda w: w.sched.generated, np.int32),
            params(lambda w: w.request.sampling.temperature, np.float32),
            params(lambda w: w.request.sampling.top_k, np.int32),
            np.asarray([w.request.sampling.top_p if w is not None else 1.0 for w in rows], np.float32))
        self._flush_text()  # while the device runs the step just dispatched
        token, logprob = np.asarray(token), np.asarray(logprob)
        for slot, work in enumerate(rows):
            if work is not None and not work.handle.done:
                self._emit(work, int(token[slot]), float(logprob[slot]))

    def _emit(self, work: _Work, token: int, logprob: float) -> None:
        """Book one generated token: stop on a stop id (not emitted), max_tokens or a full slot. Its text and
        event follow in `_flush_text`, which the next decode step overlaps with the device's work."""
        result = work.result
        work.sched.generated += 1
        t = now()
        if result.first_token is None:
            result.first_token = t
        if token in work.stop_ids:
            self._finish(work, "stop")
            return
        result.token_ids.append(token)
        result.token_times.append(t)
        self._tokens[work.slot] = token
        self._untexted.append((work, len(result.token_ids), logprob))
        if work.sched.generated >= work.sched.max_new_tokens:
            self._finish(work, "length")

    def _flush_text(self, only: _Work | None = None) -> None:
        """Detokenise booked tokens and stream their events (all, or `only`'s); a stop string ends a request
        there (tokens booked after it are dropped)."""
        keep = []
        for entry in self._untexted:
            if only is not None and entry[0] is not only:
                keep.append(entry)
                continue
            work, count, logprob = entry
            result = work.result
            if len(result.token_ids) < count:  # cut by an earlier stop string
                continue
            text = self.tokenizer.decode(result.token_ids[:count], skip_special_tokens=True)
            stop_at = min((i for i in (text.find(s) for s in work.request.sampling.stop) if i >= 0), default=-1)
            if stop_at >= 0:
                text = text[:stop_at]
            delta, work.text = text[len(work.text):], text
            work.handle._emit(TokenEvent(result.token_ids[count - 1], delta, logprob))
            if stop_at >= 0:
                del result.token_ids[count:], result.token_times[count:]
                if not work.handle.done:
                    self._finish(work, "stop", flushed=True)
        self._untexted = keep

    def _finish(self, work: _Work, reason: str, error: str | None = None, status: int = 200,
                flushed: bool = False) -> None:
        if not flushed:
            self._flush_text(only=work)  # its events come before its result
        if work.handle.done:
            return
        result = work.result
        result.finish_reason, result.error, result.finished = reason, error, now()
        if error is not None and status == 200:
            status = 500 if reason == "error" and self._error is not None else 400
        result.status = status
        if result.label is None:
            result.text = work.text
        if work.slot >= 0 and self._slots[work.slot] is work:
            self._slots[work.slot] = None
            self.pool.release([work.request.adapter])
        work.slot = -1
        work.handle._finish(result)


def _open_image(image):
    """A PIL RGB image from a PIL image, a path or bytes; RequestError when it does not decode."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
        with Image.open(source) as opened:
            return opened.convert("RGB")
    except Image.DecompressionBombError as err:  # PIL's guard against images that would exhaust memory
        raise RequestError(f"the image is too large: {err}") from err
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise RequestError(f"the image does not decode: {err}") from err


__all__ = ["Engine", "EngineDead", "EngineOverloaded", "EngineStats"]
