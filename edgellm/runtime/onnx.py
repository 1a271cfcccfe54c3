"""The ONNX Runtime backend: an ONNX folder (model.onnx + genai_config.json) behind ``base.Backend``.

* Execution provider (``choose_provider``): the one asked for (argument, else the bundle's
  ``runtime.provider``), else the one the graph was exported for (model metadata or genai_config.json),
  else for CPU graphs the probe's choice among ``onnxruntime.get_available_providers()`` that runs the
  graph's ops. The reason is kept in ``provider_reason``; a provider that is missing or that ONNX Runtime
  drops while creating the session falls back to the CPU, logged and kept in ``provider_note``.
* Sessions and KV cache: ``onnx_stages.Stage`` (a preallocated buffer per layer shared by past and present for
  GroupQueryAttention graphs, so ``truncate`` only moves ``n_past``; Concat graphs feed present as next past).
* Early exit: ``split(E)`` runs the graph cut before layer E and before the final norm
  (``edgellm.runtime.onnx_split``) as stages on the same weights file; ``lower(tokens)`` runs the lower part
  ahead for drafting (the exit state comes back), ``decode`` and ``verify`` reuse those states and cache
  entries instead of recomputing them (``verify``: the blocks one row at a time, as plain decoding, the head
  over all rows); ``fill()`` commits them without the upper layers (CALM: their K/V from the exit state).
* Only the positions that need logits are computed: ``logits_to_keep`` (an input with a default that our
  exporter adds) is set to the span from the first requested position to the end of the call.
* Tokenization: llama.cpp's tokenizer on the vocabulary-only ``tokenizer.gguf`` the exporter writes, so an
  ONNX bundle and a GGUF of the same checkpoint give the same ids, special tokens and chat template.
* Threads: ONNX Runtime fixes its intra-op pool when a session is created, so ``set_threads`` recreates
  the session when the decode count changes (weights are memory-mapped; the KV buffers are kept). One
  pool serves decode and prompt batches (``separate_batch_threads`` is False: thread tuning times one count).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import onnxruntime as ort

from edgellm.backends import BACKENDS, BY_ORT_PROVIDER
from edgellm.errors import ContextOverflowError, ModelLoadError
from edgellm.runtime.base import LogitsFor, default_n_ctx, output_indices
from edgellm.runtime.onnx_split import SplitRun
from edgellm.runtime.onnx_stages import LOGITS_TO_KEEP, GraphLayout, Stage, batches, kept_rows

if TYPE_CHECKING:                    # the probe package is imported only when a choice needs it
    from edgellm.probe.info import BackendChoice

logger = logging.getLogger("edgellm.onnxruntime")

GENAI_CONFIG = "genai_config.json"
VOCAB_GGUF = "tokenizer.gguf"
DEFAULT_N_BATCH = 512            # prompt tokens per session run (bounds GQA's (heads, seq, total) scratch)
CPU = "CPUExecutionProvider"
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"   # where a graph from bytes finds its data
NO_SPINNING = "session.force_spinning_stop"
# provider short name (edgellm.backends api) -> OrtValue device for the KV buffers
KV_DEVICES = {"cuda": "cuda", "tensorrt": "cuda", "dml": "dml"}


# --- which execution provider (pure) ---

AUTO = "auto"                    # requested provider meaning "choose for me" (same as None)
# ProviderOps fields (edgellm.converters.onnx.options.PROVIDERS) that say which contrib ops a graph holds
OP_FLAGS = ("gqa", "fused_rope", "contrib_norms", "matmul_nbits")


@dataclass(frozen=True)
class ProviderChoice:
    backend: str                 # id in edgellm.backends.BACKENDS
    providers: tuple[str, ...]   # ORT providers in session order (the CPU always last, for unsupported nodes)
    reason: str
    fallback: bool               # the wanted provider was not usable


def provider_name(name: str) -> str:
    """"cuda", "onnxruntime-cuda" or "CUDAExecutionProvider" -> "CUDAExecutionProvider"."""
    if name in BY_ORT_PROVIDER:
        return name
    key = name.lower().removeprefix("onnxruntime-")
    row = BACKENDS.get(f"onnxruntime-{key}") or next(
        (b for b in BACKENDS.values() if b.ort_provider and b.ort_provider.lower() == key), None)
    if row is None or row.ort_provider is None:
        known = sorted(b.api for b in BACKENDS.values() if b.ort_provider)
        raise ModelLoadError(name, f"unknown execution provider; known: {', '.join(known)}")
    return row.ort_provider


def runs_graph(provider: str, built_for: str) -> bool:
    """Whether ``provider`` runs every contrib op of a graph exported for ``built_for`` (ORT provider names)
    without handing nodes back to the CPU, by the op-set table of the ONNX converter."""
    from edgellm.converters.onnx.options import PROVIDERS
    ops = {BY_ORT_PROVIDER[p].api: PROVIDERS.get(BY_ORT_PROVIDER[p].api) for p in (provider, built_for)}
    can, graph = ops[BY_ORT_PROVIDER[provider].api], ops[BY_ORT_PROVIDER[built_for].api]
    return can is not None and graph is not None and all(getattr(can, f) or not getattr(graph, f) for f in OP_FLAGS)


def _take(wanted: str, source: str, available: Sequence[str]) -> ProviderChoice:
    """``wanted`` if this onnxruntime has it, else the CPU with the reason said (a reported fallback)."""
    if wanted in available:
        chain = (wanted,) if wanted == CPU else (wanted, CPU)
        return ProviderChoice(BY_ORT_PROVIDER[wanted].id, chain, f"{wanted} ({source})", False)
    reason = (f"{wanted} ({source}) is not in this onnxruntime build (it has {', '.join(available) or 'none'}): "
              f"falling back to {CPU}")
    return ProviderChoice(BY_ORT_PROVIDER[CPU].id, (CPU,), reason, True)


def choose_provider(requested: str | None, built_for: str | None, available: Sequence[str],
                    probed: BackendChoice | None = None) -> ProviderChoice:
    """The provider to run with, and why.

    ``requested`` (not None or "auto") wins; else a graph exported for a provider other than the CPU runs on
    it; else (a CPU graph) the first provider the probe (``probed``, ``edgellm.probe``'s ONNX choice) found
    usable on this hardware that runs the graph's ops, else the CPU. A wanted provider missing from
    ``available`` (``onnxruntime.get_available_providers()``) falls back to the CPU with ``fallback`` set.

    Raises:
        ModelLoadError: ``requested`` names no known execution provider.
    """
    local = [p for p in available if p in BY_ORT_PROVIDER]     # AzureExecutionProvider runs nothing here
    if requested is not None and requested.lower() != AUTO:
        return _take(provider_name(requested), "requested", local)
    built = _known(built_for)
    if built is not None and built != CPU:
        return _take(built, "the graph was exported for it", local)
    for option in probed.considered if probed is not None else ():
        name = BACKENDS[option.backend].ort_provider
        if option.usable and name not in (None, CPU) and name in local and runs_graph(name, built or CPU):
            return ProviderChoice(option.backend, (name, CPU), f"{name} (the probe's choice: {option.reason})", False)
    others = [p for p in local if p != CPU]
    why = ("the graph was exported for it" if built else "default") + (
        f"; {', '.join(others)} not used: the probe found no hardware for them or they do not run this graph's ops"
        if others else "; the only execution provider in this onnxruntime build")
    return _take(CPU, why, local)


def _known(built_for: str | None) -> str | None:
    """``built_for`` as an ORT provider name; None (logged) for a name no row of edgellm.backends knows."""
    if built_for is None:
        return None
    try:
        return provider_name(built_for)
    except ModelLoadError:
        logger.info("the graph names execution provider %r, which edgellm does not know: ignored", built_for)
        return None


def probe_choice(available: Sequence[str]) -> BackendChoice | None:
    """The probe's ONNX choice when this onnxruntime has a provider besides the CPU (a GPU build lists CUDA
    even on a machine without a GPU: the probe says whether the hardware is there); else None, unprobed."""
    if not any(p in BY_ORT_PROVIDER and p != CPU for p in available):
        return None
    from edgellm.errors import ProbeError
    from edgellm.probe import probe
    try:
        return probe().onnx
    except ProbeError as exc:
        logger.warning("the hardware probe failed (%s): choosing the execution provider without it", exc)
        return None


# --- the folder ---

@dataclass(frozen=True)
class Folder:
    """What an ONNX folder says about itself."""

    root: Path
    model: Path
    config: dict[str, Any]       # genai_config.json
    metadata: dict[str, str]     # model.onnx metadata_props
    graph: Any = field(repr=False, compare=False)   # onnx.ModelProto, weights left in model.onnx.data

    @property
    def decoder(self) -> dict[str, Any]:
        return self.config["model"]["decoder"]

    @property
    def built_for(self) -> str | None:
        if "edgellm.provider" in self.metadata:
            return self.metadata["edgellm.provider"]
        options = self.decoder.get("session_options", {}).get("provider_options") or [{}]
        return next(iter(options[0]), None)

    @property
    def shares_buffer(self) -> bool:
        return bool(self.config.get("search", {}).get("past_present_share_buffer", False))


def open_folder(path: str | Path) -> Folder:
    """Read genai_config.json and the model's metadata (not its weights) from a folder or its model.onnx.

    Raises:
        ModelLoadError: no genai_config.json, or it names a missing model file.
    """
    path = Path(path)
    root = path if path.is_dir() else path.parent
    try:
        config = json.loads((root / GENAI_CONFIG).read_text(encoding="utf-8"))
        model = root / config["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(str(root), f"not an ONNX model folder: cannot read {GENAI_CONFIG} ({exc})") from None
    if not path.is_dir() and path.resolve() != model.resolve():
        model = path
    if not model.is_file():
        raise ModelLoadError(str(model), "no such file")
    import onnx     # the graph only: external weights are not loaded
    proto = onnx.load_model(str(model), load_external_data=False)
    metadata = {p.key: p.value for p in proto.metadata_props}
    return Folder(root, model, config, metadata, proto)


# --- the backend ---

class OnnxBackend:
    """An ONNX Runtime session and one KV sequence. See ``edgellm.runtime.base.Backend``."""

    separate_batch_threads = False     # one intra-op pool for decode steps and prompt batches

    def __init__(self, folder: Folder, choice: ProviderChoice, n_ctx: int, n_batch: int, n_threads: int,
                 verbose: bool) -> None:
        self.folder, self.choice, self._vocab, self._verbose = folder, choice, None, verbose
        self.path = folder.model
        self.id = choice.backend
        model = folder.config["model"]
        self.n_ctx_train = int(model["context_length"])
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self.n_vocab = int(model["vocab_size"])
        self.metadata: dict[str, str] = {**folder.metadata, "onnx.provider": choice.providers[0]}
        self.provider_reason = choice.reason
        self.provider_note: str | None = choice.reason if choice.fallback else None
        self.mlock_locked, self.mlock_note = False, None
        self._threads = (n_threads, n_threads)
        self._input_ids = self.folder.decoder["inputs"]["input_ids"]
        self._logits = self.folder.decoder["outputs"]["logits"]
        self._graph = self._layout()
        self._whole: Stage | None = self._stage(str(self.path), range(self.n_layers), "decoder")
        self._split: SplitRun | None = None          # early exit: the graph cut at ``exit_layer``
        self.exit_layer: int | None = None

    # --- loading ---

    @classmethod
    def load(cls, path: str | Path, *, n_ctx: int | None = None, n_threads: int = 1, n_threads_batch: int | None = None,
             n_batch: int | None = None, provider: str | None = None, mmap: bool = True, mlock: bool = False,
             kv_type: str | None = None, n_gpu_layers: int | None = None, verbose: bool = False) -> "OnnxBackend":
        """Load an ONNX folder (or its model.onnx) with a KV cache of ``n_ctx`` tokens (None: base.default_n_ctx,
        at most the exported context). ``provider``: cuda, openvino... (None or "auto": see
        ``choose_provider``; the choice and its reason are in ``provider_reason``, a fallback in ``provider_note``).
        ``kv_type`` and ``n_gpu_layers`` are llama.cpp settings and are ignored (the KV cache has the graph's
        dtype; a provider runs the whole graph); ``mmap=False``/``mlock`` cannot be honoured (ONNX Runtime
        maps aligned external weights itself): noted in ``mlock_note``.

        Raises:
            ModelLoadError: not an ONNX folder, no tokenizer.gguf, or ONNX Runtime cannot create the session.
        """
        folder = open_folder(path)
        vocab_path = folder.root / VOCAB_GGUF
        if not vocab_path.is_file():
            raise ModelLoadError(str(folder.root), f"no {VOCAB_GGUF} (the tokenizer edgellm's runtime uses): "
                                                   "re-export with `edgellm convert MODEL --format onnx`")
        available = ort.get_available_providers()
        # the probe only decides for CPU graphs that nobody asked a provider for
        wants_probe = (provider or AUTO).lower() == AUTO and _known(folder.built_for) in (None, CPU)
        probed = probe_choice(available) if wants_probe else None
        choice = choose_provider(provider, folder.built_for, available, probed)
        logger.info("execution provider: %s", choice.reason)
        if choice.fallback:
            logger.warning("%s", choice.reason)
        train = int(folder.config["model"]["context_length"])
        backend = cls(folder, choice, min(n_ctx or default_n_ctx(train), train), n_batch or DEFAULT_N_BATCH,
                      n_threads, verbose)
        # the tokenizer after the session: ORT's load peaks (mapped weights + prepacked copies) before it settles
        from edgellm.runtime.llamacpp import Vocab
        vocab = backend._vocab = Vocab.load(vocab_path, verbose=verbose)
        backend.special, backend.chat_template = vocab.special, vocab.chat_template
        backend.metadata = {**vocab.metadata, **backend.metadata}
        notes = ["mlock is not supported by ONNX Runtime; the model stays unlocked" if mlock else "",
                 "mmap=False is not supported: ONNX Runtime memory-maps aligned external weights" if not mmap else ""]
        backend.mlock_note = "; ".join(n for n in notes if n) or None
        return backend

    @property
    def n_layers(self) -> int:
        return int(self.folder.decoder["num_hidden_layers"])

    def _create_session(self, model: str | bytes) -> ort.InferenceSession:
        """A session on ``model`` (a path, or a serialized graph whose weights are in this folder) with the
        backend's providers and decode threads; a provider ORT drops is reported in ``provider_note``."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads[0]
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # 3 = errors only: ORT warns about the logits_to_keep default on every load
        options.log_severity_level = 2 if self._verbose else 3
        if isinstance(model, bytes):         # a graph cut from model.onnx: its external data is next to it
            options.add_session_config_entry(EXTERNAL_FOLDER, str(self.folder.root))
            # sessions run one after another: a pool spinning after its run would take the cores from the next
            options.add_session_config_entry(NO_SPINNING, "1")
        try:
            session = ort.InferenceSession(model, options, providers=list(self.choice.providers))
        except Exception as exc:   # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(str(self.path), f"ONNX Runtime could not create a session: {exc}") from None
        active = session.get_providers()
        if self.choice.providers[0] not in active:
            self.provider_note = (f"ONNX Runtime did not enable {self.choice.providers[0]} (active: "
                                  f"{', '.join(active)}); running on {CPU}")
            logger.warning("%s", self.provider_note)
            self.id = BY_ORT_PROVIDER[CPU].id
        return session

    def _stage(self, model: str | bytes, layers: Sequence[int], name: str,
               buffers: list[list[Any]] | None = None) -> Stage:
        session = self._create_session(model)      # first: a provider ORT drops moves the cache to the CPU
        layout = dataclasses.replace(self._graph, device=KV_DEVICES.get(BACKENDS[self.id].api, "cpu"))
        return Stage(lambda: self._create_session(model), layers, layout, name, buffers, session)

    def _layout(self) -> GraphLayout:
        """The cache's names, shape and dtype (genai_config.json; the dtype from the model's past input)."""
        decoder = self.folder.decoder
        names = decoder["inputs"]
        import onnx
        past = next(i for i in self.folder.graph.graph.input if i.name == names["past_key_names"] % 0)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type)
        outputs = decoder["outputs"]
        return GraphLayout(past=(names["past_key_names"], names["past_value_names"]),
                           present=(outputs["present_key_names"], outputs["present_value_names"]),
                           kv_heads=int(decoder["num_key_value_heads"]), head_dim=int(decoder["head_size"]),
                           dtype=np.dtype(dtype), n_ctx=self.n_ctx, shared=self.folder.shares_buffer,
                           device=KV_DEVICES.get(BACKENDS[self.id].api, "cpu"), mask=names["attention_mask"],
                           positions=names.get("position_ids", "position_ids"))

    # --- tokens (llama.cpp) ---

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self._vocab.tokenize(text, add_special=add_special, parse_special=parse_special)

    def token_bytes(self, token: int) -> bytes:
        return self._vocab.token_bytes(token)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._vocab.detokenize(tokens)

    def is_end(self, token: int) -> bool:
        return self._vocab.is_end(token)

    # --- KV cache ---

    @property
    def n_past(self) -> int:
        return self._split.n_past if self._split is not None else self._whole.n_past

    @property
    def _stages(self) -> list[Stage]:
        """The sessions now in use (one over the whole graph, or the split graph's)."""
        if self._split is not None:
            return self._split.stages
        return [self._whole] if self._whole is not None else []

    def decode(self, tokens: Sequence[int], logits_for: LogitsFor = "last") -> np.ndarray:
        wanted = output_indices(len(tokens), logits_for)
        self._check_room(self.n_past, len(tokens), "the sequence")
        if not tokens:
            rows = []
        elif self._split is not None:        # the lower part's states: reused where drafting ran it ahead
            rows = self._split.decode(tokens, wanted)
        else:
            rows = self._decode_whole(tokens, wanted)
        return np.concatenate(rows) if rows else np.empty((0, self.n_vocab), np.float32)

    def _decode_whole(self, tokens: Sequence[int], wanted: Sequence[int]) -> list[np.ndarray]:
        rows = []
        for start, n, outputs, keep in batches(len(tokens), self.n_batch, wanted):
            chunk = np.array([tokens[start:start + n]], np.int64)
            values = self._whole.run({self._input_ids: chunk, LOGITS_TO_KEEP: np.array(keep, np.int64)}, n,
                                     str(self.path))
            if outputs:
                rows.append(kept_rows(values[self._logits][0], n, outputs))
        return rows

    def _check_room(self, start: int, n: int, what: str) -> None:
        if start + n > self.n_ctx:
            raise ContextOverflowError(start + n, self.n_ctx, what)

    def truncate(self, n_past: int) -> bool:
        """Drop cache entries at positions >= ``n_past`` (lower-part states run ahead included)."""
        if self._split is not None:
            self._split.truncate(n_past)
        elif self._whole is not None:
            self._whole.truncate(n_past)
        return True

    # --- the graph cut at a layer (early exit) ---

    def split(self, exit_layer: int | None) -> None:
        """Run the decoder as the stages of the graph cut before layer ``exit_layer`` and before the final norm
        (``edgellm.runtime.onnx_split``), sharing model.onnx.data; None joins it again. The cache is emptied;
        a closed backend stays closed.

        Raises ValueError for a layer outside 1..n_layers or a graph without a shared-buffer cache (GQA)."""
        if exit_layer == self.exit_layer or not self._stages:
            return
        if exit_layer is not None and not self.folder.shares_buffer:
            raise ValueError("splitting the graph needs GroupQueryAttention's shared KV buffers; this graph was "
                             "exported with standard attention ops")
        from edgellm.converters.onnx import split as cutting

        proto, hidden_size = self.folder.graph, int(self.folder.decoder["hidden_size"])
        parts = cutting.cut(proto, exit_layer, self.n_layers, hidden_size) if exit_layer is not None else None
        self._close_stages()                        # one set of prepacked weights at a time
        self.exit_layer = exit_layer
        if parts is None:
            self._whole = self._stage(str(self.path), range(self.n_layers), "decoder")
            return
        fill = cutting.fill(proto, exit_layer, self.n_layers, hidden_size).SerializeToString() \
            if exit_layer < self.n_layers else None
        self._split = SplitRun(self._stage, parts, fill, n_layers=self.n_layers, input_ids=self._input_ids,
                               logits=self._logits, n_batch=self.n_batch, where=str(self.path))

    def _split_run(self, what: str) -> SplitRun:
        if self._split is None:
            raise ValueError(f"{what} needs a split graph (split(exit_layer) first)")
        return self._split

    def lower(self, tokens: Sequence[int]) -> np.ndarray:
        """Run the lower part alone on ``tokens`` after the states already run ahead; returns the residual
        stream after ``exit_layer`` blocks, (len(tokens), hidden_size) float32. A later ``decode`` or ``verify``
        of the same tokens reuses these states and the lower part's cache entries.

        Raises ValueError when the graph is not split, ContextOverflowError past the context."""
        run = self._split_run("lower()")
        self._check_room(self.n_past + len(run.ahead), len(tokens), "the draft")
        hidden, residual = run.run_ahead(tokens)
        return hidden.astype(np.float32) + residual.astype(np.float32)

    def verify(self, tokens: Sequence[int]) -> np.ndarray:
        """Append ``tokens`` and return each one's logits, (len(tokens), n_vocab) float32, as decoding them one
        at a time computes them: the blocks run one row at a time (states run ahead reused), the output head
        once over all rows (``onnx_split``). Greedy tokens taken from these rows are plain decoding's.

        Raises ValueError when the graph is not split, ContextOverflowError past the context."""
        run = self._split_run("verify()")
        self._check_room(self.n_past, len(tokens), "the sequence")
        return run.verify(tokens)

    def fill(self) -> None:
        """Commit the states run ahead without the upper stages: the fill graph writes the upper layers' K/V
        from the exit state (CALM). Positions advance as if the upper stages had run them."""
        self._split_run("fill()").fill()

    # --- resources ---

    def set_threads(self, n_decode: int, n_batch: int) -> None:
        """Recreate the session when the pool size changes (ONNX Runtime fixes it per session). The old one is
        released first: two sessions would hold two prepacked copies of the weights (measured on Gemma 3 270M
        int4: a peak of 824 MiB during thread tuning instead of 502)."""
        if n_decode != self._threads[0]:
            self._threads = (n_decode, n_decode)
            for stage in self._stages:
                stage.renew()
        self._threads = (n_decode, n_decode)
        if n_batch != n_decode:
            logger.debug("ONNX Runtime uses one thread pool: batch threads %d ignored, %d used", n_batch, n_decode)

    @property
    def threads(self) -> tuple[int, int]:
        return self._threads

    @property
    def provider(self) -> str:
        """The ONNX Runtime execution provider the session runs on (first of its active providers)."""
        session = self._stages[0].session if self._stages else None
        return session.get_providers()[0] if session is not None else self.choice.providers[0]

    def _close_stages(self) -> None:
        for stage in self._stages:
            stage.close()
        self._whole = self._split = None

    def close(self) -> None:
        self._close_stages()
        if self._vocab is not None:
            self._vocab.close()
            self._vocab = None


def load(model_path: str | Path, **options: Any) -> OnnxBackend:
    """``Runtime``'s loader for ``.onnx`` files (``edgellm.runtime.core._LOADERS``): ``OnnxBackend.load``."""
    return OnnxBackend.load(model_path, **options)
