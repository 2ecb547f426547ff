"""int8 for the onnx embedding backend: per-channel int8 weights, per-token uint8 activations.

ONNX Runtime's dynamic quantization (`quantize_dynamic`) quantizes each matrix product's input
with one scale for the whole tensor (`DynamicQuantizeLinear`): the scale of a text's activations
then depends on the other texts of its batch and on the batch's padding. Measured on MiniLM: the
same text embedded alone and inside a batch differed by cosine 0.987, so a vector was not a
function of its text, which the embedding cache (keyed by text) and a resumed run (other shards,
other batch mates) rely on. It was also less accurate: cosine to float32 0.975 min / 0.994 mean.

Here every `DynamicQuantizeLinear` is replaced by a per-token asymmetric quantization: each
token's row x is mapped to q = round((x - min) / s) in [0, 255] with s = (max - min) / 255 over
that row alone, so x ~ s*q + min. The integer product runs on ONNX Runtime's fast uint8 x int8
kernels with zero point 0 (its `MatMulInteger` takes only a scalar zero point for the left
input), and the min term comes back after it: x.W ~ s*(q.W_int) + min * colsum(W), with
colsum(W) a constant of the dequantized weights. A token's vector no longer depends on its batch
(cosine 1.000000 between batchings), and accuracy rose to 0.995 min / 0.9991 mean (AMD EPYC with
VNNI), for ~25% less speed than per-tensor int8.

The rewrite must keep the left input uint8 with a scalar zero point: a symmetric int8 variant
(zero point 0, no min term) gave vectors at cosine 0.34 under ONNX Runtime's full graph
optimizations (0.991 with basic ones), so `quantize_int8` checks the published graph against
float32 on a padded batch, as the session that serves it will run it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Bump when the recipe changes: part of the int8 file's name and of the embedder's identity.
INT8_RECIPE = "w8-per-channel.a8-per-token-asym.v1"
# A sanity floor for the published graph (measured ~0.995 min on prose); far below it means the
# rewrite or the runtime went wrong, not ordinary quantization error.
MIN_CHECK_COSINE = 0.98


def _consumers(graph) -> dict[str, list]:
    found: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _only(nodes: list, op_type: str, what: str):
    if len(nodes) != 1 or nodes[0].op_type != op_type:
        raise ValueError(f"unexpected quantized graph: {what} is not a single {op_type}")
    return nodes[0]


def per_token_activations(model):
    """Rewrite a `quantize_dynamic` graph (in place) to per-token asymmetric activations."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers = _consumers(graph)
    constants = {
        "tf_q_inv255": np.array(1 / 255, np.float32),
        "tf_q_eps": np.array(1e-10, np.float32),
        "tf_q_lo": np.array(0, np.float32),
        "tf_q_hi": np.array(255, np.float32),
        "tf_q_zero": np.array(0, np.uint8),
    }
    if opset >= 18:
        constants["tf_q_axes"] = np.array([-1], np.int64)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())

    def reduce(op: str, x: str, out: str):
        if opset >= 18:  # axes became an input in opset 18
            return helper.make_node(op, [x, "tf_q_axes"], [out], keepdims=1)
        return helper.make_node(op, [x], [out], axes=[-1], keepdims=1)

    replaced: dict[str, list] = {}  # DynamicQuantizeLinear name -> its replacement nodes
    shifted: dict[str, tuple[str, str]] = {}  # output-scale Mul name -> (row min, colsum)
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            continue
        x, (q, scale, zero) = node.input[0], node.output
        p = node.name or q
        replaced[node.name] = [
            reduce("ReduceMax", x, f"{p}/max"),
            reduce("ReduceMin", x, f"{p}/min"),
            helper.make_node("Sub", [f"{p}/max", f"{p}/min"], [f"{p}/range"]),
            helper.make_node("Mul", [f"{p}/range", "tf_q_inv255"], [f"{p}/step"]),
            helper.make_node("Max", [f"{p}/step", "tf_q_eps"], [scale]),
            helper.make_node("Sub", [x, f"{p}/min"], [f"{p}/from_min"]),
            helper.make_node("Div", [f"{p}/from_min", scale], [f"{p}/steps"]),
            helper.make_node("Round", [f"{p}/steps"], [f"{p}/rounded"]),
            helper.make_node("Clip", [f"{p}/rounded", "tf_q_lo", "tf_q_hi"], [f"{p}/clipped"]),
            helper.make_node("Cast", [f"{p}/clipped"], [q], to=TensorProto.UINT8),
            helper.make_node("Identity", ["tf_q_zero"], [zero]),
        ]
        for matmul in consumers.get(q, []):
            if matmul.op_type != "MatMulInteger" or matmul.input[0] != q:
                raise ValueError(f"unexpected quantized graph: {q} feeds {matmul.op_type}")
            w_q, w_zero = inits[matmul.input[1]], inits[matmul.input[3]]
            cast = _only(consumers[matmul.output[0]], "Cast", matmul.output[0])
            out_mul = _only(consumers[cast.output[0]], "Mul", cast.output[0])
            scales = producers[next(i for i in out_mul.input if i != cast.output[0])]
            w_scale = inits[next(i for i in scales.input if i != scale)]
            weights = (
                numpy_helper.to_array(w_q).astype(np.float32)
                - numpy_helper.to_array(w_zero).astype(np.float32)
            ) * numpy_helper.to_array(w_scale).astype(np.float32)
            colsum = f"{matmul.name}/colsum"
            graph.initializer.append(numpy_helper.from_array(weights.sum(axis=0), colsum))
            shifted[out_mul.name] = (f"{p}/min", colsum)
    if not replaced:
        raise ValueError("no DynamicQuantizeLinear in the graph: nothing to rewrite")
    nodes = []
    for node in graph.node:
        if node.name in replaced:
            nodes += replaced[node.name]
        elif node.name in shifted:
            row_min, colsum = shifted[node.name]
            out = node.output[0]
            node.output[0] = f"{out}/unshifted"
            nodes += [
                node,
                helper.make_node("Mul", [row_min, colsum], [f"{out}/shift"]),
                helper.make_node("Add", [f"{out}/unshifted", f"{out}/shift"], [out]),
            ]
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    # shapes and types recorded for the old quantized tensors no longer hold
    stale = ("_quantized", "_zero_point", "_scale")
    kept = [v for v in graph.value_info if not v.name.endswith(stale)]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return model


def _session(path: Path | str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as served
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_int8(source: Path, dest: Path, check: dict[str, np.ndarray]) -> Path:
    """int8 weights (per output channel) and per-token activations of the float32 graph
    `source`, written atomically to `dest` once its vectors on the `check` feed agree with
    float32's to cosine MIN_CHECK_COSINE."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    logging.disable(logging.WARNING)  # the quantizer logs a line per tensor on the root logger
    try:
        quantize_dynamic(
            str(source),
            str(tmp),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
        )
        onnx.save(per_token_activations(onnx.load(str(tmp))), str(tmp))
        got = _session(tmp).run(None, check)[0]
        want = _session(source).run(None, check)[0]
        cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        if cosine.min() < MIN_CHECK_COSINE:
            raise ValueError(
                f"int8 graph of {source} is off: cosine {cosine.min():.3f} to float32 "
                f"(< {MIN_CHECK_COSINE}); not published"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        logging.disable(logging.NOTSET)
    log.info("quantized %s to int8 (%s) at %s", source, INT8_RECIPE, dest)
    return dest
