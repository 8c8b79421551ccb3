"""Tiny random-weight models for the dataset-preparation tests: a WD14-style ONNX tagger and a BLIP captioner."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# selected_tags.csv rows: 4 ratings, general tags, character tags (the real file's layout)
TAGGER_TAGS = [("general", "9"), ("sensitive", "9"), ("questionable", "9"), ("explicit", "9"),
               ("red_theme", "0"), ("green_theme", "0"), ("blue_theme", "0"), ("^_^", "0"), ("1girl", "0"),
               ("hatsune_miku", "4")]


def write_tiny_tagger(folder: Path, size: int = 64, fixed_batch: int | None = None) -> Path:
    """model.onnx + selected_tags.csv. Input NHWC float BGR 0..255; each output is a sigmoid of a linear function of
    the image's mean B, G, R: `red_theme` fires on red images, `green_theme` on green, `blue_theme` on blue,
    `^_^` and `1girl` always, `hatsune_miku` never, rating `sensitive` wins."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    n = len(TAGGER_TAGS)
    # columns: weights on mean (B, G, R) scaled to [-1, 1]
    w = np.zeros((3, n), np.float32)
    b = np.zeros(n, np.float32)
    b[:4] = [0.0, 2.0, -1.0, -2.0]
    w[2, 4], w[1, 5], w[0, 6] = 8.0, 8.0, 8.0
    b[4:7] = -4.0
    b[7], b[8], b[9] = 5.0, 5.0, -5.0
    batch = fixed_batch if fixed_batch else "batch"
    inp = helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [batch, size, size, 3])
    out = helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, n])
    nodes = [
        helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["mean", "scale"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "one"], ["centred"]),
        helper.make_node("MatMul", ["centred", "w"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    inits = [helper.make_tensor("scale", TensorProto.FLOAT, [], [2 / 255]),
             helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
             helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.flatten().tolist()),
             helper.make_tensor("b", TensorProto.FLOAT, b.shape, b.tolist())]
    graph = helper.make_graph(nodes, "tiny_tagger", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    lines = ["tag_id,name,category,count"] + [f"{i},{name},{cat},100" for i, (name, cat) in enumerate(TAGGER_TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


BLIP_WORDS = ("[PAD] [UNK] [CLS] [SEP] [MASK] [DEC] a picture of cat dog red blue green girl sitting on the with "
              "sword castle night").split()


def write_tiny_blip(folder: Path, seed: int = 0) -> Path:
    """A random-weight BLIP captioner (tiny vision and text towers, 32x32 input) with a small BERT word-piece
    tokenizer, saved like a hub model: pass the folder as --caption_weights."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers import BlipImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BLIP_WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    config = BlipConfig(
        text_config=dict(vocab_size=len(BLIP_WORDS), max_position_embeddings=128, encoder_hidden_size=32,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=0, sep_token_id=3, eos_token_id=3, **tiny),
        vision_config=dict(image_size=32, patch_size=8, **tiny))
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder
