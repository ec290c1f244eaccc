"""A lean one-step ONNX graph for :class:`models.instrument.InstrumentLSTM`, written op by op.

The dynamo exporter turns the LSTM's step into about forty nodes (reshapes,
transposes and slices around the two LSTM ops, GELU spelled out as
Div/Erf/Add/Mul/Mul).  At one note per call the graph's cost is mostly
per-node overhead, so this module writes the same function in sixteen
nodes: embedding lookup, input projection, two ONNX ``LSTM`` nodes (one per
layer, the first layer's last hidden state fed straight to the second),
the read-out, and the state split and re-joined.  The weights are the
model's own, with PyTorch's gate order (input, forget, cell, output)
rearranged to ONNX's (input, output, forget, cell).

Inputs and outputs are named and shaped exactly as the dynamo export's, so
the runtime and the model card do not change; :mod:`export.parity` checks
the result against PyTorch like any other export.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 20  # the first with a Gelu operator
IR_VERSION = 9

# Rows of a PyTorch LSTM weight, in blocks of ``hidden``: i, f, g, o -> ONNX i, o, f, c(g).
ONNX_GATE_ORDER = (0, 3, 1, 2)

EXPECTED = ("pitch.weight", "inp.0.weight", "inp.0.bias", "out.1.weight", "out.1.bias",
            "out.3.weight", "out.3.bias")


def onnx_gates(weight: np.ndarray, hidden: int) -> np.ndarray:
    """Rows of a PyTorch LSTM weight or bias, re-ordered into ONNX's gate order."""
    return np.concatenate([weight[k * hidden:(k + 1) * hidden] for k in ONNX_GATE_ORDER])


def lstm_step_graph(state: dict[str, np.ndarray], hparams: dict, names: tuple[list[str], list[str]]
                    ) -> onnx.ModelProto:
    """The one-step graph of an InstrumentLSTM from its ``state_dict`` (as float32 numpy arrays).

    ``names`` are the graph's (inputs, outputs): pitch, feats, h, c and
    logits, h_out, c_out, in that order.
    """
    missing = [k for k in EXPECTED if k not in state]
    layers, hidden, n_features = hparams["layers"], hparams["hidden"], hparams["n_features"]
    missing += [f"lstm.{w}_l{i}" for i in range(layers) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                if f"lstm.{w}_l{i}" not in state]
    if missing:
        raise ValueError(f"not an InstrumentLSTM state: missing {', '.join(missing)}")
    (pitch, feats, h, c), (logits, h_out, c_out) = names
    inits = {
        "embedding": state["pitch.weight"],
        "W_in": state["inp.0.weight"].T, "b_in": state["inp.0.bias"],
        "W_hidden": state["out.1.weight"].T, "b_hidden": state["out.1.bias"],
        "W_logits": state["out.3.weight"].T, "b_logits": state["out.3.bias"],
        "layer_sizes": np.ones(layers, dtype=np.int64), "axis0": np.zeros(1, dtype=np.int64),
    }
    node = helper.make_node
    nodes = [
        node("Split", [h, "layer_sizes"], [f"h{i}" for i in range(layers)], axis=0),
        node("Split", [c, "layer_sizes"], [f"c{i}" for i in range(layers)], axis=0),
        node("Gather", ["embedding", pitch], ["pitch_vec"], axis=0),
        node("Concat", ["pitch_vec", feats], ["note"], axis=1),
        node("Gemm", ["note", "W_in", "b_in"], ["x_linear"]),
        node("Gelu", ["x_linear"], ["x"]),
        node("Unsqueeze", ["x", "axis0"], ["x_seq"]),  # [seq=1, batch=1, hidden]
    ]
    layer_in = "x_seq"
    for i in range(layers):
        inits[f"W{i}"] = onnx_gates(state[f"lstm.weight_ih_l{i}"], hidden)[None]
        inits[f"R{i}"] = onnx_gates(state[f"lstm.weight_hh_l{i}"], hidden)[None]
        inits[f"B{i}"] = np.concatenate([onnx_gates(state[f"lstm.bias_ih_l{i}"], hidden),
                                         onnx_gates(state[f"lstm.bias_hh_l{i}"], hidden)])[None]
        # For one step, the last hidden state [1, batch, hidden] is also the next layer's input sequence.
        nodes.append(node("LSTM", [layer_in, f"W{i}", f"R{i}", f"B{i}", "", f"h{i}", f"c{i}"],
                          ["", f"h{i}_next", f"c{i}_next"], hidden_size=hidden))
        layer_in = f"h{i}_next"
    nodes += [
        node("Concat", [layer_in, "x_seq"], ["skip_seq"], axis=2),
        node("Squeeze", ["skip_seq", "axis0"], ["skip"]),
        node("Gemm", ["skip", "W_hidden", "b_hidden"], ["y_linear"]),
        node("Gelu", ["y_linear"], ["y"]),
        node("Gemm", ["y", "W_logits", "b_logits"], [logits]),
        node("Concat", [f"h{i}_next" for i in range(layers)], [h_out], axis=0),
        node("Concat", [f"c{i}_next" for i in range(layers)], [c_out], axis=0),
    ]
    n_parts = state["out.3.bias"].shape[0]
    state_shape = [layers, 1, hidden]
    tensor = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "instrument_lstm_step",
        [tensor(pitch, TensorProto.INT64, [1]), tensor(feats, TensorProto.FLOAT, [1, n_features]),
         tensor(h, TensorProto.FLOAT, state_shape), tensor(c, TensorProto.FLOAT, state_shape)],
        [tensor(logits, TensorProto.FLOAT, [1, n_parts]), tensor(h_out, TensorProto.FLOAT, state_shape),
         tensor(c_out, TensorProto.FLOAT, state_shape)],
        [numpy_helper.from_array(np.ascontiguousarray(v), name) for name, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="coplayer")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model
