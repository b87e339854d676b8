"""Token pruning: FLOPs and ONNX Runtime latency against the unpruned encoder, and accuracy retained.

Speed: randomly initialised ViT-B/16 (224², 196 patches) and CLIP ViT-L/14-336 vision tower
(336², 576 patches), pruned after block 2 (0-based: blocks 0-2 see every token) at keep 25%, 11%
and 5%; each method's graphs are timed in rounds alternating with the unpruned graph of the same
run (batch 1, ONNX Runtime CPU). CLIP-L is also pruned LLaVA-style at the output of its feature
layer (block 22 = layer -2), against the same tower ending there with all 576 patches: the encoder
is not faster, but the projector and LLM get K tokens instead of 576.

Accuracy: the Fashion-MNIST ViT and CLIP-style models of bench/fashion_mnist.py (trained on
first use), pruned after block 2 and after block 4 (= layer -2) of 6, top-1 on the test images
(the CLIP model zero-shot against "a photo of a {class}" captions) in PyTorch, with the exported
graph's ONNX Runtime top-1 compared at keep 25%. TRIM's K is also calibrated through the pipeline
(stage token_prune on 200 training images). Random-K gets a fresh subset per image, seeded by
(seed, image id), through its ``keep_idx`` input: mean and spread over three seeds. ``--methods``
picks the selectors; accuracy rows of a partial run merge into the existing JSON.

    python bench/token_pruning.py [--parts speed accuracy] [--encoders vit-b16 clip-l14-336] [--iterations 10]
    python bench/token_pruning.py --parts accuracy --methods visionzip cdpruner random --test-images 2000
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import fashion_mnist as fm
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from common import RESULTS, run_recipe, table, write_json

from export import inspect as onnx_inspect
from export import onnx as onnx_export
from methods.tokens.base import Method
from methods.tokens.cdpruner import CDPruner
from methods.tokens.cls_attention import ClsAttention
from methods.tokens.divprune import DivPrune
from methods.tokens.global_attention import GlobalAttention
from methods.tokens.hiprune import OBJECT_FRACTION as HIPRUNE_OBJECT_FRACTION
from methods.tokens.hiprune import HiPrune
from methods.tokens.hiprune import anchor_count as hiprune_anchors
from methods.tokens.pruner import Placement, TokenPruner
from methods.tokens.random import RandomK, draw, per_image
from methods.tokens.trim import Trim
from methods.tokens.visionzip import REFERENCE_RATIO, VisionZip, contextual_count
from models.adapters import adapter_for
from models.spec import ModelSpec
from tasks import TASKS, TaskModel

LAYER = 2
SPEED_KEEPS = (0.25, 0.11, 0.05)
ACCURACY_KEEPS = (0.5, 0.25, 0.11, 0.05)
ROUNDS = 5
TASK = "image-feature-extraction"
TRIM_PROMPT = "a photo of a"  # also CDPruner's instruction
RANDOM_SEEDS = (0, 1, 2)  # random-K: a fresh subset per image, seeded by (seed, image id), mean and spread over these


def encoder(name: str):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTModel

    torch.manual_seed(0)
    if name == "vit-b16":
        return ViTModel(ViTConfig(), add_pooling_layer=False).eval()  # the ViT-B/16 defaults: 224², 12 x 768
    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14, projection_dim=768)
    return CLIPVisionModelWithProjection(cfg).eval()


def method(name: str, k: int, model, sign: float = 1.0, alpha: float = 0.1) -> Method:
    if name in ("trim", "cdpruner"):
        return {"trim": Trim, "cdpruner": CDPruner}[name](k, sign, adapter_for(model.config.model_type, TASK)
                                                         .joint_space(model))
    if name == "hiprune":
        return HiPrune(k, hiprune_anchors(k, alpha))
    if name == "visionzip":
        return VisionZip(k, contextual_count(k, REFERENCE_RATIO))
    return {"cls_attention": ClsAttention, "global_attention": GlobalAttention, "divprune": DivPrune,
            "random": RandomK}[name](k)


def install(model, name: str, k: int, layer: int, fuse: bool, output: bool = False, sign: float = 1.0,
            alpha: float = 0.1, text: torch.Tensor | None = None) -> TokenPruner:
    """The selector in place; its extra inputs default to ``text`` (text_embeds) and one seeded subset (keep_idx)."""
    adapter = adapter_for(model.config.model_type, TASK)
    object_layer = round(layer * HIPRUNE_OBJECT_FRACTION) if name == "hiprune" else None
    chosen = method(name, k, model, sign, alpha)
    patches = adapter.vision_tokens(model).patches
    defaults = {n: {"text_embeds": text, "keep_idx": draw(patches, k, 0)[None]}[n] for n in chosen.inputs}
    return TokenPruner(model, adapter, chosen, Placement(layer, fuse, output, object_layer), defaults=defaults)


def export(model, folder: Path, tag: str, x: torch.Tensor) -> tuple[Path, int]:
    """The task model with its installed pruner as ONNX, and its MatMul/Conv FLOPs."""
    tm = TaskModel(model, ModelSpec(source="random", task=TASK))
    path = folder / f"{tag}.onnx"
    proto = onnx_export.export(tm, tm.example({"pixel_values": x}), path, tm.input_names, tm.output_names, 18)
    return path, onnx_inspect.matmul_flops(proto)


def time_group(paths: dict[str, Path], feeds: dict[str, dict], iterations: int, threads: int) -> dict[str, float]:
    """Median ms per graph, measured in alternating rounds so machine noise hits every graph alike."""
    sessions = {k: onnx_export.session(p, threads=threads) for k, p in paths.items()}
    for k, s in sessions.items():
        s.run(None, feeds[k])
    times = {k: [] for k in sessions}
    per_round = max(1, iterations // ROUNDS)
    for _ in range(ROUNDS):
        for k, s in sessions.items():
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(ts) * 1e3 for k, ts in times.items()}


def speed(name: str, iterations: int, methods: list[str], threads: int) -> dict:
    model = encoder(name)
    patches = adapter_for(model.config.model_type, TASK).vision_tokens(model).patches
    size = model.config.image_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, model.config.projection_dim) if hasattr(model.config, "projection_dim") else None
    rows, runs = [], []
    with tempfile.TemporaryDirectory(dir=RESULTS) as tmp:
        folder = Path(tmp)
        dense = export(model, folder, "dense", x)
        groups = [(m, False) for m in methods]
        if name.startswith("clip"):
            groups.append(("cls_attention", True))  # LLaVA placement: output of the feature layer (-2)
        feature_layer = model.config.num_hidden_layers - 2
        if any(at_output for _, at_output in groups):
            # LLaVA's unpruned tower: blocks up to the feature layer, every patch out (K = N, no selection effect)
            pruner = install(model, "cls_attention", patches, feature_layer, fuse=False, output=True)
            tower = export(model, folder, "tower", x)
            pruner.remove()
        for m, at_output in groups:
            t0 = time.time()
            layer = feature_layer if at_output else LAYER
            base, base_tokens = (tower, patches) if at_output else (dense, patches + 1)
            paths, feeds, info = {"unpruned": base[0]}, {"unpruned": {"pixel_values": x.numpy()}}, {}
            for keep in SPEED_KEEPS:
                k = round(keep * patches)
                pruner = install(model, m, k, layer, fuse=m == "trim", output=at_output, text=text)
                tag = f"{m}-{keep}{'-output' if at_output else ''}"
                paths[tag], flops = export(model, folder, tag, x)
                feeds[tag] = {"pixel_values": x.numpy(), **{n: pruner.default(n, 1).numpy() for n in pruner.input_names}}
                info[tag] = {"keep": keep, "k": k, "tokens_out": pruner.tokens_out, "flops": flops}
                pruner.remove()
            ms = time_group(paths, feeds, iterations, threads)
            where = f"output of block {layer}" if at_output else f"after block {layer}"
            rows.append([f"{m} ({where})", "unpruned", base_tokens, f"{base[1] / 1e9:.1f}", f"{ms['unpruned']:.0f}",
                         "1.00"])
            for tag, i in info.items():
                ratio = ms[tag] / ms["unpruned"]
                rows.append(["", f"{i['keep']:.0%} (K={i['k']})", i["tokens_out"], f"{i['flops'] / 1e9:.1f}",
                             f"{ms[tag]:.0f}", f"{ratio:.2f}"])
                runs.append({"encoder": name, "method": m, "layer": layer, "output": at_output, **i,
                             "median_ms": round(ms[tag], 2), "unpruned_ms": round(ms["unpruned"], 2),
                             "unpruned_flops": base[1], "latency_ratio": round(ratio, 4)})
            for tag, p in paths.items():
                if tag != "unpruned":
                    p.unlink()
            gc.collect()
            print(f"  {name} {m}: {time.time() - t0:.0f}s", flush=True)
    print(f"\n{name}: batch 1, ONNX Runtime CPU, {threads} threads, median of {max(1, iterations // ROUNDS) * ROUNDS} "
          "runs per graph in rounds alternating with the unpruned graph; tokens out = sequence after the pruning "
          "point (with [CLS] inside the encoder; patch features only at the output)")
    print(table(["method", "keep", "tokens out", "GFLOPs", "ms", "latency / unpruned"], rows))
    return {"patches": patches, "runs": runs}


class TestSet:
    def __init__(self, n: int):
        images, labels = fm.load("test")
        self.x, self.labels = fm.pixels(images[:n]), labels[:n]

    def batches(self, size: int = 1000, random_k: tuple[int, int] | None = None):
        """{input: tensor} batches; ``random_k`` = (K, seed) adds random-K's ``keep_idx``, one subset per image."""
        for i in range(0, len(self.labels), size):
            batch = {"pixel_values": self.x[i:i + size]}
            if random_k is not None:
                k, seed = random_k
                batch["keep_idx"] = torch.stack([per_image_subset(PATCHES, k, seed, i + j)
                                                 for j in range(len(batch["pixel_values"]))])
            yield batch


def per_image_subset(patches: int, k: int, seed: int, image: int) -> torch.Tensor:
    """vlm.md §6: a uniform subset of K patches for one image, seeded by (seed, image id)."""
    return torch.from_numpy(per_image(patches, k, seed, image))


@torch.no_grad()
def predictions(tm: TaskModel, data: TestSet, classify, random_k=None) -> np.ndarray:
    return np.concatenate([classify(tm(*tm.example(b))[0]) for b in data.batches(random_k=random_k)])


@torch.no_grad()
def onnx_predictions(tm: TaskModel, data: TestSet, classify, folder: Path, random_k=None) -> np.ndarray:
    path = folder / "check.onnx"
    onnx_export.export(tm, tm.example(next(data.batches())), path, tm.input_names, tm.output_names, 18)
    sess = onnx_export.session(path, threads=1)
    out = []
    for b in data.batches(random_k=random_k):
        feed = {n: t.numpy() for n, t in zip(tm.input_names, tm.example(b))}
        out.append(classify(torch.from_numpy(sess.run(None, feed)[0])))
    return np.concatenate(out)


# (label, method, fuse, TRIM sign, HiPrune alpha)
VARIANTS = [("cls_attention", "cls_attention", False, 1.0, 0.1), ("cls_attention +fused", "cls_attention", True, 1.0, 0.1),
            ("global_attention", "global_attention", False, 1.0, 0.1),
            ("global_attention +fused", "global_attention", True, 1.0, 0.1), ("divprune", "divprune", False, 1.0, 0.1),
            ("hiprune", "hiprune", False, 1.0, 0.1), ("hiprune alpha=0.5", "hiprune", False, 1.0, 0.5),
            ("visionzip", "visionzip", False, 1.0, 0.1), ("random", "random", False, 1.0, 0.1)]
TRIM_VARIANTS = [("trim (paper sign)", "trim", True, 1.0, 0.1), ("trim (released-code sign)", "trim", True, -1.0, 0.1),
                 ("cdpruner (paper sign)", "cdpruner", False, 1.0, 0.1),
                 ("cdpruner (released-code sign)", "cdpruner", False, -1.0, 0.1)]
ACCURACY_LAYERS = (LAYER, 4)  # block 4 of 6 = layer -2, the feature layer a LLaVA projector reads
PATCHES = 49


def accuracy(data: TestSet, methods: list[str]) -> dict:
    """Top-1 of every variant of ``methods`` at each keep, both models, both layers (rows merge into the JSON)."""
    from transformers import CLIPModel, ViTForImageClassification

    vit_dir, clip_dir = fm.ensure("vit"), fm.ensure("clip")
    vit = ViTForImageClassification.from_pretrained(vit_dir).eval()
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = fm.build_tokenizer()
    with torch.no_grad():
        ids = fm.captions(tokenizer, fm.EVAL_TEMPLATE, random.Random(0))
        classes = F.normalize(clip.get_text_features(input_ids=ids).pooler_output, dim=-1)
        prompt = clip.get_text_features(input_ids=tokenizer([TRIM_PROMPT], return_tensors="pt")["input_ids"]).pooler_output
    vision = vision_tower(clip_dir)
    chosen = [v for v in VARIANTS if v[1] in methods]
    models = {"vit": (vit, "image-classification", lambda out: out.argmax(-1).numpy(), chosen),
              "clip": (vision, TASK, lambda emb: (emb @ classes.T).argmax(-1).numpy(),
                       chosen + [v for v in TRIM_VARIANTS if v[1] in methods])}
    dense = {kind: float((predictions(TaskModel(m, ModelSpec(source="x", task=t)), data, c) == data.labels).mean())
             for kind, (m, t, c, _) in models.items()}
    results: dict = {"dense": dense}
    with tempfile.TemporaryDirectory(dir=RESULTS) as tmp:
        for layer in ACCURACY_LAYERS:
            rows = []
            for kind, (model, task, classify, variants) in models.items():
                rows.append([kind, "unpruned", f"{dense[kind]:.4f}", "", "", "", "", ""])
                for label, name, fuse, sign, alpha in variants:
                    t0 = time.time()
                    run = Variant(model, task, classify, data, Path(tmp), layer, prompt)
                    accs, check, seeds = run.measure(name, fuse, sign, alpha)
                    cells = [f"{a:.4f} ({a / dense[kind]:.1%})" + (f" ±{np.std(s):.4f}" if seeds else "")
                             for a, s in zip(accs, seeds or accs)]
                    shown = f"{label} (mean of {len(RANDOM_SEEDS)} seeds ± std)" if seeds else label
                    rows.append(["", shown, "", *cells, check])
                    results[f"{kind}/layer{layer}/{label}"] = {
                        "accuracy": dict(zip(map(str, ACCURACY_KEEPS), accs)), "onnx_agreement_at_0.25": check,
                        **({"per_seed": dict(zip(map(str, ACCURACY_KEEPS), seeds))} if seeds else {}),
                        "seconds": round(time.time() - t0, 1)}
            if "trim" in methods:
                conditional = trim_class_conditional(vision, clip, tokenizer, data, classes, layer)
                rows.append(["", "trim (prompt 'a photo of a {class}', per class)", "",
                             *[f"{a:.4f} ({a / dense['clip']:.1%})" for a in conditional], ""])
                results[f"clip/layer{layer}/trim class-conditional"] = dict(zip(map(str, ACCURACY_KEEPS), conditional))
            print(f"\nFashion-MNIST test set ({len(data.labels)} images), top-1 (retained vs unpruned), pruned after "
                  f"block {layer} of 6, {PATCHES} patches; keep 50/25/11/5% = "
                  f"{', '.join(str(round(k * PATCHES)) for k in ACCURACY_KEEPS)} tokens")
            print(table(["model", "method", "unpruned", *[f"keep {k:.0%}" for k in ACCURACY_KEEPS],
                         "ONNX = PyTorch @25%"], rows), flush=True)
    return results


class Variant:
    """One model at one pruning layer, measured with a selector at every keep."""

    def __init__(self, model, task: str, classify, data: TestSet, folder: Path, layer: int, prompt: torch.Tensor):
        self.model, self.task, self.classify, self.data = model, task, classify, data
        self.folder, self.layer, self.prompt = folder, layer, prompt

    def measure(self, name: str, fuse: bool, sign: float, alpha: float) -> tuple[list[float], str, list | None]:
        """(top-1 per keep, ONNX agreement at keep 25% for the positive sign, per-seed top-1 for random-K)."""
        accs, check, per_seed = [], "", []
        for keep in ACCURACY_KEEPS:
            k = round(keep * PATCHES)
            pruner = install(self.model, name, k, self.layer, fuse, sign=sign, alpha=alpha, text=self.prompt)
            tm = TaskModel(self.model, ModelSpec(source="x", task=self.task))
            draws = [(k, seed) for seed in RANDOM_SEEDS] if name == "random" else [None]
            preds = [predictions(tm, self.data, self.classify, d) for d in draws]
            seeds = [float((p == self.data.labels).mean()) for p in preds]
            accs.append(float(np.mean(seeds)))
            per_seed.append(seeds)
            if keep == 0.25 and sign > 0:
                onnx = onnx_predictions(tm, self.data, self.classify, self.folder, draws[0])
                check = f"{(onnx == preds[0]).mean():.4f}"
            pruner.remove()
        return accs, check, per_seed if name == "random" else None


def vision_tower(clip_dir: Path):
    """The CLIP vision tower with its projection, loaded as the pipeline loads it."""
    from models.loading import load_model, resolve_source

    spec = ModelSpec(source=str(clip_dir), task=TASK)
    return load_model(spec, resolve_source(spec), TASKS[spec.task])[0]


@torch.no_grad()
def trim_class_conditional(vision, clip, tokenizer, data: TestSet, classes: torch.Tensor, layer: int) -> list[float]:
    """TRIM asked one question per class: prune with "a photo of a {c}", score the image against that caption."""
    ids = fm.captions(tokenizer, fm.EVAL_TEMPLATE, random.Random(0))
    prompts = clip.get_text_features(input_ids=ids).pooler_output  # [10, P], unnormalised (TRIM's input)
    accs = []
    for keep in ACCURACY_KEEPS:
        pruner = install(vision, "trim", round(keep * PATCHES), layer, fuse=True, text=prompts[:1])
        tm = TaskModel(vision, ModelSpec(source="x", task=TASK))
        scores = []
        for batch in data.batches():
            x = batch["pixel_values"]
            per_class = [(tm(x, prompts[c:c + 1].expand(len(x), -1))[0] * classes[c]).sum(-1) for c in range(10)]
            scores.append(torch.stack(per_class, dim=-1).argmax(-1).numpy())
        pruner.remove()
        accs.append(float((np.concatenate(scores) == data.labels).mean()))
    return accs


def trim_calibration() -> dict:
    """TRIM's IQR rule through the pipeline: calibrate on 200 training images, K at the 90th percentile."""
    images = fm.image_folder("train", 20, RESULTS / "fashion-mnist-train-200")
    rows, out = [], {}
    for layer in ACCURACY_LAYERS:
        recipe = {"name": f"fmnist-trim-{layer}", "model": {"source": str(fm.ensure("clip")), "task": TASK},
                  "calibration": {"source": "images", "path": str(images), "num_samples": 200, "batch_size": 50},
                  "stages": [{"type": "calibrate"},
                             {"type": "token_prune", "method": "trim", "layer": layer, "prompt": TRIM_PROMPT,
                              "text_len": 16},
                             {"type": "export"}],
                  "export": {"batch_size": 1}}
        m = run_recipe(recipe, f"fmnist-trim-{layer}")
        info = m["stages"][1]["metrics"]["trim"]
        rows += [[layer, sign, v["used"], *v["counts"].values(), v["keep"], v["mean_cosine"]]
                 for sign, v in info.items()]
        out[f"layer{layer}"] = {"trim": info, "onnx": m["onnx"]["token_pruning"]}
    print(f"\nTRIM's IQR count per image on 200 Fashion-MNIST training images, through the pipeline (prompt "
          f"{TRIM_PROMPT!r}); K = 90th percentile; cosine of the image embedding to keeping every patch")
    print(table(["after block", "sign", "used", *next(iter(info.values()))["counts"], "K", "mean cosine"], rows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["speed", "accuracy"], choices=["speed", "accuracy"])
    ap.add_argument("--encoders", nargs="+", default=["vit-b16", "clip-l14-336"], choices=["vit-b16", "clip-l14-336"])
    ap.add_argument("--methods", nargs="+", default=["cls_attention", "global_attention", "divprune", "hiprune", "trim",
                                                      "visionzip", "cdpruner", "random"],
                    help="selectors to run (speed, and the accuracy rows, which merge into the existing JSON)")
    ap.add_argument("--iterations", type=int, default=10, help="timed runs per graph (split over 5 rounds)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--test-images", type=int, default=10_000, help="Fashion-MNIST test images for accuracy")
    args = ap.parse_args()
    torch.set_num_threads(1)  # PyTorch only evaluates accuracy here; one thread is robust on a shared machine
    transformers.logging.set_verbosity_error()
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous = RESULTS / "token_pruning.json"  # parts run separately land in one file
    out: dict = json.loads(previous.read_text()) if previous.is_file() else {}
    out.pop("machine", None)
    out.update({"layer": LAYER, "threads": args.threads, "iterations": args.iterations})
    if "speed" in args.parts:
        out.setdefault("speed", {})
        for name in args.encoders:
            methods = [m for m in args.methods if m not in ("trim", "cdpruner") or name.startswith("clip")]
            out["speed"][name] = speed(name, args.iterations, methods, args.threads)
    if "accuracy" in args.parts:
        out.setdefault("accuracy", {}).update(accuracy(TestSet(args.test_images), args.methods))
        out["test_images"] = min(args.test_images, 10_000)
        if "trim" in args.methods:
            out["trim_calibration"] = trim_calibration()
    print(f"\nwrote {write_json('token_pruning', out)}")


if __name__ == "__main__":
    main()
