"""Cutting an exported decoder graph at a layer, for early exit: the graph is not re-exported, its nodes are
partitioned, and every part points at the same ``model.onnx.data`` (no weight byte is copied).

``cut(model, E)`` returns the parts of one decoder step, cut before layer E and before the final norm:

    lower   input_ids, attention_mask, [position_ids], past 0..E-1  ->  boundary(E), present 0..E-1
    middle  boundary(E), attention_mask, [position_ids], past E..L-1  ->  boundary(L), present E..L-1
    head    boundary(L), [logits_to_keep]  ->  logits                  (final norm and output projection)

(no middle when E == L). ``boundary(i)`` names the two inputs of layer i's first node (its skip norm, which
adds them), so each part runs exactly the nodes the whole graph runs after them; their sum is the residual
stream after i blocks. The head is a part of its own so a verifier can run the blocks one row at a time, as
one-token decoding does (ONNX Runtime's attention rounds a batch of rows differently from one row), and the
output head, whose rows are independent, once over all of them. ``fill(model, E)`` is the part CALM's early
exit needs: from layer E's input alone, every upper layer's K and V projections (its input norm, QKV
projection, Q/K norms and RoPE, and the attention op that appends them to the cache), so a token that exits
at E still leaves the upper layers' cache entries later tokens attend to (Schuster et al. 2022, "Confident
Adaptive Language Modeling" 3.3). ``head_weights`` reads the output projection's rows and the final norm, for
exit heads computed in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgellm.converters.onnx import decoder, quant

FINAL_NORM = "/model/norm/"                           # the node after the last layer (decoder._head)


def boundary(layer: int) -> tuple[str, str]:
    """The names of the two tensors (hidden, residual) passed between parts cut before ``layer``."""
    return f"cut.{layer}.hidden", f"cut.{layer}.residual"


@dataclass(frozen=True)
class Parts:
    lower: onnx.ModelProto
    middle: onnx.ModelProto | None        # None when the cut is at the final norm
    head: onnx.ModelProto
    exit_layer: int


def layer_input_node(model: onnx.ModelProto, layer: int, n_layers: int) -> onnx.NodeProto:
    """The node that adds layer ``layer``'s two inputs (the final norm's for ``layer == n_layers``).

    Raises ValueError when ``layer`` is outside [1, n_layers] or the graph was not exported by edgellm."""
    if not 1 <= layer <= n_layers:
        raise ValueError(f"exit layer {layer} is outside 1..{n_layers}")
    prefix = FINAL_NORM if layer == n_layers else f"/model/layers.{layer}/input_layernorm/"
    for node in model.graph.node:
        if node.name.startswith(prefix) and len(node.input) >= 2:
            return node
    raise ValueError(f"no node {prefix}* with two inputs: not a decoder graph exported by edgellm")


def cut(model: onnx.ModelProto, exit_layer: int, n_layers: int, hidden_size: int) -> Parts:
    """The parts of ``model`` cut before layer ``exit_layer`` and before the final norm (module docstring).

    Raises ValueError for a layer outside 1..n_layers or a graph edgellm did not export."""
    rename: dict[str, str] = {}
    for layer in {exit_layer, n_layers}:
        node = layer_input_node(model, layer, n_layers)
        rename.update(zip(node.input[:2], boundary(layer)))
    exit_info, final_info = _boundary_info(model, exit_layer, hidden_size), _boundary_info(model, n_layers,
                                                                                             hidden_size)
    lower = _part(model, "lower", _presents(model, range(exit_layer)), rename=rename, extra_outputs=exit_info)
    middle = None
    if exit_layer < n_layers:
        middle = _part(model, "middle", _presents(model, range(exit_layer, n_layers)), rename=rename,
                       extra_inputs=exit_info, extra_outputs=final_info)
    head = _part(model, "head", [decoder.LOGITS], rename=rename, extra_inputs=final_info)
    return Parts(lower, middle, head, exit_layer)


def fill(model: onnx.ModelProto, exit_layer: int, n_layers: int, hidden_size: int) -> onnx.ModelProto:
    """Layers ``exit_layer``..L-1's K/V from layer ``exit_layer``'s input (``boundary(exit_layer)``) alone:
    each upper layer's input norm reads the exit state instead of the layer below. Outputs: present E..L-1.

    Raises ValueError as ``cut`` does, or when ``exit_layer == n_layers`` (nothing to fill)."""
    if exit_layer >= n_layers:
        raise ValueError(f"no layer above {exit_layer} of {n_layers} to fill")
    rename = {}
    for i in range(exit_layer, n_layers):
        node = layer_input_node(model, i, n_layers)
        rename.update(zip(node.input[:2], boundary(exit_layer)))
    # the attention op's first output (the attended values) goes nowhere: ORT still computes it, over the
    # current tokens only, which costs far less than the o_proj and MLP the fill skips
    return _part(model, "fill", _presents(model, range(exit_layer, n_layers)), rename=rename,
                 extra_inputs=_boundary_info(model, exit_layer, hidden_size), by_layer_input=True)


def _boundary_info(model: onnx.ModelProto, layer: int, hidden_size: int) -> list[onnx.ValueInfoProto]:
    io = _io_type(model)
    return [helper.make_tensor_value_info(name, io, ["batch_size", "sequence_length", hidden_size])
            for name in boundary(layer)]


def _presents(model: onnx.ModelProto, layers: Iterable[int]) -> list[str]:
    layers = list(layers)
    return _ordered(model, [decoder.PRESENT_KEY % i for i in layers] + [decoder.PRESENT_VALUE % i for i in layers])


def _io_type(model: onnx.ModelProto) -> int:
    logits = next(o for o in model.graph.output if o.name == decoder.LOGITS)
    return logits.type.tensor_type.elem_type


def _ordered(model: onnx.ModelProto, names: Iterable[str]) -> list[str]:
    """``names`` in the order the graph declares its outputs (the halves keep ORT GenAI's layout)."""
    wanted = set(names)
    return [o.name for o in model.graph.output if o.name in wanted]


def _part(model: onnx.ModelProto, name: str, outputs: Sequence[str], *, rename: dict[str, str],
          extra_outputs: Sequence[onnx.ValueInfoProto] = (), extra_inputs: Sequence[onnx.ValueInfoProto] = (),
          by_layer_input: bool = False) -> onnx.ModelProto:
    """The nodes ``outputs`` (and ``extra_outputs``) depend on, with tensor names in ``rename`` replaced (a
    renamed tensor is an input of the part when ``extra_inputs`` declares it). ``by_layer_input``: the rename
    applies only where a layer's input node reads the tensor (the fill reads the exit state at every layer)."""
    nodes = [_renamed(n, rename, by_layer_input) for n in model.graph.node]
    producers = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    declared = {v.name for v in extra_inputs}
    initializers = {t.name: t for t in model.graph.initializer}
    wanted = list(outputs) + [v.name for v in extra_outputs]
    kept: set[int] = set()
    stack = list(wanted)
    seen: set[str] = set()
    while stack:
        tensor = stack.pop()
        if tensor in seen or tensor in declared or tensor not in producers:
            continue
        seen.add(tensor)
        index = producers[tensor]
        if index not in kept:
            kept.add(index)
            stack.extend(i for i in nodes[index].input if i)
    part_nodes = [nodes[i] for i in sorted(kept)]
    used = {i for n in part_nodes for i in n.input if i}
    inputs = [v for v in model.graph.input if v.name in used] + [v for v in extra_inputs if v.name in used]
    values = {o.name: o for o in model.graph.output}
    graph = helper.make_graph(part_nodes, f"main_graph.{name}", inputs,
                              [values[o] for o in outputs] + list(extra_outputs),
                              [initializers[n] for n in sorted(used & initializers.keys())])
    part = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=model.producer_name,
                             producer_version=model.producer_version)
    part.ir_version = model.ir_version
    return part


def _renamed(node: onnx.NodeProto, rename: dict[str, str], layer_input_only: bool) -> onnx.NodeProto:
    """``node`` with inputs and outputs renamed by ``rename`` (only its inputs, and only when it is a layer's
    input node, with ``layer_input_only``)."""
    if layer_input_only and not ("/input_layernorm/" in node.name):
        return node
    if not any(t in rename for t in (*node.input, *node.output)):
        return node
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[:] = [rename.get(t, t) for t in node.input]
    if not layer_input_only:
        copy.output[:] = [rename.get(t, t) for t in node.output]
    return copy


# --- the output head's weights, for exit heads in numpy ---

@dataclass(frozen=True)
class HeadWeights:
    rows: np.ndarray          # (len(ids), hidden) float32: output-projection rows, dequantized
    norm_weight: np.ndarray   # (hidden,) float32: the final norm's weight (Gemma's +1 included)
    norm_eps: float
    softcap: float            # final logit soft-capping, 0 = none


def head_weights(model: onnx.ModelProto, folder: str | Path, ids: np.ndarray) -> HeadWeights:
    """Rows ``ids`` of the output projection and the final norm of an edgellm export, read from the weights
    file (only the wanted rows of a memory map). The projection is a MatMulNBits node (int4/int8) or a float
    MatMul; the norm is the SkipSimplifiedLayerNormalization or the standard-op norm after the last layer.

    Raises ValueError for a graph whose head is neither (e.g. DequantizeLinear for other providers)."""
    nodes = {n.name: n for n in model.graph.node}
    tensors = _Initializers(model, Path(folder))
    ids = np.asarray(ids, np.int64)
    if "/lm_head/MatMulNBits" in nodes:
        node = nodes["/lm_head/MatMulNBits"]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        packed = tensors.rows(node.input[1], ids)                       # (len, k_blocks, blob)
        kb = packed.shape[1]
        scales = tensors.full(node.input[2]).astype(np.float32).reshape(-1, kb)[ids]
        zeros = tensors.full(node.input[3]).reshape(attrs["N"], -1)[ids] if len(node.input) > 3 and node.input[3] \
            else None
        rows = quant.dequantize(quant.Quantized(packed, scales, zeros), attrs["bits"], attrs["block_size"], attrs["K"])
    elif "/lm_head/MatMul" in nodes:                                    # float weights stored as W^T (K, N)
        rows = tensors.full(nodes["/lm_head/MatMul"].input[1])[:, ids].T.astype(np.float32)
    else:
        raise ValueError("the output projection is neither MatMulNBits nor a float MatMul (export for the CPU)")
    if f"{FINAL_NORM}SkipLayerNorm" in nodes:                          # contrib op: weight input 2, epsilon attr
        final = nodes[f"{FINAL_NORM}SkipLayerNorm"]
        weight, eps = final.input[2], next(helper.get_attribute_value(a) for a in final.attribute
                                           if a.name == "epsilon")
    elif f"{FINAL_NORM}Scale" in nodes:                                # standard ops (layers.rms_norm)
        weight, eps = nodes[f"{FINAL_NORM}Scale"].input[1], tensors.full(nodes[f"{FINAL_NORM}AddEps"].input[1])
    else:
        raise ValueError("no final norm node in the graph")
    cap = nodes.get("/lm_head/softcap/Div")
    return HeadWeights(np.ascontiguousarray(rows, np.float32), tensors.full(weight).astype(np.float32),
                       float(eps), float(tensors.full(cap.input[1])) if cap is not None else 0.0)


class _Initializers:
    """Initializers by name: inline ones decoded, external ones read from a memory map of their file."""

    def __init__(self, model: onnx.ModelProto, folder: Path) -> None:
        self._by_name = {t.name: t for t in model.graph.initializer}
        self._folder = folder

    def _external(self, t: onnx.TensorProto) -> dict[str, str]:
        return {e.key: e.value for e in t.external_data}

    def full(self, name: str) -> np.ndarray:
        t = self._by_name[name]
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = self._external(t)
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        return np.array(np.memmap(self._folder / info["location"], dtype, "r", int(info.get("offset", 0)),
                                  tuple(t.dims)))

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` along the first axis, copying only those."""
        t = self._by_name[name]
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)[ids]
        info = self._external(t)
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        view = np.memmap(self._folder / info["location"], dtype, "r", int(info.get("offset", 0)), tuple(t.dims))
        return np.array(view[ids])
