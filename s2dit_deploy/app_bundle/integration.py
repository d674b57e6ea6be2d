"""``INTEGRATION.md`` of a bundle, generated from its host_loop.json (never written per model by hand).

It tells an app developer, for the bundle's runtime, which API calls load and run each stage, the
exact device tensor names, shapes and dtypes (from the spec), which tensors are carried state,
and what must ship with the app (QNN runtime libraries for the bundle's SoC). The loop itself is
host_loop.json's ``loop``; ``host/reference_host.py`` is its executable form.
"""

from __future__ import annotations

from typing import Any

from ..socs import SOCS

_SWIFT = {"float16": "MLMultiArrayDataType.float16", "float32": "MLMultiArrayDataType.float32",
          "int32": "MLMultiArrayDataType.int32"}


def _table(stage: dict[str, Any]) -> list[str]:
    rows = ["| direction | device name | shape | dtype | comes from / goes to |", "|---|---|---|---|---|"]
    for i in stage["inputs"]:
        src = i["source"]
        where = src["from"] + (f" `{src.get('stage', '')}.{src.get('output', '')}`" if src["from"] == "output" else
                               f" `{src['table']}` row" if src["from"] == "table" else
                               f" {src['grid']} {src['part']}" if src["from"] == "rope" else "")
        rows.append(f"| in | `{i['device_name']}` | {tuple(i['device_shape'])} | {i['device_dtype']} | {where} |")
    for o in stage["outputs"]:
        rows.append(f"| out | `{o['device_name']}` | {tuple(o['device_shape'])} | {o['device_dtype']} | "
                    f"`{o['name']}` |")
    return rows


def _coreml(spec: dict[str, Any]) -> list[str]:
    lines = ["## Core ML (iOS 18+ / macOS 15+)", "",
             "Each stage is one `.mlpackage`; Xcode compiles it to `.mlmodelc`. Load once, predict per call:", "",
             "```swift", "let cfg = MLModelConfiguration()",
             "cfg.computeUnits = .cpuAndNeuralEngine   // the DiT and text encoder were laid out for the ANE"]
    for name, st in spec["stages"].items():
        lines.append(f"let {name.replace('_', '')} = try MLModel(contentsOf: Bundle.main.url(forResource: "
                     f"\"{st['files'][0].rsplit('.', 1)[0]}\", withExtension: \"mlmodelc\")!, configuration: cfg)")
    first = spec["stages"]["dit_step"]["inputs"][0]
    lines += [f"let x = try MLMultiArray(shape: {list(first['device_shape'])} as [NSNumber], dataType: "
              f"{_SWIFT.get(first['device_dtype'], 'MLMultiArrayDataType.float16')})",
              "let out = try ditstep.prediction(from: MLDictionaryFeatureProvider(dictionary: [...]))",
              "```", "",
              "Keep every state output's `MLMultiArray` as is and roll it per `state` in host_loop.json "
              "(concatenate on the stated axis): the caches stay in the device layout and fp16 scale.",
              "The decoder runs on the Neural Engine as well (frames-as-batch layout); its video output "
              "is converted to frames on the CPU per `frames`."]
    return lines


def _executorch(spec: dict[str, Any], qnn: bool, soc: str | None) -> list[str]:
    lines = ["## ExecuTorch (Android / iOS C++)", "",
             "```cpp", "#include <executorch/extension/module/module.h>",
             "using executorch::extension::Module;"]
    for name, st in spec["stages"].items():
        data = [f for f in st["files"] if f.endswith(".ptd")]
        arg = f", \"{data[0]}\"" if data else ""
        lines.append(f"Module {name}(\"{st['files'][0]}\"{arg});  // inputs positional, in the order below")
    lines += ["auto out = dit_step.forward({x, t, /* ... every input in order */});", "```", ""]
    if qnn:
        arch = SOCS[soc].htp_arch if soc in SOCS else None
        lines += ["Link the QNN delegate (`executorch_backends` with `EXECUTORCH_BUILD_QNN=ON`) and ship from "
                  "the QNN SDK the build used:",
                  "- `libQnnHtp.so`, `libQnnSystem.so`",
                  f"- `libQnnHtpV{arch}Stub.so` and `libQnnHtpV{arch}Skel.so` (HTP v{arch}, {soc})" if arch else
                  "- the `libQnnHtpV<arch>Stub.so` / `Skel.so` pair of the target SoC",
                  "Set `ADSP_LIBRARY_PATH` to the folder holding the Skel library."]
    else:
        lines += ["Link `xnnpack_backend`, `portable_kernels` and `quantized_kernels` (q/dq ops outside the "
                  "delegate)."]
    return lines


def _onnx(spec: dict[str, Any], qnn: bool) -> list[str]:
    provider = "QNNExecutionProvider (backend_path libQnnHtp.so)" if qnn else "CPUExecutionProvider or XNNPACK"
    return ["## ONNX Runtime", "",
            "```python", "so = ort.SessionOptions(); so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL",
            f"sess = ort.InferenceSession(path, so, providers=[...])  # {provider}", "```", "",
            "Feed by name; an `.onnx.data` file beside a model holds its weights and must stay next to it. "
            "An exporter may drop an input a graph does not use: feed `session.get_inputs()` only."]


def _coreai(spec: dict[str, Any]) -> list[str]:
    return ["## Core AI (iOS 27 / macOS 27)", "",
            "Each stage is one `.aimodel` folder (`main.mlirb` + metadata); the device specializes it for the "
            "Neural Engine when it loads. The same runtime runs it on Linux from Python (coreai-core), "
            "which is how this bundle was validated:", "",
            "```python", "from coreai.authoring import AIModelAsset", "from coreai.runtime import NDArray", "",
            "async with AIModelAsset.load(\"dit_step.aimodel\").executable() as model:",
            "    fn = model.load_function(\"main\")",
            "    out = await fn({name: NDArray(array) for name, array in feed.items()})  # device names below",
            "```", "",
            "Inputs and outputs are in the device layout and dtype of the tables above; keep every state output "
            "as is and roll it per `state` in host_loop.json, as for Core ML."]


def _commit(spec: dict[str, Any]) -> list[str]:
    """One line per commit mode of ``commit``: which call's entries are rolled in, and the cost."""
    section = spec.get("commit") or {"default": "clean", "modes": {}}
    steps = str(spec["schedule"]["default_steps"])
    return [f"  - commit `{name}`{' (default)' if name == section['default'] else ''}: {mode['doc']}; "
            f"{mode['dit_step_calls_per_chunk'][steps]} `dit_step` calls per chunk at {steps} steps."
            for name, mode in section["modes"].items()]


def integration_markdown(spec: dict[str, Any], soc: str | None = None) -> str:
    target = spec["target"]
    lines = [f"# Integrating this bundle ({spec['model']['name']}, target {target})", "",
             "Generated by s2dit-deploy from `host/host_loop.json`, which is the normative spec "
             f"(version {spec['version']}). `python3 host/reference_host.py . \"a prompt\" -o frames.npy` runs it "
             "with nothing but numpy, `tokenizers` and the target's runtime.", "",
             "## What the app does", "",
             f"- Tokenize with `{spec['tokenizer']['file']}` (Hugging Face `tokenizers`, also in Swift / Kotlin / "
             f"C++) after `clean`: {', '.join(spec['tokenizer']['clean'])}. {spec['tokenizer']['length']} int32 ids.",
             f"- Draw noise with `{spec['rng']['algorithm']}` (`{spec['rng']['file']}`, a dozen lines to port).",
             f"- Per chunk: {len(spec['schedule']['rows'][str(spec['schedule']['default_steps'])])} denoising "
             "`dit_step` calls, the commit, one `decoder` call; "
             f"{spec['frames']['frames_per_chunk']} frames out.",
             *_commit(spec),
             "- Timestep inputs are rows of `t.dit_step`; RoPE from `rope.*` tables by "
             f"`{spec['rope']['formula']}`.", ""]
    for name, st in spec["stages"].items():
        lines += [f"### `{name}`: {', '.join(st['files'])}", "", *_table(st), ""]
    lines += ["### Carried state", "", "| input | from output | rule | axis | when |", "|---|---|---|---|---|"]
    for stage, rules in spec["state"].items():
        for r in rules:
            lines.append(f"| `{r['input']}` | {('`' + r['output'] + '`') if r['output'] else '-'} | {r['rule']} | "
                         f"{r.get('axis', '-')} | {r['when']} |")
    lines.append("")
    if target == "coreml":
        lines += _coreml(spec)
    elif target == "coreai":
        lines += _coreai(spec)
    elif target.startswith("executorch"):
        lines += _executorch(spec, target == "executorch-qnn", soc)
    else:
        lines += _onnx(spec, target == "onnx-qnn")
    return "\n".join(lines) + "\n"
